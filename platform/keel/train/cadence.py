"""When a worker checkpoints: every ``trainer.checkpoint_every`` steps or ``checkpoint_every_s`` seconds, at a
new best val/loss (``trainer.save_best``), on preemption and at the end; and what a spike rollback restores."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from keel.config import KeelConfig
from keel.core.worker import WorkerInfo
from keel.train import checkpoint as ckpt
from keel.train import export as exports
from keel.train.guards import checkpoint_due
from keel.train.resume import ResumePoint


def save(engine: Any, cfg: KeelConfig, info: WorkerInfo, step: int) -> Path:
    """Checkpoint ``step`` with the run's fingerprints, world size and model record (a collective)."""
    meta = {"world_size": info.world_size, **info.run_meta, "model": exports.model_record(cfg, info.model_path)}
    return ckpt.save(engine, info.run_dir, step, info.rank, cfg.trainer.keep_checkpoints, meta)


class CheckpointCadence:
    """The checkpoints one worker group writes, and the newest one it loaded or wrote."""

    def __init__(self, cfg: KeelConfig, info: WorkerInfo, start: int, loaded: ResumePoint | None) -> None:
        self.cfg, self.info = cfg, info
        self.last_saved = start  # the step of the newest checkpoint (the resumed one at start)
        self.last_time = time.monotonic()
        self.restore = loaded  # what a spike rollback reloads: the newest checkpoint this group loaded or wrote

    def timed_due(self) -> bool:
        """Rank 0's clock: ``trainer.checkpoint_every_s`` passed since the last checkpoint (the other ranks learn it
        on the step's all-reduce)."""
        return self.info.rank == 0 and checkpoint_due(time.monotonic(), self.last_time,
                                                      self.cfg.trainer.checkpoint_every_s)

    def after_step(self, engine: Any, step: int, preempted: bool, timed: bool, improved: bool) -> None:
        """Checkpoint step ``step`` when preempted, at a new best to keep, or periodically or timed before the
        last step (the last one is the final checkpoint); mark it as the best one."""
        t = self.cfg.trainer
        periodic = bool(t.checkpoint_every) and step % t.checkpoint_every == 0
        keep_best = improved and t.save_best  # the best step needs its checkpoint, now
        if preempted or keep_best or ((periodic or timed) and step < t.max_steps):
            self.restore = ResumePoint(save(engine, self.cfg, self.info, step))
            self.last_saved, self.last_time = step, time.monotonic()
        if keep_best:
            ckpt.mark_best(self.info.run_dir, step, self.info.rank)

    def final(self, engine: Any, end: int) -> None:
        """The checkpoint of the last step trained, unless it was just written."""
        if self.last_saved < end:
            save(engine, self.cfg, self.info, end)
