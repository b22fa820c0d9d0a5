"""Data mixing: temperature-scaled source weights and a deterministic sampling plan.

``mixture_weights`` gives p_k proportional to (N_k * q_k) ** (1 / T): T = 1 samples in
proportion to (quality-weighted) size, T -> inf flattens towards uniform.

``sample_plan`` turns weights into an exact, reproducible list of (source, example)
picks: counts by largest-remainder apportionment, examples drawn in whole passes
without replacement, and sources interleaved evenly so every prefix of the plan
already has (within one example per source) the mixture proportions.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Sequence
from fractions import Fraction

import numpy as np


def mixture_weights(
    sizes: Sequence[float], T: float = 1.0, quality: Sequence[float] | None = None
) -> list[float]:
    """Return p_k proportional to (sizes[k] * quality[k]) ** (1 / T), normalised to sum 1."""
    size_arr = _finite_nonneg(sizes, "sizes")
    if size_arr.size == 0 or not size_arr.any():
        raise ValueError("sizes must contain at least one positive size")
    if isinstance(T, bool) or not isinstance(T, (int, float)) or math.isnan(T) or T <= 0:
        raise ValueError(f"T must be a number > 0 (inf allowed), got {T!r}")
    mass = size_arr
    if quality is not None:
        qual_arr = _finite_nonneg(quality, "quality")
        if qual_arr.size != size_arr.size:
            raise ValueError(f"quality has {qual_arr.size} entries but sizes has {size_arr.size}")
        mass = size_arr * qual_arr
    positive = mass > 0
    if not positive.any():
        raise ValueError("quality is zero for every non-empty source; no source can be sampled")
    # Work in log space so large sizes with small T neither overflow nor underflow to all-zero.
    logw = np.full(mass.shape, -np.inf)
    logw[positive] = np.log(mass[positive]) / T
    w = np.exp(logw - logw[positive].max())
    return (w / w.sum()).tolist()


def sample_plan(
    sizes: Sequence[int], weights: Sequence[float], total: int, seed: int
) -> list[tuple[int, int]]:
    """Return ``total`` (source_id, example_index) picks; a pure function of the arguments."""
    size_list = _source_sizes(sizes)
    weight_arr = _finite_nonneg(weights, "weights")
    if weight_arr.size != len(size_list):
        raise ValueError(f"weights has {weight_arr.size} entries but sizes has {len(size_list)}")
    if not weight_arr.any():
        raise ValueError("weights must contain at least one positive weight")
    for k, (n, w) in enumerate(zip(size_list, weight_arr, strict=True)):
        if w > 0 and n == 0:
            raise ValueError(f"source {k} has weight {w} but size 0; it cannot be sampled")
    if isinstance(total, bool) or not isinstance(total, (int, np.integer)) or total < 0:
        raise ValueError(f"total must be an int >= 0, got {total!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    counts = _apportion(weight_arr.tolist(), int(total))
    src_parts, idx_parts, key_parts = [], [], []
    offsets = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), 2**32]))).random(
        len(size_list)
    )
    for k, (n, c) in enumerate(zip(size_list, counts, strict=True)):
        if c == 0:
            continue
        src_parts.append(np.full(c, k, dtype=np.int64))
        idx_parts.append(_draw_passes(n, c, int(seed), k))
        # Pick j of source k sits at (j + u_k) / c_k: evenly spread, so any prefix of
        # fraction x holds floor(x * c_k - u_k) + 1 picks of k, within 1 of x * c_k.
        key_parts.append((np.arange(c) + offsets[k]) / c)
    if not src_parts:
        return []
    src = np.concatenate(src_parts)
    idx = np.concatenate(idx_parts)
    # Secondary key = source id keeps ties deterministic; keys rise with j inside a source,
    # so each source's passes keep their order in the plan.
    order = np.lexsort((src, np.concatenate(key_parts)))
    src_list, idx_list = src[order].tolist(), idx[order].tolist()
    # A million small tuples would trigger several full GC scans; they hold no cycles.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return list(zip(src_list, idx_list, strict=True))
    finally:
        if was_enabled:
            gc.enable()


def realised_mixture(plan: Sequence[tuple[int, int]], num_sources: int) -> list[int]:
    """Count how many picks of ``plan`` come from each of ``num_sources`` sources."""
    if isinstance(num_sources, bool) or not isinstance(num_sources, int) or num_sources < 1:
        raise ValueError(f"num_sources must be a positive int, got {num_sources!r}")
    counts = [0] * num_sources
    for source, _ in plan:
        if not 0 <= source < num_sources:
            raise ValueError(f"plan has source id {source}, outside [0, {num_sources})")
        counts[source] += 1
    return counts


def _apportion(weights: Sequence[float], total: int) -> list[int]:
    """Split ``total`` by largest remainder on ``total * w / sum(w)``; ties go to the lower index."""
    # Exact rationals: float floors could sum past total when the weights' sum is not exactly 1.
    fw = [Fraction(float(w)) for w in weights]
    norm = sum(fw)
    assert norm > 0, "caller checks that some weight is positive"
    quotas = [w * total / norm for w in fw]
    counts = [math.floor(q) for q in quotas]
    short = total - sum(counts)
    assert 0 <= short <= len(counts)
    by_remainder = sorted(range(len(counts)), key=lambda k: (-(quotas[k] - counts[k]), k))
    for k in by_remainder[:short]:
        counts[k] += 1
    return counts


def _draw_passes(size: int, count: int, seed: int, source: int) -> np.ndarray:
    """Draw ``count`` indices of a source in passes: each pass is a fresh permutation of ``range(size)``."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, source])))
    full, rest = divmod(count, size)
    parts = []
    if full:
        # One stream per source, row p = pass p: a Generator per pass would cost ~20 us
        # each and sources far smaller than their count can need 10^5+ passes.
        parts.append(rng.permuted(np.tile(np.arange(size, dtype=np.int64), (full, 1)), axis=1).ravel())
    if rest:
        # The last, partial pass subsamples without replacement (cheap even for huge sizes).
        parts.append(rng.choice(size, size=rest, replace=False).astype(np.int64))
    return np.concatenate(parts)


def _finite_nonneg(values: Sequence[float], name: str) -> np.ndarray:
    """Convert ``values`` to a 1-D float array, rejecting NaN, inf and negatives by name."""
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a sequence of numbers: {exc}") from exc
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a flat sequence, got shape {arr.shape}")
    bad = np.flatnonzero(~np.isfinite(arr) | (arr < 0))
    if bad.size:
        k = int(bad[0])
        raise ValueError(f"{name}[{k}] must be finite and >= 0, got {arr[k]}")
    return arr


def _source_sizes(sizes: Sequence[int]) -> list[int]:
    """Validate source sizes as non-negative ints."""
    out = []
    for k, n in enumerate(sizes):
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"sizes[{k}] must be an int >= 0, got {n!r}")
        out.append(int(n))
    if not out:
        raise ValueError("sizes must name at least one source")
    return out
