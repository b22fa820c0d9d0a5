"""Numeric guards of the training loop: non-finite steps, loss spikes, time-based checkpoints.

Every decision that changes what the ranks do (skip a step, stop, checkpoint) is taken from
values every rank holds identically (all-reduced, or rank 0's broadcast through the step's
all-reduce), so all ranks always agree. Loss spikes are detected on rank 0; with
``trainer.spike_rollback`` rank 0's verdict is all-reduced before every rank rolls back.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from keel.config import TrainerConfig


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
        self._evicted: float | None = None  # the loss the newest one pushed out of the window
        for loss in history:
            self._keep(loss)

    def _keep(self, loss: float) -> None:
        if math.isfinite(loss):
            full = len(self.losses) == self.losses.maxlen
            self._evicted = self.losses[0] if full else None
            self.losses.append(loss)

    def forget_last(self) -> None:
        """Undo remembering the newest loss (a spike that was rolled back), restoring the loss it evicted."""
        assert self.losses, "forget_last() without a remembered loss"
        self.losses.pop()
        if self._evicted is not None:
            self.losses.appendleft(self._evicted)
        self._evicted = None  # only the newest loss can be forgotten

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


@dataclass
class Rollbacks:
    """Loss-spike rollbacks of the run: how many, and how many optimizer steps they undid."""

    count: int = 0
    steps: int = 0  # sum over rollbacks of (spike step - checkpoint step)

    @classmethod
    def carried(cls, history: list[dict]) -> Rollbacks:
        """The counts of the last ``metrics.jsonl`` row before a resume (zero without one)."""
        last = history[-1] if history else {}
        return cls(last.get("rollbacks", 0), last.get("rolled_back_steps", 0))

    def record(self, step: int, to: int | None) -> dict:
        """Count a rollback at ``step`` to checkpoint step ``to`` (None: no rollback); the metrics row's fields."""
        if to is None:
            return {"rollbacks": self.count, "rolled_back_steps": self.steps}
        assert 0 < to < step, f"rollback from step {step} to checkpoint step {to}"
        self.count += 1
        self.steps += step - to
        return {"rollbacks": self.count, "rolled_back_steps": self.steps, "rolled_back_to": to}


def checkpoint_due(now: float, last: float, every_s: float) -> bool:
    """Time-based checkpointing: at least ``every_s`` seconds (0: off) since the last checkpoint."""
    return every_s > 0 and now - last >= every_s


class StepGuards:
    """A worker's numeric guards over the run: the bad-step guard (every rank), the loss-spike detector (rank 0,
    which holds the metrics) and the rollback counts, carried on from the metrics of the steps before a resume."""

    def __init__(self, t: TrainerConfig, history: list[dict] | None) -> None:
        """``history``: metrics.jsonl's rows before this start (rank 0), None on the other ranks."""
        last = history[-1] if history else {}
        self.bad = BadStepGuard(t.max_bad_steps, last.get("bad_steps", 0))
        self.spikes: SpikeDetector | None = None
        if history is not None:
            # As the live detector: skipped steps were never judged, rolled-back spikes were forgotten.
            losses = [r["loss"] for r in history if not r.get("bad_step") and "rolled_back_to" not in r]
            self.spikes = SpikeDetector(t.spike_window, t.spike_z, losses[-max(t.spike_window, 1):],
                                        last.get("loss_spikes", 0))
        self.rollbacks = Rollbacks.carried(history or [])

    def judge(self, step: int, m: dict, bad: bool) -> bool:
        """Count step ``step`` (skipped when ``bad``) and, on rank 0, warn about it; whether its loss was a spike."""
        self.bad.update(bad)
        return self.spikes is not None and _warn(step, m, bad, self.bad, self.spikes)

    def rolled(self, step: int, to: int | None) -> dict:
        """A rollback at ``step`` to checkpoint step ``to`` (None: none); the metrics row's guard fields."""
        if to is not None and self.spikes is not None:
            self.spikes.forget_last()  # the rolled-back loss stays out of the window the next losses are judged by
        return self.rollbacks.record(step, to)

    def row(self, bad: bool) -> dict:
        """The metrics row's counts (rank 0)."""
        return {"bad_step": bad, "bad_steps": self.bad.total, "loss_spikes": self.spikes.total}

    def counts(self) -> dict:
        """The run result's counts."""
        return {"bad_steps": self.bad.total, "loss_spikes": self.spikes.total if self.spikes else 0,
                "rollbacks": self.rollbacks.count, "rolled_back_steps": self.rollbacks.steps}


def _warn(step: int, m: dict, bad: bool, guard: BadStepGuard, spikes: SpikeDetector) -> bool:
    """Rank 0's warnings about a skipped non-finite step or a loss spike; whether the step's loss was a spike."""
    if bad:
        print(f"warning: step {step}: non-finite loss ({m['loss']}) or gradient norm ({m['grad_norm']}); the optimizer "
              f"step was skipped on every rank ({guard.consecutive} in a row, {guard.total} in the run; "
              f"trainer.max_bad_steps={guard.max_bad})", flush=True)
        return False
    z = spikes.observe(m["loss"])
    if z is not None:
        print(f"warning: step {step}: loss spike: loss {m['loss']:.4f} is {z:.1f} standard deviations above the "
              f"mean of the previous losses (trainer.spike_window={spikes.window}, trainer.spike_z={spikes.z}); "
              f"{spikes.total} spikes in the run", flush=True)
    return z is not None
