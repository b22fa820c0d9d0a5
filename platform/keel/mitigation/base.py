"""The mitigation plugin protocol: hooks at the points a forgetting mitigation needs.

Hooks wired so far (called by ``keel.launch.driver``):

- ``configure(cfg)``: adjust trainer settings before anything runs (conservative LR);
- ``extra_sources()``: data sources the plugin adds to the mixture (replay);
- ``adjust_weights(weights, sources)``: change the mixture weights, given every source's
  encoded examples (replay sets its share of trained tokens);
- ``check_data(report)``: warnings about the realised data plan (epochs per source).

Model-wrapping (LoRA), loss (EWC) and schedule (progressive mixing) hooks arrive with those
plugins; a plugin only overrides what it uses.
"""

from __future__ import annotations

from typing import Any


class Mitigation:
    """Base class: every hook is a no-op."""

    name = "base"

    def __init__(self, options: Any) -> None:
        self.options = options

    def configure(self, cfg: Any) -> None:
        """Adjust ``cfg`` (a validated KeelConfig) in place before the run starts."""

    def extra_sources(self) -> list[Any]:
        return []

    def adjust_weights(self, weights: list[float], sources: list[Any]) -> list[float]:
        return weights

    def check_data(self, report: dict) -> list[str]:
        return []
