"""``keel diagnose``: tell catastrophic forgetting from an alignment tax (and a healthy run) by measurement.

This module holds the parts that need no model (stdlib and ``keel.data`` only): the evaluation
sets, few-shot prompts, the decision rules, the suggested mitigations and the report files.
``keel.eval.diagnose_measure`` runs the models.

Decision rules (the seed's "How to Tell Which One You Have", section 10.5):

- "Perplexity check: compute perplexity on pre-training validation set. Spike = forgetting.
  Stable = alignment tax." A *spike* is a relative rise of the tuned model's token-weighted
  perplexity over the base model's of more than ``ppl_rise`` (default 10%).
- "Run the base model on the failing tasks" and "Few-shot recovery: if providing a few in-context
  examples restores the capability -> alignment tax. If even many examples can't recover it ->
  forgetting." Both models answer a capability probe zero-shot and k-shot (greedy). The zero-shot
  score *drops* when the tuned model is more than ``probe_drop`` (default 0.10, absolute accuracy)
  below the base. The capability is *recovered* when the tuned model's better of zero-/few-shot
  is within ``probe_drop`` of the base model's better of the two.
- "Monitor diversity metrics (entropy, n-gram diversity) to detect mode collapse" / "loss of
  language diversity": flagged when distinct-2 or the mean per-token entropy of sampled
  completions falls by more than ``collapse_drop`` (default 30%, relative) below the base, or
  the repeated 4-gram rate rises by more than ``repeat_rise`` (default 0.10, absolute).

A value counts as past a threshold only when strictly above it (1e-9 slack for float rounding).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from keel.data import demo
from keel.data.sources import load_conversations
from keel.errors import UserError
from keel.eval.diversity import COLLAPSE_METRICS
from keel.eval.report import write_report

# Demo examples for diagnosis come from a seed that no Keel config trains on (data.seed defaults to 0).
HELDOUT_SEED = 1_000_003
DEFAULT_ARITHMETIC_EXAMPLES = 3000  # conf/data/demo.yaml's arithmetic source
PREFIX_WORDS = 12  # words of a pretraining text shown in a diversity (continuation) prompt
CONTINUE = "Continue this text: "
_EPS = 1e-9

VERDICTS = ("catastrophic_forgetting", "forgetting_risk", "skill_forgetting", "alignment_tax", "healthy")
SIDE = {"catastrophic_forgetting": "forgetting", "forgetting_risk": "forgetting", "skill_forgetting": "forgetting",
        "alignment_tax": "alignment_tax", "healthy": "healthy"}


# ---------------------------------------------------------------- thresholds and scores


@dataclass(frozen=True)
class Thresholds:
    """Decision thresholds (defaults documented in docs/evaluation.md)."""

    ppl_rise: float = 0.10  # relative rise of pretraining perplexity that is a spike
    probe_drop: float = 0.10  # absolute accuracy the tuned model may lose before it is a drop
    collapse_drop: float = 0.30  # relative fall of distinct-2 or mean entropy that flags mode collapse
    repeat_rise: float = 0.10  # absolute rise of the repeated 4-gram rate that flags mode collapse

    def check(self) -> None:
        """Raise UserError on a threshold outside its range."""
        for name in ("ppl_rise", "probe_drop", "repeat_rise"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise UserError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
        if not 0.0 < self.collapse_drop < 1.0:
            raise UserError(f"--collapse-drop must be in (0, 1), got {self.collapse_drop}")


@dataclass
class Scores:
    """One model's numbers that the rules read."""

    ppl: float
    zero_shot: float
    few_shot: float
    distinct_2: float | None = None
    mean_entropy: float | None = None
    repeated_4gram_rate: float | None = None
    ppl_tokens: int | None = None
    zero_flags: list[bool] = field(default_factory=list)  # per probe item, for the paired standard error
    few_flags: list[bool] = field(default_factory=list)


def scores_from(measures: dict) -> Scores:
    """Scores from a model's measurement dict (see ``keel.eval.diagnose_measure.measure``)."""
    probe, div = measures["probe"], measures["diversity"]
    return Scores(measures["perplexity"]["ppl"], probe["zero_shot"], probe["few_shot"], div.get("distinct_2"),
                  div.get("mean_entropy"), div.get("repeated_4gram_rate"), measures["perplexity"]["tokens"],
                  probe["zero_shot_correct"], probe["few_shot_correct"])


def _above(value: float, limit: float) -> bool:
    """Strictly above ``limit``, ignoring float rounding."""
    return value > limit + _EPS


# ---------------------------------------------------------------- rules


def signals(base: Scores, tuned: Scores, th: Thresholds) -> dict:
    """The changes the rules read, and which of them pass their thresholds."""
    if not (base.ppl > 0 and tuned.ppl > 0 and math.isfinite(base.ppl)):
        raise ValueError(f"perplexities must be positive and the base's finite, got {base.ppl}, {tuned.ppl}")
    rise = (tuned.ppl - base.ppl) / base.ppl
    base_best, tuned_best = max(base.zero_shot, base.few_shot), max(tuned.zero_shot, tuned.few_shot)
    return {
        "ppl_rise": rise, "ppl_spike": _above(rise, th.ppl_rise),
        "zero_shot_drop": base.zero_shot - tuned.zero_shot,
        "zero_shot_dropped": _above(base.zero_shot - tuned.zero_shot, th.probe_drop),
        "few_shot_drop": base.few_shot - tuned.few_shot,
        "base_best": base_best, "tuned_best": tuned_best, "best_drop": base_best - tuned_best,
        "recovered": not _above(base_best - tuned_best, th.probe_drop),
    }


def verdict_name(sig: dict) -> str:
    """The verdict for a set of signals (the table in docs/evaluation.md)."""
    if sig["ppl_spike"]:
        return "forgetting_risk" if sig["recovered"] else "catastrophic_forgetting"
    if not sig["recovered"]:
        return "skill_forgetting"
    return "alignment_tax" if sig["zero_shot_dropped"] else "healthy"


SUMMARY = {
    "catastrophic_forgetting": "pretraining perplexity spiked and prompting (even with examples) does not bring the "
                               "probe capability back: knowledge was overwritten",
    "forgetting_risk": "pretraining perplexity spiked (the seed's forgetting signal) but the probe capability is still "
                       "reachable: the model is drifting off the pretraining distribution",
    "skill_forgetting": "pretraining perplexity is stable but neither zero- nor few-shot prompting reaches the base "
                        "model's probe score: the probed skill was forgotten",
    "alignment_tax": "pretraining perplexity is stable and the zero-shot probe dropped, but few-shot prompting "
                     "recovers it: the capability is suppressed, not erased",
    "healthy": "pretraining perplexity is stable and the probe capability is kept",
}


def _pct(x: float) -> str:
    """A fraction as a percentage."""
    return f"{x:.1%}"


def evidence(base: Scores, tuned: Scores, sig: dict, th: Thresholds, shots: int) -> list[str]:
    """The numbers behind the verdict, one line each."""
    spike = "spike" if sig["ppl_spike"] else "stable"
    return [
        f"pretraining perplexity {base.ppl:.4g} -> {tuned.ppl:.4g} ({sig['ppl_rise']:+.1%}; a rise above "
        f"+{th.ppl_rise:.0%} is a spike): {spike}",
        f"probe zero-shot accuracy {_pct(base.zero_shot)} -> {_pct(tuned.zero_shot)} (drop "
        f"{sig['zero_shot_drop']:+.3f}; above {th.probe_drop:.3f} is a drop): "
        f"{'dropped' if sig['zero_shot_dropped'] else 'kept'}",
        f"probe {shots}-shot accuracy {_pct(base.few_shot)} -> {_pct(tuned.few_shot)} "
        f"(drop {sig['few_shot_drop']:+.3f})",
        f"best of zero/{shots}-shot: base {_pct(sig['base_best'])}, tuned {_pct(sig['tuned_best'])} (drop "
        f"{sig['best_drop']:+.3f}; within {th.probe_drop:.3f} is recovered): "
        f"{'recovered' if sig['recovered'] else 'not recovered'}",
    ]


def paired_stderr(base_flags: Sequence[bool], tuned_flags: Sequence[bool]) -> float | None:
    """Standard error of the mean per-item accuracy difference (None with fewer than 2 paired items)."""
    n = len(base_flags)
    if n < 2 or len(tuned_flags) != n:
        return None
    diffs = [int(t) - int(b) for b, t in zip(base_flags, tuned_flags)]
    mean = sum(diffs) / n
    return math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n)


def _noise_note(label: str, drop: float, se: float | None, n: int) -> list[str]:
    """A note when an accuracy change is within two paired standard errors."""
    if se is None or abs(drop) < _EPS or abs(drop) > 2 * se:
        return []
    return [f"the {label} change ({-drop:+.3f}) is within 2 paired standard errors (+-{2 * se:.3f}) on {n} probe "
            "items: it may be noise; raise --limit"]


def notes(base: Scores, tuned: Scores, sig: dict, th: Thresholds) -> list[str]:
    """Caveats that do not change the verdict but limit what it can say."""
    out: list[str] = []
    if sig["base_best"] <= th.probe_drop + _EPS:
        out.append(f"the base model scores only {_pct(sig['base_best'])} on the probe, so the probe cannot show a "
                   "capability loss; use a probe the base model solves")
    if sig["ppl_rise"] < -th.ppl_rise - _EPS:
        out.append("the tuned model's pretraining perplexity fell sharply: the eval set may overlap its fine-tuning "
                   "data, so it is not a clean held-out set")
    if base.ppl_tokens is not None and tuned.ppl_tokens is not None and base.ppl_tokens != tuned.ppl_tokens:
        out.append(f"the tokenizers differ ({base.ppl_tokens} vs {tuned.ppl_tokens} tokens on the same text): "
                   "perplexity is per token, so compare the two with care")
    n = len(base.zero_flags)
    out += _noise_note("zero-shot", sig["zero_shot_drop"], paired_stderr(base.zero_flags, tuned.zero_flags), n)
    out += _noise_note("few-shot", sig["few_shot_drop"], paired_stderr(base.few_flags, tuned.few_flags), n)
    return out


def _fall(base: float | None, tuned: float | None) -> float | None:
    """Relative fall from base to tuned; None when unmeasured or base <= 0 (nothing to fall from)."""
    if base is None or tuned is None or base <= 0:
        return None
    return (base - tuned) / base


def mode_collapse(base: Scores, tuned: Scores, th: Thresholds) -> dict:
    """Mode-collapse flag with the checks behind it."""
    reasons: list[str] = []
    for key in COLLAPSE_METRICS:
        b, t = getattr(base, key), getattr(tuned, key)
        fall = _fall(b, t)
        if fall is not None and _above(fall, th.collapse_drop):
            reasons.append(f"{key} fell {fall:.0%} ({b:.4g} -> {t:.4g}; more than {th.collapse_drop:.0%} flags)")
    b, t = base.repeated_4gram_rate, tuned.repeated_4gram_rate
    if b is not None and t is not None and _above(t - b, th.repeat_rise):
        reasons.append(f"repeated 4-gram rate rose {t - b:+.3f} ({b:.3f} -> {t:.3f}; more than "
                       f"+{th.repeat_rise:.2f} flags)")
    return {"flag": bool(reasons), "reasons": reasons}


# ---------------------------------------------------------------- mitigations

_REPLAY_SKILL = ("mitigation.replay.source.kind=file mitigation.replay.source.path=<training data of the skill> "
                 "mitigation.replay.source.masking=assistant_only")

MITIGATION_OVERRIDES = {
    "replay": "keel train mitigation=replay mitigation.replay.ratio=0.1",
    "ewc": "keel train mitigation=ewc",
    "lora": "keel train mitigation=lora",
    "conservative_lr": "keel train mitigation=conservative_lr",
    "progressive": "keel train mitigation=progressive",
    "replay_skill": f"keel train mitigation=replay mitigation.replay.ratio=0.1 {_REPLAY_SKILL}",
}

MITIGATION_WHY = {
    "replay": "mix pretraining-style text into the SFT data (seed: 5-10% of pre-training data) so the updates keep "
              "the pretraining distribution; point mitigation.replay.source at your own pretraining-style corpus "
              "(not at the --pretrain-data eval set)",
    "ewc": "penalise moving weights with high Fisher information on pretraining-style text; raise "
           "mitigation.ewc.lam by x10 if it is not enough (needs deepspeed=zero3)",
    "lora": "train low-rank adapters on a frozen base (seed: protects the checkpoint; the adapted model can still "
            "drift, so re-run keel diagnose)",
    "conservative_lr": "lr 2e-6 with warmup, warns past 3 epochs (seed: 1-5e-6, 1-3 epochs; larger rates accelerate "
                       "forgetting)",
    "progressive": "start with 80% pretraining-style text and ramp to the SFT mixture over the whole run "
                   "instead of switching abruptly",
    "replay_skill": "replay examples of the lost skill (its training data, never the probe set itself) in the SFT "
                    "mixture",
}

PLAN = {
    "catastrophic_forgetting": ["replay", "ewc", "lora", "conservative_lr", "progressive"],
    "forgetting_risk": ["replay", "conservative_lr", "lora"],
    "skill_forgetting": ["replay_skill", "ewc", "lora", "conservative_lr"],
    "alignment_tax": ["conservative_lr", "replay_skill"],
    "healthy": [],
}
COLLAPSE_PLAN = ["replay", "conservative_lr"]


def mitigations(name: str, collapse: bool) -> list[dict]:
    """Suggested Keel mitigations for a verdict, each with the command-line override to try."""
    keys = list(PLAN[name]) + [k for k in COLLAPSE_PLAN if collapse and k not in PLAN[name]]
    return [{"name": k.removesuffix("_skill"), "override": MITIGATION_OVERRIDES[k], "why": MITIGATION_WHY[k]}
            for k in keys]


def classify(base: Scores, tuned: Scores, th: Thresholds, shots: int = 3) -> dict:
    """Verdict, side, summary, evidence, notes, mode-collapse flag and mitigations."""
    th.check()
    sig = signals(base, tuned, th)
    name = verdict_name(sig)
    collapse = mode_collapse(base, tuned, th)
    summary = SUMMARY[name] + ("; diversity fell (possible mode collapse)" if collapse["flag"] else "")
    extra = ["if the model went through preference optimisation (DPO/PPO), a lower beta also reduces the tax "
             "(seed: beta in [0.05, 0.3])"] if name == "alignment_tax" else []
    return {"verdict": name, "side": SIDE[name], "summary": summary, "signals": sig,
            "evidence": evidence(base, tuned, sig, th, shots) + collapse["reasons"],
            "notes": notes(base, tuned, sig, th) + extra, "mode_collapse": collapse,
            "mitigations": mitigations(name, collapse["flag"])}


# ---------------------------------------------------------------- evaluation sets


@dataclass
class ProbeItem:
    """A probe question: prompt turns, the checker's reference, and the answer shown when it is a shot."""

    messages: list[dict]
    reference: str
    demonstration: str


def demo_text(limit: int) -> list[dict]:
    """Held-out demo ``text`` examples (plain pretraining-style paragraphs)."""
    return list(demo.generate("text", limit, HELDOUT_SEED))


def load_pretrain(path: str | None, format: str, limit: int) -> list[dict]:
    """Up to ``limit`` pretraining eval examples: a file/glob via the source readers, else held-out demo text."""
    if path is None:
        return demo_text(limit)
    examples: list[dict] = []
    for example in load_conversations(path, format):
        examples.append(example)
        if len(examples) >= limit:
            break
    if not examples:
        raise UserError(f"--pretrain-data {path}: no valid examples")
    return examples


def _arithmetic_item(example: dict) -> ProbeItem:
    """First question of a demo arithmetic chat; the reference is the bare result."""
    question, answer = example["messages"][0], example["messages"][1]["content"]
    result = answer.rsplit("=", 1)[1].strip().rstrip(".")
    return ProbeItem([question], result, answer)


def _default_trained_questions() -> set[str]:
    """First questions of the default demo config's arithmetic source (data.seed 0, 3000 examples)."""
    return {ex["messages"][0]["content"] for ex in demo.generate("arithmetic", DEFAULT_ARITHMETIC_EXAMPLES, 0)}


def demo_probe(limit: int) -> list[ProbeItem]:
    """``limit`` distinct demo arithmetic questions ("What is 7 + 5?" -> "12", shown as "7 + 5 = 12.").

    Drawn from the held-out seed, skipping questions that the default demo config trains on.
    """
    seen = _default_trained_questions()
    items: list[ProbeItem] = []
    for example in demo.generate("arithmetic", 100 * limit, HELDOUT_SEED):
        item = _arithmetic_item(example)
        if item.messages[0]["content"] not in seen:
            seen.add(item.messages[0]["content"])
            items.append(item)
        if len(items) >= limit:
            break
    return items


def probe_items(prompts: Sequence[Any]) -> list[ProbeItem]:
    """Probe items from ``keel.eval.generate.Prompt``s: the reference answer doubles as the demonstration."""
    return [ProbeItem(p.messages, p.reference, p.reference) for p in prompts]


def _non_system(messages: Sequence[dict]) -> list[dict]:
    """The turns after any system message."""
    return [m for m in messages if m["role"] != "system"]


def shot_indices(items: Sequence[ProbeItem], index: int, shots: int, seed: int = 0) -> list[int]:
    """``shots`` other items for item ``index`` (never itself or a duplicate of its prompt), seeded per item."""
    pool = [j for j, it in enumerate(items) if j != index and it.messages != items[index].messages]
    if len(pool) < shots:
        raise UserError(f"{shots}-shot prompts need {shots} other probe items with a different prompt; item "
                         f"{index} has {len(pool)} (raise --limit or lower --shots)")
    return sorted(random.Random(f"keel-diagnose:{seed}:{index}").sample(pool, shots))


def few_shot_messages(items: Sequence[ProbeItem], index: int, shots: int, seed: int = 0) -> list[dict]:
    """Item ``index``'s prompt preceded by ``shots`` solved examples as earlier chat turns."""
    item = items[index]
    system = [m for m in item.messages if m["role"] == "system"]
    turns: list[dict] = []
    for j in shot_indices(items, index, shots, seed):
        turns += _non_system(items[j].messages) + [{"role": "assistant", "content": items[j].demonstration}]
    return system + turns + _non_system(item.messages)


def _words(example: dict) -> list[str]:
    """Whitespace words of a text example or of a chat's first non-system turn."""
    if "text" in example:
        return example["text"].split()
    turns = _non_system(example["messages"])
    return (turns[0].get("content") or "").split() if turns else []


def continuation_prompts(examples: Sequence[dict], count: int) -> list[list[dict]]:
    """Open-ended prompts for diversity: "Continue this text:" and a pretraining text's first words."""
    prompts = []
    for example in examples:
        words = _words(example)
        if words:
            prompts.append([{"role": "user", "content": CONTINUE + " ".join(words[:PREFIX_WORDS])}])
        if len(prompts) >= count:
            break
    if not prompts:
        raise UserError("no pretraining example has text to build diversity prompts from")
    return prompts


# ---------------------------------------------------------------- report


def _num(x: Any, spec: str = ".4g") -> str:
    """A number for the table, or '-'."""
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def _change(b: Any, t: Any) -> str:
    """Relative change as a signed percentage, or '-'."""
    return "-" if b is None or t is None or not b else f"{(t - b) / b:+.1%}"


def _rows(d: dict) -> list[tuple[str, Any, Any, str]]:
    """(metric, base, tuned, formatted change) rows of the table."""
    b, t, shots = d["base"], d["tuned"], d["config"]["shots"]
    rows = [("pretraining perplexity", b["perplexity"]["ppl"], t["perplexity"]["ppl"], "rel")]
    rows += [("probe zero-shot accuracy", b["probe"]["zero_shot"], t["probe"]["zero_shot"], "abs"),
             (f"probe {shots}-shot accuracy", b["probe"]["few_shot"], t["probe"]["few_shot"], "abs")]
    for key, label in (("distinct_1", "distinct-1"), ("distinct_2", "distinct-2"), ("mean_entropy", "mean entropy")):
        rows.append((f"{label} (sampled)", b["diversity"].get(key), t["diversity"].get(key), "rel"))
    rate = "repeated_4gram_rate"
    rows.append(("repeated 4-gram rate (sampled)", b["diversity"].get(rate), t["diversity"].get(rate), "abs"))
    return [(name, x, y, _change(x, y) if kind == "rel" else _num(None if x is None else y - x, "+.3f"))
            for name, x, y, kind in rows]


def format_markdown(d: dict) -> str:
    """diagnosis.md: the table of numbers, the verdict, evidence, notes and mitigations."""
    v = d["verdict"]
    lines = ["# keel diagnose", "", f"- base: `{d['config']['base']}`", f"- tuned: `{d['config']['tuned']}`",
             f"- pretraining set: {d['data']['pretrain']}", f"- probe: {d['data']['probe']}", "",
             "| metric | base | tuned | change |", "|---|---|---|---|"]
    lines += [f"| {n} | {_num(x)} | {_num(y)} | {c} |" for n, x, y, c in _rows(d)]
    lines += ["", f"## Verdict: {_title(v)}", "", v["summary"] + ".", "", "Evidence:", ""]
    lines += [f"- {e}" for e in v["evidence"]]
    flag = "yes" if v["mode_collapse"]["flag"] else "no"
    lines += ["", f"Mode collapse flag: {flag}"]
    if v["notes"]:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in v["notes"]]
    if v["mitigations"]:
        lines += ["", "Suggested mitigations (add to your run's overrides):", ""]
        lines += [f"- {m['name']}: `{m['override']}` ({m['why']})" for m in v["mitigations"]]
    lines += ["", "Thresholds: " + ", ".join(f"{k}={x}" for k, x in d["thresholds"].items())]
    return "\n".join(lines) + "\n"


def _title(v: dict) -> str:
    """The verdict's name, with its side when that differs."""
    return v["verdict"] if v["side"] == v["verdict"] else f"{v['verdict']} ({v['side']} side)"


def format_verdict(v: dict) -> str:
    """The verdict printed by ``keel diagnose``."""
    lines = [f"verdict: {_title(v)}: {v['summary']}"] + [f"  - {e}" for e in v["evidence"]]
    lines.append(f"  mode collapse: {'FLAGGED' if v['mode_collapse']['flag'] else 'no'}")
    lines += [f"  note: {n}" for n in v["notes"]]
    lines += [f"  try: {m['override']}" for m in v["mitigations"]]
    return "\n".join(lines)


def write_outputs(d: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """Write diagnosis.json (strict JSON) and diagnosis.md into ``out_dir``; return their paths."""
    js = write_report(d, Path(out_dir) / "diagnosis.json")  # creates out_dir
    md = js.with_name("diagnosis.md")
    md.write_text(format_markdown(d), encoding="utf-8")
    return md, js
