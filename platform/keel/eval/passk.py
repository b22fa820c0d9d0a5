"""pass@k: the unbiased estimator of Chen et al. 2021 ("Codex"), a per-prompt report, and an RL go/no-go."""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist


def _validate(n: int, c: int, k: int) -> None:
    """Raise ValueError unless 0 <= c <= n and 1 <= k <= n."""
    for name, value in (("n", n), ("c", c), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an int, got {value!r}")
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got c={c}, n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c passed: 1 - C(n-c, k) / C(n, k)."""
    _validate(n, c, k)
    if c == 0:
        return 0.0
    if n - c < k:  # every k-subset contains a passing sample
        return 1.0
    # C(n-c,k)/C(n,k) = prod_{i=n-c+1}^{n} (1 - k/i). Summing logs and using expm1 keeps full
    # relative precision when the answer is tiny (e.g. n=10_000, c=1), where 1 - prod would cancel.
    log_fail = math.fsum(math.log1p(-k / i) for i in range(n - c + 1, n + 1))
    return min(1.0, max(0.0, -math.expm1(log_fail)))


def _mean_ci(values: Sequence[float], z: float) -> dict[str, float]:
    """Mean, standard error and a normal-approximation interval clipped to [0, 1]."""
    m = len(values)
    mean = math.fsum(values) / m
    if m < 2:
        # One prompt says nothing about spread over prompts: report the uninformative interval.
        return {"mean": mean, "stderr": math.nan, "ci_low": 0.0, "ci_high": 1.0}
    var = math.fsum((v - mean) ** 2 for v in values) / (m - 1)
    stderr = math.sqrt(var / m)
    return {
        "mean": mean,
        "stderr": stderr,
        "ci_low": max(0.0, mean - z * stderr),
        "ci_high": min(1.0, mean + z * stderr),
    }


def pass_at_k_report(
    results: Sequence[tuple[int, int]], ks: Sequence[int], confidence: float = 0.95
) -> dict[int, dict[str, float]]:
    """Per k: mean pass@k over prompts with a normal-approximation CI over prompts; results are (n, c) pairs."""
    if not results:
        raise ValueError("results is empty: need at least one (n, c) pair")
    if not ks:
        raise ValueError("ks is empty: need at least one k")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    z = NormalDist().inv_cdf(0.5 + confidence / 2.0)
    report: dict[int, dict[str, float]] = {}
    for k in ks:
        per_prompt = [pass_at_k(n, c, k) for n, c in results]
        report[k] = {**_mean_ci(per_prompt, z), "n_prompts": len(per_prompt), "confidence": confidence}
    return report


def rl_viability(pass1: float, threshold: float = 0.05) -> str:
    """One-line verdict on whether RL from this SFT checkpoint is worth trying, given pass@1."""
    if not 0.0 <= pass1 <= 1.0:
        raise ValueError(f"pass1 must be in [0, 1], got {pass1}")
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    if pass1 < threshold:
        return (
            f"NOT VIABLE: pass@1={pass1:.1%} < {threshold:.0%}. Outcome-reward RL (e.g. GRPO/PPO) learns only "
            "from rollouts that succeed; at this rate most groups get zero reward and zero advantage, so the "
            "gradient signal is near zero and RL is likely to fail. Improve SFT (data, epochs) or ease the "
            "tasks first."
        )
    return (
        f"VIABLE: pass@1={pass1:.1%} >= {threshold:.0%}. Enough rollouts succeed to give a non-zero "
        "reward signal for RL."
    )
