"""pass@k: matches the Codex reference implementation and the exact binomial formula; report and verdict."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from keel.eval import pass_at_k
from keel.eval.passk import pass_at_k_report, rl_viability


def codex_reference(n: int, c: int, k: int) -> float:
    """Reference implementation from Chen et al. 2021, Figure 3."""
    if n - c < k:
        return 1.0
    return 1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1))


def exact(n: int, c: int, k: int) -> Fraction:
    """1 - C(n-c, k) / C(n, k) in exact rational arithmetic."""
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


@st.composite
def nck(draw, max_n: int = 2000):
    n = draw(st.integers(1, max_n))
    return n, draw(st.integers(0, n)), draw(st.integers(1, n))


@settings(max_examples=300, deadline=None, derandomize=True)
@given(nck())
def test_matches_codex_reference(args):
    n, c, k = args
    assert pass_at_k(n, c, k) == pytest.approx(codex_reference(n, c, k), rel=1e-9, abs=1e-12)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(nck(max_n=60))
def test_matches_exact_binomial_formula(args):
    n, c, k = args
    assert pass_at_k(n, c, k) == pytest.approx(float(exact(n, c, k)), rel=1e-12, abs=1e-15)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(nck(max_n=500))
def test_monotone_in_k_and_c(args):
    n, c, k = args
    p = pass_at_k(n, c, k)
    if k < n:
        assert pass_at_k(n, c, k + 1) >= p - 1e-12
    if c < n:
        assert pass_at_k(n, c + 1, k) >= p - 1e-12


def test_edge_cases():
    assert pass_at_k(10, 0, 1) == 0.0
    assert pass_at_k(10, 0, 10) == 0.0
    assert pass_at_k(10, 8, 3) == 1.0  # n - c = 2 < k
    assert pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(10, 1, 10) == 1.0  # k = n and any pass
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is c / n
    assert pass_at_k(1, 1, 1) == 1.0


def test_large_n_is_stable():
    n = 10_000
    assert pass_at_k(n, 1, 1) == pytest.approx(1e-4, rel=1e-12)  # no cancellation in 1 - prod
    assert pass_at_k(n, 137, 1) == pytest.approx(137 / n, rel=1e-12)
    for c, k in [(1, 100), (50, 10), (5000, 5000), (9_000, 3), (1, 9_999)]:
        assert pass_at_k(n, c, k) == pytest.approx(float(exact(n, c, k)), rel=1e-9)
        assert 0.0 <= pass_at_k(n, c, k) <= 1.0
    assert pass_at_k(n, 9_999, 2) == 1.0


@pytest.mark.parametrize("n,c,k", [(10, -1, 1), (10, 11, 1), (10, 5, 0), (10, 5, 11), (0, 0, 1), (10, 5, 1.0)])
def test_invalid_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_report_mean_and_ci():
    results = [(10, 0), (10, 5), (10, 10), (10, 1)]
    report = pass_at_k_report(results, ks=[1, 5])
    per1 = [0.0, 0.5, 1.0, 0.1]
    mean1 = sum(per1) / 4
    se1 = float(np.std(per1, ddof=1) / 2)
    r1 = report[1]
    assert r1["mean"] == pytest.approx(mean1)
    assert r1["stderr"] == pytest.approx(se1)
    assert r1["ci_low"] == pytest.approx(max(0.0, mean1 - 1.959964 * se1), rel=1e-5)
    assert r1["ci_high"] == pytest.approx(min(1.0, mean1 + 1.959964 * se1), rel=1e-5)
    assert r1["n_prompts"] == 4
    assert report[5]["mean"] >= report[1]["mean"]
    assert 0.0 <= report[5]["ci_low"] <= report[5]["mean"] <= report[5]["ci_high"] <= 1.0


def test_report_ci_clipped_and_narrower_at_lower_confidence():
    results = [(20, 20)] * 3 + [(20, 19)]
    wide, narrow = pass_at_k_report(results, [1], 0.99)[1], pass_at_k_report(results, [1], 0.5)[1]
    assert wide["ci_high"] == 1.0
    assert narrow["ci_high"] - narrow["ci_low"] < wide["ci_high"] - wide["ci_low"]


def test_report_single_prompt_is_uninformative():
    r = pass_at_k_report([(10, 3)], [1])[1]
    assert r["mean"] == pytest.approx(0.3)
    assert (r["ci_low"], r["ci_high"]) == (0.0, 1.0)


@pytest.mark.parametrize("kwargs", [{"results": [], "ks": [1]}, {"results": [(5, 1)], "ks": []},
                                    {"results": [(5, 1)], "ks": [6]},
                                    {"results": [(5, 1)], "ks": [1], "confidence": 1.0}])
def test_report_invalid(kwargs):
    with pytest.raises(ValueError):
        pass_at_k_report(**kwargs)


def test_rl_viability():
    assert rl_viability(0.01).startswith("NOT VIABLE")
    assert "RL is likely to fail" in rl_viability(0.049)
    assert rl_viability(0.05).startswith("VIABLE")
    assert rl_viability(0.2, threshold=0.3).startswith("NOT VIABLE")
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError):
            rl_viability(bad)
