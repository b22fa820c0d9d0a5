"""The pass@k evaluation report: score samples, aggregate, make JSON-safe, print a table."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from keel.errors import UserError
from keel.eval import checkers
from keel.eval.diversity import diversity_report
from keel.eval.generate import Prompt, Sample, SamplingConfig, sample_prompts
from keel.eval.passk import pass_at_k_report, rl_viability
from keel.eval.sandbox import Outcome

NUM_EXAMPLES = 3  # prompts whose completions are copied into the report


def usable_ks(ks: Sequence[int], n: int) -> tuple[list[int], list[int]]:
    """(sorted distinct ks <= n, ks > n that cannot be estimated from n samples)."""
    if any(k < 1 for k in ks):
        raise UserError(f"every k must be >= 1, got {list(ks)}")
    kept = sorted({k for k in ks if k <= n})
    dropped = sorted({k for k in ks if k > n})
    if not kept:
        raise UserError(f"no k <= n={n} in {list(ks)}: pass@k needs at least k samples per prompt")
    return kept, dropped


def score(prompts: Sequence[Prompt], samples: Sequence[Sequence[Sample]], checker: str,
          allow_code_execution: bool = False) -> list[list[Outcome]]:
    """The outcome (passed / failed / could_not_run) of every sample under the named checker."""
    check = checkers.get(checker, allow_code_execution)
    return [[checkers.outcome(check, s.text, p.reference) for s in group] for p, group in zip(prompts, samples)]


def could_not_run(outcomes: Sequence[Sequence[Outcome]]) -> dict:
    """Samples that could not run, in total and by reason (counted as not passing in pass@k)."""
    reasons = Counter(o.reason for group in outcomes for o in group if o.status == "could_not_run")
    return {"total": sum(reasons.values()), "by_reason": dict(sorted(reasons.items()))}


def _examples(prompts: Sequence[Prompt], samples: Sequence[Sequence[Sample]],
              outcomes: Sequence[Sequence[Outcome]]) -> list[dict]:
    """Prompt, reference and scored completions of the first few prompts."""
    return [
        {"prompt": p.messages, "reference": p.reference,
         "completions": [{"text": s.text, "tokens": s.num_tokens, "passed": o.passed,
                          **({"could_not_run": o.reason} if o.status == "could_not_run" else {})}
                         for s, o in zip(group, flags)]}
        for p, group, flags in list(zip(prompts, samples, outcomes))[:NUM_EXAMPLES]
    ]


def build_report(prompts: Sequence[Prompt], samples: Sequence[Sequence[Sample]],
                 outcomes: Sequence[Sequence[Outcome]], ks: Sequence[int]) -> dict:
    """pass@k per k, per-prompt (n, c, could_not_run), diversity, examples and the RL-viability verdict.

    A sample that could not run (a sandbox limit or the timeout stopped it) counts as not passing,
    as in HumanEval: pass@k estimates passing under these limits. Its count is reported apart so
    that limits too tight for correct programs show up instead of hiding in the failures.
    """
    results = [(len(group), sum(o.passed for o in group)) for group in outcomes]
    per_k = pass_at_k_report(results, ks)
    flat = [s for group in samples for s in group]
    diversity = diversity_report([s.text for s in flat], [e for s in flat for e in s.entropies])
    pass1 = per_k[1]["mean"] if 1 in per_k else pass_at_k_report(results, [1])[1]["mean"]
    return {
        "pass_at_k": {str(k): v for k, v in per_k.items()},
        "per_prompt": [{"n": n, "c": c, "could_not_run": sum(o.status == "could_not_run" for o in group)}
                       for (n, c), group in zip(results, outcomes)],
        "could_not_run": could_not_run(outcomes),
        "diversity": diversity,
        "examples": _examples(prompts, samples, outcomes),
        "pass1": pass1,
        "verdict": rl_viability(pass1),
    }


def evaluate_passk(model: Any, tokenizer: Any, prompts: Sequence[Prompt], sampling: SamplingConfig,
                   checker: str, ks: Sequence[int], progress: Any = None, allow_code_execution: bool = False) -> dict:
    """Sample, score and report pass@k for ``prompts`` (ks must all be <= sampling.n)."""
    checkers.get(checker, allow_code_execution)  # fail on a bad name or a missing opt-in before sampling
    usable_ks(ks, sampling.n)
    samples = sample_prompts(model, tokenizer, prompts, sampling, progress)
    return build_report(prompts, samples, score(prompts, samples, checker, allow_code_execution), ks)


def json_safe(obj: Any) -> Any:
    """Copy of ``obj`` with NaN/inf floats as None and non-string dict keys as strings."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


def write_report(report: dict, path: str | Path) -> Path:
    """Write the report as strict JSON (no NaN) and return the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return out


def _fmt(x: float | None) -> str:
    """A metric to three decimals, or '-' when undefined."""
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.3f}"


def format_table(report: dict) -> str:
    """pass@k rows with CIs, then the diversity line and the verdict."""
    conf = next(iter(report["pass_at_k"].values()))["confidence"]
    lines = [f"{'k':>5}  {'pass@k':>7}  {f'{conf:.0%} CI':>17}  {'stderr':>7}"]
    for k, v in report["pass_at_k"].items():
        lines.append(f"{k:>5}  {_fmt(v['mean']):>7}  [{_fmt(v['ci_low'])}, {_fmt(v['ci_high'])}]"
                     f"{'':>2}  {_fmt(v['stderr']):>7}")
    d = report["diversity"]
    lines.append(f"diversity: distinct-1 {_fmt(d['distinct_1'])}  distinct-2 {_fmt(d['distinct_2'])}  "
                 f"repeated-4gram {_fmt(d['repeated_4gram_rate'])}  mean entropy {_fmt(d['mean_entropy'])} nats  "
                 f"mean length {d['length_words']['mean']:.1f} words")
    cnr = report.get("could_not_run", {"total": 0})
    if cnr["total"]:
        reasons = ", ".join(f"{k} {v}" for k, v in cnr["by_reason"].items())
        total = sum(p["n"] for p in report["per_prompt"])
        lines.append(f"could not run: {cnr['total']} of {total} samples ({reasons}); counted as not "
                     "passing: if correct programs hit these limits, pass@k is too low")
    lines.append(report["verdict"])
    return "\n".join(lines)

