"""Learning-rate schedules (``trainer.lr_schedule``): linear warmup, then cosine, linear, constant or WSD.

The factor of the peak LR is a pure function of the optimizer step (0-based: the LR step ``s`` trains
with), so resuming, skipping a non-finite step and rolling back keep it by stepping the scheduler to
the data position. After ``warmup_steps`` steps rising linearly to the peak, ``p`` runs from 0 to 1
over the remaining ``total - warmup`` steps (``total`` is ``trainer.max_steps`` as resolved):

- ``cosine``: ``m + (1 - m)·½(1 + cos πp)`` (Keel's original schedule);
- ``linear``: ``m + (1 - m)(1 - p)``;
- ``constant``: 1 (the peak LR after warmup);
- ``wsd``: warmup-stable-decay (MiniCPM, Hu et al. 2024, arXiv:2404.06395): 1 until the last
  ``decay_fraction`` of the post-warmup steps, then ``m + (1 - m)(1 - √q)`` with ``q`` from 0 to 1
  over that window: the "1-sqrt" cooldown Hägele et al. 2024 (arXiv:2405.18392) found best, which
  with 20% of the steps matches cosine.

``m`` is ``min_lr_ratio`` (the floor: it is reached as ``p`` reaches 1, one step after the last).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from keel.config import TrainerConfig

DEFAULT_MIN_LR_RATIO = 0.1  # trainer.min_lr_ratio left unset (cosine, linear, wsd)
DEFAULT_DECAY_FRACTION = 0.2  # trainer.decay_fraction left unset (wsd)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float, schedule: str = "cosine",
              decay_fraction: float = DEFAULT_DECAY_FRACTION) -> float:
    """Multiplier of the peak LR for optimizer step ``step`` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    p = min(1.0, (step - warmup) / span)
    if schedule == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p))
    if schedule == "linear":
        return min_ratio + (1 - min_ratio) * (1 - p)
    if schedule == "constant":
        return 1.0
    assert schedule == "wsd", schedule
    stable = 1 - decay_fraction
    if p <= stable:
        return 1.0
    return min_ratio + (1 - min_ratio) * (1 - math.sqrt((p - stable) / decay_fraction))


def resolved(t: TrainerConfig) -> dict:
    """The schedule's settings from the ``trainer`` group, defaults filled in (what the run uses)."""
    min_ratio = DEFAULT_MIN_LR_RATIO if t.min_lr_ratio is None else t.min_lr_ratio
    decay = DEFAULT_DECAY_FRACTION if t.decay_fraction is None else t.decay_fraction
    return {"schedule": t.lr_schedule, "warmup": t.warmup_steps, "total": t.max_steps,
            "min_ratio": 0.0 if t.lr_schedule == "constant" else min_ratio,
            "decay_fraction": decay if t.lr_schedule == "wsd" else 0.0}


def lr_lambda(t: TrainerConfig) -> Callable[[int], float]:
    """The LR factor per scheduler step for the ``trainer`` group: the one place the total step count
    (``trainer.max_steps`` as resolved) enters the schedule. A plain function, so a DeepSpeed checkpoint
    of the scheduler stores only its step, never these settings."""
    r = resolved(t)
    return lambda s: lr_factor(s, r["warmup"], r["total"], r["min_ratio"], r["schedule"], r["decay_fraction"])


def describe(t: TrainerConfig) -> str:
    """One line for the console: the schedule and the LRs it moves between."""
    r = resolved(t)
    warm = f"warmup {r['warmup']} steps, then " if r["warmup"] else ""
    if r["schedule"] == "constant":
        return f"lr: {warm}constant {t.lr:g}"
    shape = f"wsd (decay over the last {r['decay_fraction']:g} of the steps, 1-sqrt)" if r["schedule"] == "wsd" \
        else r["schedule"]
    return f"lr: {warm}{shape} from {t.lr:g} to {t.lr * r['min_ratio']:g} over {r['total']} steps"
