"""Data mixing: temperature-scaled source weights and a deterministic sampling plan.

``mixture_weights`` gives p_k proportional to (N_k * q_k) ** (1 / T): T = 1 samples in
proportion to (quality-weighted) size, T -> inf flattens towards uniform.

``sample_plan`` turns weights into an exact, reproducible list of (source, example)
picks: counts by largest-remainder apportionment, examples drawn in whole passes
without replacement, and sources interleaved evenly so every prefix of the plan
already has (within one example per source) the mixture proportions.

A ``Schedule`` lets the mixture change over training: points ``(at, weights)`` with
``at`` a fraction of training, held before the first and after the last point, and
interpolated in between (``linear`` on the normalised mixtures, or ``step``).
``segment_plans`` samples consecutive segments each at its own mixture while every
source keeps one pass stream across segments (repeats only after a pass is used up).
"""

from __future__ import annotations

import bisect
import gc
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from keel.choices import INTERPOLATIONS
from keel.errors import UserError


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
        raise UserError("quality is zero for every non-empty source; no source can be sampled")
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
    weight_arr = _check_weights(weights, size_list, "weights")
    _check_count(total, "total")
    _check_count(seed, "seed")
    counts = _apportion(weight_arr.tolist(), int(total))
    draws = [_draw_passes(n, c, int(seed), k) if c else None for k, (n, c) in enumerate(zip(size_list, counts))]
    return _interleave(counts, draws, _offsets(int(seed), len(size_list)))


def segment_plans(
    sizes: Sequence[int],
    weights: Sequence[Sequence[float]],
    totals: Sequence[int],
    seed: int,
    keep: Callable[[int, list[tuple[int, int]]], int] | None = None,
) -> list[list[tuple[int, int]]]:
    """One plan per segment: ``totals[s]`` picks at ``weights[s]``; each source's passes run on across segments.

    ``keep(s, plan)`` may cut segment ``s`` to a prefix (any prefix holds the mixture, within
    one pick per source); the next segment then continues right after the kept picks.
    """
    size_list = _source_sizes(sizes)
    if len(weights) != len(totals) or not totals:
        raise ValueError(f"need one weight vector per segment: {len(weights)} weights, {len(totals)} totals")
    arrs = [_check_weights(w, size_list, f"weights[{s}]") for s, w in enumerate(weights)]
    for s, t in enumerate(totals):
        _check_count(t, f"totals[{s}]")
    _check_count(seed, "seed")
    counts = [_apportion(w.tolist(), int(t)) for w, t in zip(arrs, totals)]
    # One stream per source, cut into consecutive chunks: segment s continues where s-1 stopped.
    streams = []
    for k, n in enumerate(size_list):
        c = sum(seg[k] for seg in counts)
        streams.append(_draw_passes(n, c, int(seed), k) if c else np.zeros(0, dtype=np.int64))
    cursors, offsets, plans = [0] * len(size_list), _offsets(int(seed), len(size_list)), []
    for s, seg in enumerate(counts):
        draws = [streams[k][cursors[k]:cursors[k] + c] for k, c in enumerate(seg)]
        plan = _interleave(seg, draws, offsets)
        if keep is not None:
            m = keep(s, plan)
            if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or not 0 <= m <= len(plan):
                raise ValueError(f"keep must return a prefix length in [0, {len(plan)}], got {m!r}")
            plan = plan[:m]
        # Picks of a source keep their stream order in the plan, so the kept ones are a stream prefix.
        cursors = [cur + c for cur, c in zip(cursors, realised_mixture(plan, len(size_list)))]
        plans.append(plan)
    return plans


def _interleave(
    counts: Sequence[int], draws: Sequence[np.ndarray | None], offsets: np.ndarray
) -> list[tuple[int, int]]:
    """Spread ``counts[k]`` picks of each source (indices ``draws[k]``) evenly over the plan."""
    src_parts, idx_parts, key_parts = [], [], []
    for k, c in enumerate(counts):
        if c == 0:
            continue
        src_parts.append(np.full(c, k, dtype=np.int64))
        idx_parts.append(draws[k])
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


@dataclass(frozen=True)
class Schedule:
    """Mixtures at fractions of training: ``points`` of ``(at, weights)``, normalised on construction.

    Before the first point the first mixture holds, after the last the last; in between
    ``linear`` interpolates the normalised mixtures and ``step`` holds the previous one.
    A single point is the static mixture.
    """

    points: tuple[tuple[float, tuple[float, ...]], ...]
    interpolation: str = "linear"

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {list(INTERPOLATIONS)}, got {self.interpolation!r}")
        object.__setattr__(self, "points", _normalised_points(self.points))

    @property
    def static(self) -> bool:
        """True when the mixture never changes (one point)."""
        return len(self.points) == 1

    def mixture(self, f: float) -> list[float]:
        """The mixture at training fraction ``f`` (clamped to the first/last point)."""
        ats = [a for a, _ in self.points]
        if f <= ats[0]:
            return list(self.points[0][1])
        if f >= ats[-1]:
            return list(self.points[-1][1])
        i = bisect.bisect_right(ats, f) - 1  # ats[i] <= f < ats[i + 1]
        lo, hi = np.asarray(self.points[i][1]), np.asarray(self.points[i + 1][1])
        if self.interpolation == "step":
            return lo.tolist()
        t = (f - ats[i]) / (ats[i + 1] - ats[i])
        return ((1 - t) * lo + t * hi).tolist()

    def mean(self, lo: float, hi: float) -> list[float]:
        """The mixture averaged over fractions ``[lo, hi]`` (exact: it is piecewise linear or constant)."""
        if not 0 <= lo <= hi:
            raise ValueError(f"need 0 <= lo <= hi, got [{lo}, {hi}]")
        if hi == lo or hi <= self.points[0][0] or lo >= self.points[-1][0]:
            return self.mixture(lo)  # a single point, or all before the first / after the last point
        cuts = [lo, *[a for a, _ in self.points if lo < a < hi], hi]
        total = np.zeros(len(self.points[0][1]))
        for x0, x1 in zip(cuts[:-1], cuts[1:]):
            if self.interpolation == "step":  # constant on [x0, x1)
                total += (x1 - x0) * np.asarray(self.mixture(x0))
            else:  # linear on [x0, x1]: the trapezoid is exact
                total += (x1 - x0) * (np.asarray(self.mixture(x0)) + np.asarray(self.mixture(x1))) / 2
        return (total / total.sum()).tolist()


def _normalised_points(points: Sequence) -> tuple[tuple[float, tuple[float, ...]], ...]:
    """Validate schedule points (``at`` in [0, 1] strictly increasing, weights >= 0 not all 0) and normalise."""
    if not points:
        raise ValueError("a schedule needs at least one point")
    out, prev, width = [], -math.inf, None
    for i, (at, weights) in enumerate(points):
        if isinstance(at, bool) or not isinstance(at, (int, float)) or not 0 <= at <= 1:
            raise ValueError(f"points[{i}].at must be a number in [0, 1], got {at!r}")
        if at <= prev:
            raise ValueError(f"points[{i}].at must be > points[{i - 1}].at ({prev}), got {at}")
        arr = _finite_nonneg(weights, f"points[{i}].weights")
        width = arr.size if width is None else width
        if arr.size != width or not arr.any():
            raise ValueError(f"points[{i}].weights must have {width} entries, not all 0, got {arr.tolist()}")
        out.append((float(at), tuple((arr / arr.sum()).tolist())))
        prev = at
    return tuple(out)


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


def _check_weights(weights: Sequence[float], sizes: list[int], name: str) -> np.ndarray:
    """Weights as an array: one per source, some positive, none positive on an empty source."""
    arr = _finite_nonneg(weights, name)
    if arr.size != len(sizes):
        raise ValueError(f"{name} has {arr.size} entries but sizes has {len(sizes)}")
    if not arr.any():
        raise ValueError(f"{name} must contain at least one positive weight")
    for k, (n, w) in enumerate(zip(sizes, arr, strict=True)):
        if w > 0 and n == 0:
            raise UserError(f"source {k} has weight {w} but size 0; it cannot be sampled")
    return arr


def _check_count(value: int, name: str) -> None:
    """Reject anything but an int >= 0 (bools included), naming the argument."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")


def _offsets(seed: int, num_sources: int) -> np.ndarray:
    """Per-source interleave phases u_k in [0, 1), from the seed's own stream."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, 2**32]))).random(num_sources)


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
