"""Progressive mixing: start with pretraining-style text and move to the SFT mixture over a ramp.

The mixture starts with ``start_share`` of the planned tokens from a text source (counted
like replay's ratio: real tokens, all trained) and reaches the target mixture (the ``mix``
group's, after the other plugins' weights) at fraction ``ramp`` of training; it is a
``keel.data.mixing.Schedule`` of two points, sampled per segment by the data pipeline.

Alone, the plugin adds its own text source, whose target share is 0. With ``replay`` it adds
none and ramps replay's source instead, from ``start_share`` down to ``replay.ratio``.
It builds the schedule itself, so it refuses ``mix=schedule``.
"""

from __future__ import annotations

from typing import Any

from keel.data.mixing import Schedule
from keel.data.pipeline import mean_lengths
from keel.errors import ConfigError, UserError
from keel.mitigation.base import Mitigation
from keel.mitigation.replay import replay_weight

REFUSE_SCHEDULE = ("config error: mitigation=progressive cannot combine with mix=schedule: it builds the "
                   "schedule itself (start_share -> the mix group's mixture over ramp); drop one of them")


def start_mixture(target: list[float], mean_tokens: list[float], ramped: int, share: float) -> list[float]:
    """``target`` with source ``ramped`` re-weighted to ``share`` of the expected tokens, the rest scaled alike."""
    rest = [w for k, w in enumerate(target) if k != ramped]
    if sum(rest) <= 0:
        raise UserError("progressive: the target mixture has no weight outside the ramped source")
    rest = [w / sum(rest) for w in rest]
    rest_means = [t for k, t in enumerate(mean_tokens) if k != ramped]
    p = replay_weight(rest, rest_means, mean_tokens[ramped], share)
    out = [w * (1 - p) for w in rest]
    out.insert(ramped, p)
    return out


class Progressive(Mitigation):
    name = "progressive"
    shapes_rows = True

    def __init__(self, options: Any) -> None:
        super().__init__(options)
        self.ramped = options.source.name  # replay's source when replay is enabled (see configure)
        self.own_source = True

    def configure(self, cfg: Any) -> None:
        """Refuse mix=schedule; with replay, ramp replay's source instead of adding one."""
        if cfg.mix.name == "schedule":
            raise ConfigError(REFUSE_SCHEDULE)
        if cfg.mitigation.replay is not None:
            self.ramped, self.own_source = cfg.mitigation.replay.source.name, False

    def extra_sources(self) -> list[Any]:
        return [self.options.source] if self.own_source else []

    def adjust_weights(self, weights: list[float], sources: list[Any]) -> list[float]:
        """The own text source has no share in the target mixture."""
        return [*weights, 0.0] if self.own_source else weights

    def schedule(self, schedule: Schedule, sources: list[Any]) -> Schedule:
        """Two points: the start mixture at 0, the fixed target mixture at ``ramp``."""
        if not schedule.static:
            raise ConfigError(REFUSE_SCHEDULE)
        names = [s.name for s in sources]
        r = names.index(self.ramped)
        if not sources[r].input_ids:
            raise UserError(f"mitigation.progressive: source {self.ramped!r} has no usable examples "
                             "(see rejects.jsonl)")
        means = mean_lengths(sources)
        target = list(schedule.points[0][1])
        start = start_mixture(target, means, r, self.options.start_share)
        return Schedule(((0.0, tuple(start)), (self.options.ramp, tuple(target))), self.options.interpolation)

    def check_data(self, report: dict) -> list[str]:
        segments = report["schedule"]["segments"]
        first, last = (segments[i]["token_share"][self.ramped] for i in (0, -1))
        report["progressive_token_share"] = {"first_segment": first, "last_segment": last}
        print(f"progressive: {self.ramped!r} is {first:.2%} of the tokens in the first segment "
              f"(start_share {self.options.start_share:.2%}) and {last:.2%} in the last (ramp {self.options.ramp:g})")
        return []
