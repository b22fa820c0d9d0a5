"""Numeric guards of the training loop: non-finite steps, loss spikes, time-based checkpoints.

Every decision that changes what the ranks do (skip a step, stop, checkpoint) is taken from
values every rank holds identically (all-reduced, or rank 0's broadcast through the step's
all-reduce), so all ranks always agree; loss spikes only warn and are tracked on rank 0.
"""

from __future__ import annotations

import math
from collections import deque


class NonFiniteError(RuntimeError):
    """Too many consecutive optimizer steps with a non-finite loss or gradient norm."""


def is_bad(loss: float, grad_norm: float | None, applied: bool) -> bool:
    """A step is bad when its (all-reduced) loss or global gradient norm is not finite, or when
    DeepSpeed skipped its optimizer update (it does so for a non-finite gradient norm)."""
    return not math.isfinite(loss) or (grad_norm is not None and not math.isfinite(grad_norm)) or not applied


class BadStepGuard:
    """Counts bad steps; raises NonFiniteError after ``max_bad`` consecutive ones (0: never)."""

    def __init__(self, max_bad: int, total: int = 0) -> None:
        self.max_bad = max_bad
        self.total = total  # over the run (a resume carries it on from metrics.jsonl)
        self.consecutive = 0  # since the last good step of this worker-group start

    def update(self, bad: bool) -> None:
        """Record one optimizer step."""
        if not bad:
            self.consecutive = 0
            return
        self.total += 1
        self.consecutive += 1

    def check(self, step: int) -> None:
        """Raise NonFiniteError when optimizer step ``step`` (1-based) was the ``max_bad``-th bad one in a row."""
        if self.max_bad and self.consecutive >= self.max_bad:
            raise NonFiniteError(
                f"stopping at step {step}: {self.consecutive} consecutive optimizer steps had a non-finite loss or "
                f"gradient norm and were skipped (trainer.max_bad_steps={self.max_bad}). The weights are those of "
                f"step {step - self.consecutive}; lower trainer.lr, check the data of these steps, or raise "
                f"trainer.max_bad_steps")


class SpikeDetector:
    """z-score of a step's loss against the previous ``window`` finite losses; a z above ``z`` is a spike.

    Needs ``min(window, 10)`` earlier losses before it judges; ``window=0`` disables it.
    """

    def __init__(self, window: int, z: float, history: list[float] = (), total: int = 0) -> None:
        self.window, self.z = window, z
        self.losses: deque[float] = deque(maxlen=max(window, 1))
        self.total = total
        for loss in history:
            self._keep(loss)

    def _keep(self, loss: float) -> None:
        if math.isfinite(loss):
            self.losses.append(loss)

    def observe(self, loss: float) -> float | None:
        """The loss's z-score when it is a spike (else None); then remembers the loss."""
        spike = None
        if self.window and math.isfinite(loss) and len(self.losses) >= min(self.window, 10):
            n = len(self.losses)
            mean = sum(self.losses) / n
            std = math.sqrt(sum((x - mean) ** 2 for x in self.losses) / (n - 1))
            score = (loss - mean) / max(std, 1e-12 * max(abs(mean), 1.0))
            if score > self.z:
                spike = score
                self.total += 1
        self._keep(loss)
        return spike


def checkpoint_due(now: float, last: float, every_s: float) -> bool:
    """Time-based checkpointing: at least ``every_s`` seconds (0: off) since the last checkpoint."""
    return every_s > 0 and now - last >= every_s
