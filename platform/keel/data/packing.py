"""Sequence packing: group example lengths into bins of at most ``max_len`` tokens.

All strategies exploit that lengths and capacities are integers in ``[1, max_len]`` and
process runs of equal consecutive lengths in bulk, so packing a million examples takes
well under a couple of seconds in pure Python (numpy only for sorting and grouping).

- ``bfd``: best-fit decreasing. Bins are grouped by remaining capacity (a stack of bin
  ids per capacity value) and a Python int used as a bitset over capacity values finds
  the smallest capacity ``>= L`` with one shift and one lowest-set-bit step. Then a
  refinement pass repacks the items of the least-full bins (at most ``REFINE_ITEMS``
  items) by "largest item, then the subset of the rest that fills the bin best" (an exact
  subset sum over a bitset), kept only when it needs fewer bins: narrow length
  distributions, where BFD leaves no short items to fill bin tails (GSM8K), reach the
  lower bound ceil(ΣL / max_len) this way.
- ``ffd``: first-fit decreasing. A max segment tree over bins (in opening order) finds
  the leftmost bin with room; unopened leaves hold ``max_len``, so "open a new bin" is
  just "the leftmost unopened leaf".
- ``first_fit``: the same tree, arrival order.
- ``pad``: one item per bin, the padded baseline.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np

from keel.choices import PACKING_STRATEGIES as STRATEGIES

REFINE_ITEMS = 3000  # items of the least-full BFD bins that the refinement pass repacks


def pack(
    lengths: Sequence[int], max_len: int, strategy: str = "bfd", *, window: int | None = None
) -> list[list[int]]:
    """Pack items into bins of total length <= ``max_len``; returns bins of indices into ``lengths``."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown packing strategy {strategy!r}; valid strategies: {list(STRATEGIES)}")
    arr = _validate(lengths, max_len)
    if window is None:
        return _pack_array(arr, max_len, strategy, REFINE_ITEMS)
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive int or None, got {window!r}")
    bins: list[list[int]] = []
    # The refinement budget is shared by the windows, so many small windows cost no more than one.
    refine = REFINE_ITEMS * window // max(1, len(arr))
    # Windows are packed independently so every bin holds items from one window only.
    for start in range(0, len(arr), window):
        for b in _pack_array(arr[start : start + window], max_len, strategy, refine):
            bins.append([start + i for i in b])
    return bins


def packing_efficiency(lengths: Sequence[int], bins: Sequence[Sequence[int]], max_len: int) -> float:
    """Fraction of the ``len(bins) * max_len`` token slots filled by real tokens."""
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    if not bins:
        return 0.0
    used = sum(int(lengths[i]) for b in bins for i in b)
    return used / (len(bins) * max_len)


def _validate(lengths: Sequence[int], max_len: int) -> np.ndarray:
    """Check ``max_len`` and every length; return lengths as an int64 array."""
    if isinstance(max_len, bool) or not isinstance(max_len, (int, np.integer)) or max_len < 1:
        raise ValueError(f"max_len must be a positive int, got {max_len!r}")
    arr = np.asarray(lengths)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise ValueError(f"lengths must be a flat sequence of ints, got dtype {arr.dtype} shape {arr.shape}")
    arr = arr.astype(np.int64, copy=False)
    bad = np.flatnonzero((arr < 1) | (arr > max_len))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"item {i} has length {int(arr[i])}, outside [1, max_len={max_len}]")
    return arr


def _pack_array(arr: np.ndarray, max_len: int, strategy: str, refine_items: int = 0) -> list[list[int]]:
    """Dispatch one validated array to its strategy."""
    n = len(arr)
    if n == 0:
        return []
    if strategy == "pad":
        with _gc_paused():
            return [[i] for i in range(n)]
    if strategy == "first_fit":
        order = np.arange(n)
    else:
        # Stable sort on -length: longest first, ties in index order (determinism).
        order = np.argsort(-arr, kind="stable")
    values, counts = _runs(arr[order])
    if strategy == "bfd":
        bin_seq, take = _best_fit_runs(values, counts, max_len)
    else:
        bin_seq, take = _first_fit_runs(values, counts, max_len, int(arr.sum()))
    bin_of = np.repeat(np.asarray(bin_seq, dtype=np.int64), np.asarray(take, dtype=np.int64))
    assert len(bin_of) == n, "every item must be placed exactly once"
    bins = _group(order, bin_of)
    if strategy != "bfd" or refine_items <= 0:
        return bins
    # Fill and item count of every bin, straight from the placements (no pass over the bins).
    fills = np.bincount(bin_of, weights=arr[order], minlength=len(bins)).astype(np.int64)
    return _refine(arr, bins, fills, np.bincount(bin_of, minlength=len(bins)), max_len, refine_items)


def _runs(seq: np.ndarray) -> tuple[list[int], list[int]]:
    """Split ``seq`` into maximal runs of equal values: (value per run, run length)."""
    starts = np.concatenate(([0], np.flatnonzero(seq[1:] != seq[:-1]) + 1))
    counts = np.diff(np.append(starts, len(seq)))
    return seq[starts].tolist(), counts.tolist()


def _group(order: np.ndarray, bin_of: np.ndarray) -> list[list[int]]:
    """Turn per-placement bin ids into bins of original indices, in placement order."""
    perm = np.argsort(bin_of, kind="stable")
    items = order[perm].tolist()
    ends = np.cumsum(np.bincount(bin_of)).tolist()
    with _gc_paused():
        return [items[start:end] for start, end in zip([0, *ends[:-1]], ends, strict=True)]


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic GC while building many small acyclic lists (it would rescan them ~4x)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class _OpenBins:
    """Best-fit state: the open bins by remaining capacity (a stack of bin ids per capacity, a bitmask of the
    non-empty capacities), and the placements made so far (bin id and items placed, per step)."""

    __slots__ = ("buckets", "mask", "n_bins", "bin_seq", "take")

    def __init__(self) -> None:
        self.buckets: dict[int, list[int]] = {}  # remaining capacity -> stack of bin ids
        self.mask = 0  # bit c set <=> buckets[c] is non-empty
        self.n_bins = 0
        self.bin_seq: list[int] = []
        self.take: list[int] = []

    def push(self, cap: int, ids: list[int]) -> None:
        """Bins ``ids`` now have ``cap`` left (a full bin can never take another item, so it is dropped)."""
        if cap == 0:
            return
        stack = self.buckets.get(cap)
        if stack is None:
            self.buckets[cap] = list(ids)
            self.mask |= 1 << cap
        else:
            stack.extend(ids)

    def best(self, length: int) -> int | None:
        """The smallest remaining capacity that fits ``length``, or None when no open bin does."""
        above = self.mask >> length
        return length + (above & -above).bit_length() - 1 if above else None

    def open_fresh(self, length: int, remaining: int, max_len: int) -> None:
        """No open bin fits: place ``remaining`` items of ``length`` in ceil(remaining / q) fresh bins."""
        q = max_len // length
        full, rest = divmod(remaining, q)
        ids = list(range(self.n_bins, self.n_bins + full))
        self.n_bins += full
        self.bin_seq.extend(ids)
        self.take.extend([q] * full)
        self.push(max_len - q * length, ids)
        if rest:
            self.bin_seq.append(self.n_bins)
            self.take.append(rest)
            self.push(max_len - rest * length, [self.n_bins])
            self.n_bins += 1

    def fill(self, cap: int, length: int, remaining: int) -> int:
        """Place items of ``length`` into the bins of capacity ``cap``; returns how many are left."""
        stack = self.buckets[cap]
        q = cap // length
        full = min(len(stack), remaining // q)
        if full:
            ids = stack[-full:]
            del stack[-full:]
            self.bin_seq.extend(ids)
            self.take.extend([q] * full)
            remaining -= full * q
            self.push(cap - q * length, ids)
        if remaining and stack:
            # Fewer than q items left: they all go into the next best bin.
            assert remaining < q
            b = stack.pop()
            self.bin_seq.append(b)
            self.take.append(remaining)
            self.push(cap - remaining * length, [b])
            remaining = 0
        if not stack:
            del self.buckets[cap]
            self.mask ^= 1 << cap
        return remaining


def _best_fit_runs(values: list[int], counts: list[int], max_len: int) -> tuple[list[int], list[int]]:
    """Best-fit over runs of equal lengths; returns (bin id, items placed) per placement step.

    Within a run of length L the best bin (capacity c) stays best until it holds
    ``c // L`` more items: capacities in ``[L, c)`` were empty and its new capacity
    ``c - q*L`` is below L. So each bucket visit places whole blocks at once.
    """
    bins = _OpenBins()
    for length, remaining in zip(values, counts, strict=True):
        while remaining:
            cap = bins.best(length)
            if cap is None:
                bins.open_fresh(length, remaining, max_len)
                break
            remaining = bins.fill(cap, length, remaining)
    return bins.bin_seq, bins.take


def _first_fit_runs(
    values: list[int], counts: list[int], max_len: int, total: int
) -> tuple[list[int], list[int]]:
    """First-fit over runs of equal lengths using a max segment tree over bins."""
    # Any first-fit packing has at most one bin at most half full, so bins <= 2*total/max_len + 1.
    bound = min(sum(counts), 2 * (-(-total // max_len)) + 1)
    size = 1 << max(0, (bound - 1).bit_length())
    tree = [max_len] * (2 * size)  # unopened bins have capacity max_len
    bin_seq: list[int] = []
    take: list[int] = []
    for length, remaining in zip(values, counts, strict=True):
        assert tree[1] >= length, "segment tree must always hold a bin that fits"
        while remaining:
            i = 1
            while i < size:  # descend to the leftmost leaf with capacity >= length
                i <<= 1
                if tree[i] < length:
                    i += 1
            cap = tree[i]
            # The leftmost fitting bin stays leftmost until it holds cap // length more items.
            k = cap // length
            if k > remaining:
                k = remaining
            remaining -= k
            bin_seq.append(i - size)
            take.append(k)
            tree[i] = cap - k * length
            i >>= 1
            while i:
                left, right = tree[2 * i], tree[2 * i + 1]
                best = left if left > right else right
                if tree[i] == best:
                    break  # ancestors are unchanged too
                tree[i] = best
                i >>= 1
    return bin_seq, take


def _refine(arr: np.ndarray, bins: list[list[int]], fills: np.ndarray, sizes: np.ndarray, max_len: int,
            budget: int) -> list[list[int]]:
    """Repack the items of the least-full bins with :func:`_exact_fill`; kept only if it saves bins.

    ``fills[b]`` and ``sizes[b]``: tokens and items in ``bins[b]``.
    """
    if len(bins) <= -(-int(arr.sum()) // max_len):
        return bins  # already at the lower bound
    order = np.argsort(fills, kind="stable")  # least full first, ties by bin order (determinism)
    k = max(2, int(np.searchsorted(np.cumsum(sizes[order]), budget, side="right")))
    items = [i for b in order[:k] for i in bins[b]]
    new = _exact_fill([int(arr[i]) for i in items], max_len)
    if len(new) >= k:
        return bins
    return [bins[b] for b in order[k:].tolist()] + [[items[j] for j in b] for b in new]


def _exact_fill(lengths: list[int], max_len: int) -> list[list[int]]:
    """Bins of positions into ``lengths``: the largest remaining item, then the best-filling subset of the rest."""
    by_len: dict[int, list[int]] = {}  # length -> positions, in index order
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        by_len.setdefault(lengths[i], []).append(i)
    bins = []
    while by_len:
        top = max(by_len)
        b = [by_len[top].pop(0)]
        if not by_len[top]:
            del by_len[top]
        used = _subset_fill({n: len(v) for n, v in by_len.items()}, max_len - top)
        for n, k in used.items():
            b += by_len[n][:k]
            del by_len[n][:k]
            if not by_len[n]:
                del by_len[n]
        bins.append(b)
    return bins


def _subset_fill(counts: dict[int, int], cap: int) -> dict[int, int]:
    """How many items of each length (at most ``counts``) make the largest total <= ``cap``.

    Bounded subset sum: each length's multiplicity is split in powers of two, a Python int is
    the bitset of reachable totals, and the state before each piece is kept to backtrack.
    """
    pieces = []  # (total length, length, items)
    for length in sorted(counts, reverse=True):
        left, k = min(counts[length], cap // length), 1
        while left > 0:
            take = min(k, left)
            pieces.append((take * length, length, take))
            left, k = left - take, 2 * k
    mask = (1 << (cap + 1)) - 1
    reach, states = 1, []
    for w, _, _ in pieces:
        states.append(reach)
        reach |= (reach << w) & mask
    target = reach.bit_length() - 1
    used: dict[int, int] = {}
    for (w, length, k), before in zip(reversed(pieces), reversed(states)):
        if target and not (before >> target) & 1:  # this total needs the piece
            used[length] = used.get(length, 0) + k
            target -= w
    assert target == 0, "backtracking must reach the empty sum"
    return used
