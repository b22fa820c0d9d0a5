"""The plugin protocol: hooks at the points a forgetting mitigation (or the test-only fault injector) needs.

Hooks called by the driver (``keel.launch``), composed in turn by ``keel.mitigation``:

- ``configure(cfg)``: adjust trainer settings before anything runs (conservative LR);
- ``extra_sources()``: data sources the plugin adds to the mixture (replay);
- ``adjust_weights(weights, sources)``: change the mixture weights, given every source's
  encoded examples (replay sets its share of trained tokens);
- ``schedule(schedule, sources) -> Schedule``: let the mixture change over training; gets
  the ``keel.data.mixing.Schedule`` after ``adjust_weights`` (one point for a fixed mixture,
  several with ``mix=schedule``) over every source, and returns it (unchanged: the fixed-mixture
  path, bit-for-bit) or a new one (progressive ramps a text source from its start share);
- ``check_data(report)``: warnings about the realised data plan (epochs per source);
- ``check_config(cfg)``: warnings about the final config, after every plugin's ``configure``
  (LoRA at a full-fine-tune learning rate).

Called on every worker by the trainer (``keel.train.trainer``, ``keel.train.step``):

- ``wrap_model(model, cfg) -> model``: replace the loaded model (ZeRO-3: its parameters are
  already partitioned) before the optimizer is built over the parameters left trainable
  (LoRA wraps it in PEFT adapters and freezes the base);
- ``export(engine, cfg, info, out, full) -> dict | None``: write the model artefacts under ``out``
  (the run dir at the end, ``exports/step_N`` along the way) in place of the default full-model HF
  export in ``out/hf`` (a collective: every rank calls it); ``full``: whether a full model is wanted
  (the final export's ``trainer.save_hf``); returns entries for the run result, ``hf_dir``
  included, or None to keep the default export;
- ``setup_engine(engine, cfg, info) -> dict``: once the DeepSpeed engine is built and before a
  checkpoint is resumed, so the engine still holds the base weights (a collective: every rank
  calls it); returns run-level facts for the run result (EWC estimates or reloads its Fisher);
- ``begin_step(step)``: before optimizer step ``step`` (1-based, as in metrics.jsonl) is trained;
- ``micro_loss(loss, micro) -> loss``: micro-batch ``micro``'s loss sum of the current step, before
  it is counted and back-propagated (the fault injector poisons or spikes it);
- ``after_backward(engine) -> dict``: after the last backward of an optimizer step and before
  ``engine.step()``, while the step's gradients (ZeRO-3: reduced into each rank's local fp32
  partitions) can still be changed; it may add a loss term's gradient there (EWC's penalty)
  and returns metrics for the step's log (a collective: every rank calls it);
- ``end_step(step)``: after step ``step``'s checkpoint and export, when the run goes on.

A plugin only overrides what it uses.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from keel.config import KeelConfig, SourceConfig
from keel.core.worker import WorkerInfo

if TYPE_CHECKING:
    import torch

    from keel.data.examples import SourceData
    from keel.data.mixing import Schedule


class Plugin:
    """Base class: every hook is a no-op."""

    name = "base"
    shapes_rows = False  # its data hooks change which rows are planned (they act in keel preprocess, not on its rows)

    def configure(self, cfg: KeelConfig) -> None:
        """Adjust ``cfg`` (a validated KeelConfig) in place before the run starts."""

    def extra_sources(self) -> list[SourceConfig]:
        return []

    def adjust_weights(self, weights: list[float], sources: list[SourceData]) -> list[float]:
        return weights

    def schedule(self, schedule: Schedule, sources: list[SourceData]) -> Schedule:
        return schedule

    def check_data(self, report: dict) -> list[str]:
        return []

    def check_config(self, cfg: KeelConfig) -> list[str]:
        return []

    def wrap_model(self, model: Any, cfg: KeelConfig) -> Any:
        return model

    def export(self, engine: Any, cfg: KeelConfig, info: WorkerInfo, out: Path, full: bool) -> dict | None:
        return None

    def setup_engine(self, engine: Any, cfg: KeelConfig, info: WorkerInfo) -> dict:
        return {}

    def begin_step(self, step: int) -> None:
        """Optimizer step ``step`` (1-based) is about to be trained."""

    def micro_loss(self, loss: torch.Tensor, micro: int) -> torch.Tensor:
        return loss

    def after_backward(self, engine: Any) -> dict:
        return {}

    def end_step(self, step: int) -> None:
        """Optimizer step ``step`` is trained, checkpointed and exported as due; the run goes on."""


class Mitigation(Plugin):
    """A forgetting mitigation, built from its config group (``mitigation.<name>``)."""

    def __init__(self, options: Any) -> None:
        self.options = options
