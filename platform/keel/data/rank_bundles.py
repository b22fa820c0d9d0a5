"""Data-parallel layout: each optimizer step's rows split into one bundle per rank.

Bundle ``(step, slot)`` holds rows ``[step*G + slot*A*M, step*G + (slot+1)*A*M)`` with
G = world * A * M, A = accumulation steps, M = micro-batch rows. Every rank therefore
gets exactly the same number of steps (an uneven split would hang ZeRO-3 collectives),
and the global row order does not depend on the world size.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

FIELDS = ("input_ids", "targets", "position_ids", "seq_lens")  # what a worker trains on (validation batches too)


def step_bundles(plan, world: int, accum: int, micro: int) -> Iterator[dict]:
    """Yield bundles step-major: (0,0), (0,1), ..., (1,0), ..."""
    per_rank = accum * micro
    per_step = world * per_rank
    rows = plan.input_ids.shape[0]
    if rows % per_step:
        raise ValueError(f"{rows} rows do not split into steps of {per_step} rows")
    for step in range(rows // per_step):
        for slot in range(world):
            lo = step * per_step + slot * per_rank
            bundle = {k: np.ascontiguousarray(getattr(plan, k)[lo:lo + per_rank]) for k in FIELDS}
            bundle.update(step=step, slot=slot)
            yield bundle


def step_source_tokens(plan, world: int, accum: int, micro: int) -> list[list[int]]:
    """Real tokens per source in each global step (for per-source logging)."""
    per_step = world * accum * micro
    k = len(plan.source_names)
    out = []
    for lo in range(0, plan.source_ids.shape[0], per_step):
        ids = plan.source_ids[lo:lo + per_step]
        out.append(np.bincount(ids[ids >= 0].ravel().astype(np.int64), minlength=k).tolist())
    return out
