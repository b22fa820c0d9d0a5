"""Property tests for keel.data.mixing."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from keel.data.mixing import Schedule, mixture_weights, realised_mixture, sample_plan, segment_plans


def test_weights_match_hand_computation() -> None:
    # T=2: sqrt(100)=10, sqrt(400)=20, sqrt(0)=0 -> 1/3, 2/3, 0.
    assert mixture_weights([100, 400, 0], T=2.0) == pytest.approx([1 / 3, 2 / 3, 0.0])
    # Quality multiplies size before the temperature: (10*4)^1, (30*1)^1, (60*0.5)^1 -> 40:30:30.
    assert mixture_weights([10, 30, 60], T=1.0, quality=[4, 1, 0.5]) == pytest.approx([0.4, 0.3, 0.3])


def test_t1_is_proportional_and_large_t_near_uniform() -> None:
    sizes = [1, 10, 1000, 100_000]
    assert mixture_weights(sizes) == pytest.approx([s / sum(sizes) for s in sizes])
    assert mixture_weights(sizes, T=1e6) == pytest.approx([0.25] * 4, abs=1e-4)
    assert mixture_weights(sizes, T=math.inf) == [0.25] * 4
    assert mixture_weights([5, 0, 7], T=math.inf) == [0.5, 0.0, 0.5]


def test_quality_zero_drops_a_source() -> None:
    assert mixture_weights([10, 10], quality=[1, 0]) == [1.0, 0.0]


def test_extreme_sizes_stay_finite() -> None:
    w = mixture_weights([1e300, 1e-300, 1.0], T=0.01)
    assert w == pytest.approx([1.0, 0.0, 0.0]) and all(math.isfinite(x) for x in w)


@settings(derandomize=True, max_examples=100, deadline=None)
@given(
    st.lists(st.floats(0, 1e9), min_size=1, max_size=8).filter(any),
    st.floats(0.05, 50),
)
def test_weights_are_a_distribution_ordered_like_sizes(sizes: list[float], T: float) -> None:
    w = mixture_weights(sizes, T=T)
    assert sum(w) == pytest.approx(1.0)
    assert all(wi == 0.0 for wi, s in zip(w, sizes, strict=True) if s == 0)
    for i in range(len(sizes)):
        for j in range(len(sizes)):
            if sizes[i] < sizes[j]:
                assert w[i] <= w[j]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"sizes": [1, 2], "T": 0}, "T"),
        ({"sizes": [1, 2], "T": -1.0}, "T"),
        ({"sizes": [1, 2], "T": math.nan}, "T"),
        ({"sizes": [1, -2]}, "sizes"),
        ({"sizes": [0, 0]}, "sizes"),
        ({"sizes": []}, "sizes"),
        ({"sizes": [1, math.inf]}, "sizes"),
        ({"sizes": [1, 2], "quality": [1]}, "quality"),
        ({"sizes": [1, 2], "quality": [1, -1]}, "quality"),
        ({"sizes": [1, 2], "quality": [0, 0]}, "quality"),
    ],
)
def test_invalid_weight_arguments_raise(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        mixture_weights(**kwargs)


@pytest.mark.parametrize(
    ("args", "name"),
    [
        (([3, 4], [0.5], 10, 0), "weights"),
        (([3, 4], [0.5, -0.5], 10, 0), "weights"),
        (([3, 4], [0, 0], 10, 0), "weights"),
        (([3, 0], [0.5, 0.5], 10, 0), "source 1"),
        (([3, -1], [0.5, 0.5], 10, 0), "sizes"),
        (([3, 4], [0.5, 0.5], -1, 0), "total"),
        (([3, 4], [0.5, 0.5], 10, -3), "seed"),
    ],
)
def test_invalid_plan_arguments_raise(args: tuple, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        sample_plan(*args)


def test_realised_mixture_rejects_unknown_source() -> None:
    assert realised_mixture([(0, 1), (2, 0), (0, 0)], 3) == [2, 0, 1]
    with pytest.raises(ValueError, match="source id 3"):
        realised_mixture([(3, 0)], 3)


plan_cases = st.tuples(
    st.lists(st.integers(1, 40), min_size=1, max_size=5),
    st.data(),
    st.integers(0, 400),
    st.integers(0, 2**32),
)


def _weights(data: st.DataObject, k: int) -> list[float]:
    raw = data.draw(st.lists(st.floats(0, 10), min_size=k, max_size=k).filter(any))
    return [x / sum(raw) for x in raw]


@settings(derandomize=True, max_examples=120, deadline=None)
@given(plan_cases)
def test_plan_counts_passes_and_determinism(case: tuple) -> None:
    sizes, data, total, seed = case
    weights = _weights(data, len(sizes))
    plan = sample_plan(sizes, weights, total, seed)
    assert plan == sample_plan(sizes, weights, total, seed)
    assert len(plan) == total
    assert all(type(s) is int and type(i) is int for s, i in plan)
    counts = realised_mixture(plan, len(sizes))
    assert all(abs(c - total * w) < 1 for c, w in zip(counts, weights, strict=True))
    for k, n in enumerate(sizes):
        picks = [i for s, i in plan if s == k]
        assert all(0 <= i < n for i in picks)
        # Pass property: each consecutive block of n picks is a permutation of range(n).
        for start in range(0, len(picks), n):
            block = picks[start : start + n]
            assert len(set(block)) == len(block)


@settings(derandomize=True, max_examples=60, deadline=None)
@given(plan_cases)
def test_every_prefix_tracks_the_mixture(case: tuple) -> None:
    sizes, data, total, seed = case
    weights = _weights(data, len(sizes))
    plan = sample_plan(sizes, weights, total, seed)
    counts = realised_mixture(plan, len(sizes))
    # Each source's own error is in (-1, 1]; re-normalising by t instead of the interleave
    # key mixes in the others', so the worst case is max(1, K - 1) picks.
    bound = max(1, len(sizes) - 1) + 1e-9
    running = [0] * len(sizes)
    for t, (s, _) in enumerate(plan, start=1):
        running[s] += 1
        frac = t / total
        assert all(abs(r - frac * c) <= bound for r, c in zip(running, counts, strict=True))


def test_large_source_is_subsampled_without_replacement() -> None:
    plan = sample_plan([10**9, 5], [0.5, 0.5], 1000, seed=7)
    big = [i for s, i in plan if s == 0]
    assert len(big) == 500 and len(set(big)) == 500


def test_different_seed_changes_order() -> None:
    sizes, weights = [50, 80, 30], [0.2, 0.5, 0.3]
    a = sample_plan(sizes, weights, 500, seed=1)
    b = sample_plan(sizes, weights, 500, seed=2)
    assert a != b
    assert realised_mixture(a, 3) == realised_mixture(b, 3)


def test_zero_total_and_zero_weight_source() -> None:
    assert sample_plan([3, 4], [0.5, 0.5], 0, seed=0) == []
    plan = sample_plan([3, 0], [1.0, 0.0], 7, seed=0)
    assert realised_mixture(plan, 2) == [7, 0]


def _sched(points, interpolation="linear") -> Schedule:
    return Schedule(tuple((at, tuple(w)) for at, w in points), interpolation)


def test_schedule_linear_interpolates_normalised_mixtures_and_clamps() -> None:
    s = _sched([(0.2, [3, 1]), (0.6, [0, 2])])  # normalised: [0.75, 0.25] -> [0, 1]
    assert s.points == ((0.2, (0.75, 0.25)), (0.6, (0.0, 1.0)))
    assert s.mixture(0.0) == s.mixture(0.2) == [0.75, 0.25]  # before the first point: the first mixture
    assert s.mixture(0.4) == pytest.approx([0.375, 0.625])
    assert s.mixture(0.5) == pytest.approx([0.1875, 0.8125])
    assert s.mixture(0.6) == s.mixture(1.0) == [0.0, 1.0]  # after the last point: the last mixture
    assert not s.static and _sched([(0.5, [1, 1])]).static


def test_schedule_step_holds_the_previous_point() -> None:
    s = _sched([(0.0, [1, 0, 0]), (0.3, [0, 1, 0]), (0.7, [0, 0, 1])], "step")
    assert s.mixture(0.29) == [1.0, 0.0, 0.0]
    assert s.mixture(0.3) == s.mixture(0.69) == [0.0, 1.0, 0.0]
    assert s.mixture(0.7) == s.mixture(1.0) == [0.0, 0.0, 1.0]


@settings(derandomize=True, max_examples=60, deadline=None)
@given(
    st.lists(st.floats(0, 1), min_size=1, max_size=4, unique=True),
    st.data(),
    st.sampled_from(["linear", "step"]),
    st.floats(0, 1),
    st.floats(0, 1),
)
def test_schedule_mean_is_the_average_over_the_interval(ats, data, interpolation, a, b) -> None:
    points = [(at, _weights(data, 3)) for at in sorted(ats)]
    s = _sched(points, interpolation)
    lo, hi = min(a, b), max(a, b)
    mean = s.mean(lo, hi)
    assert sum(mean) == pytest.approx(1.0) and all(m >= 0 for m in mean)
    if hi - lo > 1e-3:  # midpoint rule on a fine grid; step jumps cost at most 2 cells per point
        grid = [lo + (hi - lo) * (i + 0.5) / 4000 for i in range(4000)]
        numeric = [sum(s.mixture(f)[k] for f in grid) / len(grid) for k in range(3)]
        assert mean == pytest.approx(numeric, abs=2 * len(points) / 4000 + 1e-9)


@pytest.mark.parametrize(
    ("points", "interpolation", "needle"),
    [
        ([], "linear", "at least one point"),
        ([(0.5, [1, 0]), (0.5, [0, 1])], "linear", r"points\[1\]\.at must be >"),
        ([(0.6, [1, 0]), (0.2, [0, 1])], "linear", r"points\[1\]\.at must be >"),
        ([(1.5, [1, 0])], "linear", r"points\[0\]\.at must be a number in \[0, 1\]"),
        ([(-0.1, [1, 0])], "linear", r"points\[0\]\.at"),
        ([(0.0, [1, -1])], "linear", r"points\[0\]\.weights\[1\] must be finite and >= 0"),
        ([(0.0, [0, 0])], "linear", "not all 0"),
        ([(0.0, [1, 0]), (1.0, [1, 0, 0])], "linear", r"points\[1\]\.weights must have 2 entries"),
        ([(0.0, [1, 0])], "cubic", "interpolation"),
    ],
)
def test_invalid_schedules_raise(points, interpolation, needle) -> None:
    with pytest.raises(ValueError, match=needle):
        _sched(points, interpolation)


@settings(derandomize=True, max_examples=60, deadline=None)
@given(plan_cases)
def test_one_segment_is_the_fixed_mixture_plan(case: tuple) -> None:
    sizes, data, total, seed = case
    weights = _weights(data, len(sizes))
    assert segment_plans(sizes, [weights], [total], seed) == [sample_plan(sizes, weights, total, seed)]


@settings(derandomize=True, max_examples=80, deadline=None)
@given(
    st.lists(st.integers(1, 30), min_size=1, max_size=4),
    st.data(),
    st.lists(st.integers(0, 120), min_size=1, max_size=6),
    st.integers(0, 2**32),
)
def test_segments_realise_their_mixture_and_continue_each_pass(sizes, data, totals, seed) -> None:
    weights = [_weights(data, len(sizes)) for _ in totals]
    cut = data.draw(st.lists(st.floats(0, 1), min_size=len(totals), max_size=len(totals)))
    for keep in (None, lambda s, plan: int(cut[s] * len(plan))):  # keep: a prefix of each segment
        plans = segment_plans(sizes, weights, totals, seed, keep)
        assert plans == segment_plans(sizes, weights, totals, seed, keep)
        for s, (plan, w, t) in enumerate(zip(plans, weights, totals, strict=True)):
            assert len(plan) == (t if keep is None else int(cut[s] * t))
            counts = realised_mixture(plan, len(sizes))
            # The kept prefix holds the mixture within one pick per source (K - 1 as re-normalised).
            tol = 1 if keep is None else max(1, len(sizes) - 1) + 1e-9
            assert all(abs(c - len(plan) * wk) <= tol for c, wk in zip(counts, w, strict=True))
        for k, n in enumerate(sizes):
            # One permutation cursor per source across segments: every whole block of n kept
            # picks is a full pass over the source (nothing repeats early, nothing is skipped).
            picks = [i for plan in plans for s, i in plan if s == k]
            assert all(0 <= i < n for i in picks)
            for start in range(0, len(picks), n):
                block = picks[start : start + n]
                assert len(set(block)) == len(block) and (len(block) < n or set(block) == set(range(n)))


def test_segment_plans_reject_bad_arguments() -> None:
    with pytest.raises(ValueError, match="one weight vector per segment"):
        segment_plans([3, 4], [[0.5, 0.5]], [5, 5], 0)
    with pytest.raises(ValueError, match=r"weights\[1\] must contain at least one positive"):
        segment_plans([3, 4], [[0.5, 0.5], [0, 0]], [5, 5], 0)
    with pytest.raises(ValueError, match=r"totals\[0\]"):
        segment_plans([3, 4], [[0.5, 0.5]], [-1], 0)
    with pytest.raises(ValueError, match="source 1 has weight"):
        segment_plans([3, 0], [[1, 0], [0.5, 0.5]], [5, 5], 0)
    with pytest.raises(ValueError, match=r"keep must return a prefix length in \[0, 5\]"):
        segment_plans([3, 4], [[0.5, 0.5]], [5], 0, keep=lambda s, plan: 6)
