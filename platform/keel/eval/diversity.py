"""Diversity diagnostics for sampled completions: distinct-n, repetition, lengths, mode collapse.

Everything counts whitespace tokens (``str.split()``), so numbers are comparable across
tokenizers. Stdlib only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

# Metrics compared against the base model by mode_collapse_warnings (higher = more diverse).
COLLAPSE_METRICS = ("distinct_2", "mean_entropy")


def _ngrams(words: Sequence[str], n: int) -> list[tuple[str, ...]]:
    """Consecutive n-grams of a word list."""
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def _check_n(n: int) -> None:
    """Raise ValueError unless n is a positive int."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")


def distinct_n(texts: Iterable[str], n: int) -> float:
    """Unique n-grams / total n-grams over all texts pooled (0.0 when there are none)."""
    _check_n(n)
    grams = [g for text in texts for g in _ngrams(text.split(), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def _repeat_rate(text: str, n: int) -> float | None:
    """Fraction of a text's n-grams already seen earlier in it; None when it has no n-grams."""
    grams = _ngrams(text.split(), n)
    if not grams:
        return None
    seen: set[tuple[str, ...]] = set()
    repeats = 0
    for g in grams:
        repeats += g in seen
        seen.add(g)
    return repeats / len(grams)


def repeated_ngram_rate(texts: Iterable[str], n: int = 4) -> float:
    """Mean over texts (those with at least one n-gram) of the within-text repeated n-gram fraction."""
    _check_n(n)
    rates = [r for r in (_repeat_rate(t, n) for t in texts) if r is not None]
    return math.fsum(rates) / len(rates) if rates else 0.0


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default) of an already sorted, non-empty list."""
    pos = (len(sorted_values) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def length_stats(texts: Iterable[str]) -> dict[str, float]:
    """Mean, median, 95th percentile and max length in whitespace tokens (zeros for no texts)."""
    lengths = sorted(len(t.split()) for t in texts)
    if not lengths:
        return {"count": 0, "mean": 0.0, "p50": 0.0, "p95": 0.0, "max": 0}
    return {
        "count": len(lengths),
        "mean": sum(lengths) / len(lengths),
        "p50": _percentile(lengths, 50),
        "p95": _percentile(lengths, 95),
        "max": lengths[-1],
    }


def diversity_report(texts: Sequence[str], entropies: Iterable[float] | None = None) -> dict:
    """distinct-1/2/3, repeated 4-gram rate, length stats and (if given) mean per-token entropy."""
    texts = list(texts)
    report: dict = {
        "n_texts": len(texts),
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "distinct_3": distinct_n(texts, 3),
        "repeated_4gram_rate": repeated_ngram_rate(texts, 4),
        "length_words": length_stats(texts),
        "mean_entropy": None,
        "entropy_tokens": 0,
    }
    if entropies is not None:
        values = [float(e) for e in entropies]
        report["entropy_tokens"] = len(values)
        report["mean_entropy"] = math.fsum(values) / len(values) if values else None
    return report


def mode_collapse_warnings(tuned: dict, base: dict, drop: float = 0.3) -> list[str]:
    """Warnings for each of distinct-2 and mean entropy that fell more than ``drop`` (relative) below base."""
    if not 0.0 < drop < 1.0:
        raise ValueError(f"drop must be in (0, 1), got {drop}")
    warnings: list[str] = []
    for key in COLLAPSE_METRICS:
        t, b = tuned.get(key), base.get(key)
        if t is None or b is None or b <= 0:
            continue  # not measured on one side, or nothing to fall from
        fall = (b - t) / b
        if fall > drop:
            warnings.append(
                f"possible mode collapse: {key} fell {fall:.0%} (base {b:.4g} -> tuned {t:.4g}), "
                f"more than the {drop:.0%} threshold"
            )
    return warnings
