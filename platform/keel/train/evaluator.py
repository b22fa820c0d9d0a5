"""Evaluation during training: ``eval.every_n_steps`` (``keel.eval.hook``) and the validation loss with its
best-step tracker (``keel.train.validation``), for save_best and early stopping."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from keel.config import KeelConfig
from keel.core.collectives import all_gather
from keel.core.worker import WorkerInfo
from keel.eval import hook
from keel.train import validation
from keel.train.validation import Best

if TYPE_CHECKING:
    from keel.tracking.logger import RunLogger


def load_sets(cfg: KeelConfig, info: WorkerInfo) -> tuple[Any, Any]:
    """The tokenizer and the sets of keel.eval.hook (forgetting text, pass@k prompts)."""
    from keel.model.build import load_tokenizer

    tokenizer = load_tokenizer(info.model_path, cfg.model.trust_remote_code)
    sets = hook.load_sets(cfg, tokenizer)
    if sets.rejected and info.rank == 0:
        reasons = sorted({r["reason"] for r in sets.rejected})
        print(f"warning: eval.forgetting.source: {len(sets.rejected)} rows not evaluated ({'; '.join(reasons)[:300]}); "
              f"perplexity uses the {len(sets.sequences)} others", flush=True)
    return tokenizer, sets


def carried_best(cfg: KeelConfig, info: WorkerInfo, logger: RunLogger | None) -> Best | None:
    """The best-val/loss tracker, carried on from the evaluations before a resume (rank 0 reads them and
    every rank takes its state: a collective); None when the run has no validation rows."""
    if info.val_batches is None:
        return None
    t = cfg.trainer
    best = Best(t.early_stopping_patience, t.early_stopping_min_delta)
    if logger is not None:
        best.replay(logger.eval_history)
    best.step, best.loss, best.since, best.last = all_gather((best.step, best.loss, best.since, best.last))[0]
    return best


class Evaluator:
    """Every rank measures at the evaluation points, rank 0 warns and logs; ``best`` (None without validation
    rows) is updated alike on every rank, since it only sees all-reduced values."""

    def __init__(self, cfg: KeelConfig, info: WorkerInfo, logger: RunLogger | None) -> None:
        self.cfg, self.info, self.logger = cfg, info, logger
        self.best = carried_best(cfg, info, logger)
        self.hooks = cfg.eval.every_n_steps > 0 and bool(cfg.eval.tasks)
        self.tokenizer, self.sets = load_sets(cfg, info) if self.hooks else (None, None)

    @property
    def enabled(self) -> bool:
        return self.hooks or self.best is not None

    @property
    def stopped(self) -> bool:
        """Early stopping: the validation loss has not improved for ``trainer.early_stopping_patience`` evaluations."""
        return self.best is not None and self.best.stop

    def baseline_due(self, start: int) -> bool:
        """The evaluation of the model before any update: at a fresh start with ``eval.every_n_steps``."""
        return self.enabled and start == 0 and bool(self.cfg.eval.every_n_steps)

    def due(self, step: int) -> bool:
        """Evaluation points: every ``eval.every_n_steps`` and the last step; with validation, the last step too."""
        if not self.enabled:
            return False
        max_steps = self.cfg.trainer.max_steps
        last = step == max_steps
        return hook.due(step, self.cfg.eval.every_n_steps, max_steps) or (self.best is not None and last)

    def evaluate(self, engine: Any, step: int) -> bool:
        """Measure the model at ``step`` (a collective); whether its val/loss is the best so far."""
        info, best = self.info, self.best
        val = validation.measure(engine.module, info.val_batches, info.source_names) if best is not None else {}
        improved = bool(val) and step > 0 and best.update(step, val["val/loss"])
        out = hook.evaluate(engine.module, self.tokenizer, self.sets, self.cfg, step, info.rank,
                            info.world_size) if self.hooks else None
        if self.logger is not None:
            self._log(step, out, val)
        return improved

    def _log(self, step: int, out: tuple[dict, list] | None, val: dict) -> None:
        """Rank 0: the warnings, the validation line and the evaluation row."""
        row, table = ({"step": step}, []) if out is None else out
        if self.hooks:
            baseline = next((r for r in self.logger.eval_history if "forgetting/ppl" in r), None)
            row = hook.with_rise(row, baseline)
            for warning in hook.warnings(row, baseline, self.cfg):
                print(f"warning: step {step}: {warning}", flush=True)
        if val:
            best = self.best
            print(f"validation: step {step}: val/loss {val['val/loss']:.4f}" + (
                f"; best {best.loss:.4f} at step {best.step}" if best.step else ""), flush=True)
        self.logger.log_eval({**row, **val}, table)

    def summary(self) -> dict:
        """``summary.json``'s validation fields: the best step and val/loss, and whether the run stopped early."""
        if self.best is None:
            return {}
        return {**self.best.summary(), "early_stopped": self.stopped}

    def say_stopped(self, end: int) -> None:
        """Rank 0's line when early stopping ended the run at step ``end``."""
        best = self.best
        if self.stopped and self.info.rank == 0:
            print(f"early stopping: val/loss did not improve for {best.since} evaluations "
                  f"(trainer.early_stopping_patience={best.patience}); the run ends at step {end}, "
                  f"best step {best.step} (val/loss {best.loss:.4f})", flush=True)
