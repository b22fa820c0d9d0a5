"""``keel diagnose``: catastrophic forgetting, alignment tax or healthy? (``keel diagnose --help``).

Measures a base and a tuned model on one process (CUDA if available, else CPU): token-weighted
perplexity on a pretraining eval set, a capability probe zero-shot and few-shot (greedy), and
the diversity of sampled completions; then applies the rules in ``keel.eval.diagnose`` and
writes ``diagnosis.md`` and ``diagnosis.json``. See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from keel.choices import MASKINGS
from keel.cli.main import run_cli
from keel.data.template import get_template
from keel.errors import UserError
from keel.eval import checkers
from keel.eval.diagnose import HELDOUT_SEED, Thresholds

if TYPE_CHECKING:
    from keel.eval.diagnose_measure import Plan

_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def _data_args(p: argparse.ArgumentParser) -> None:
    """Evaluation-set arguments."""
    p.add_argument("--pretrain-data", default=None,
                   help="pretraining eval set: a file or glob (JSON/JSONL/Parquet/CSV, text or chat rows); default: "
                        "held-out examples of the built-in demo `text` task")
    p.add_argument("--pretrain-format", default="auto", help="format of --pretrain-data (default auto)")
    p.add_argument("--probe-data", default=None,
                   help="capability probe: prompts with reference answers, e.g. GSM8K JSONL; default: held-out "
                        "questions of the built-in demo `arithmetic` task")
    p.add_argument("--probe-format", default="auto", help="format of --probe-data (default auto)")
    p.add_argument("--checker", default="math", choices=checkers.names(), help="probe answer checker (default math)")
    p.add_argument("--shots", type=int, default=3,
                   help="solved probe examples (never the item itself) before each few-shot question (default 3)")
    p.add_argument("--limit", type=int, default=64,
                   help="at most N examples of the pretraining set and N probe items (default 64)")


def _run_args(p: argparse.ArgumentParser) -> None:
    """Measurement arguments."""
    p.add_argument("--diversity-prompts", type=int, default=16,
                   help="open-ended prompts (the start of pretraining texts) sampled for diversity (default 16)")
    p.add_argument("--samples", type=int, default=4, help="sampled completions per diversity prompt (default 4)")
    p.add_argument("--temperature", type=float, default=0.8, help="diversity sampling temperature (default 0.8)")
    p.add_argument("--top-p", type=float, default=0.95, help="diversity sampling top-p (default 0.95)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="probe and diversity generation length")
    p.add_argument("--batch-size", type=int, default=8, help="examples per forward / generate call (default 8)")
    p.add_argument("--template", default="llama3", help="chat template for perplexity examples (default llama3)")
    p.add_argument("--masking", default="all_tokens", choices=list(MASKINGS),
                   help="tokens scored by perplexity (default all_tokens)")
    p.add_argument("--max-len", type=int, default=1024, help="perplexity examples are cut to this many tokens")
    p.add_argument("--seed", type=int, default=0, help="seed for few-shot example choice and sampling")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--out", default="diagnose", help="output folder for diagnosis.md/.json (default ./diagnose)")


def _threshold_args(p: argparse.ArgumentParser) -> None:
    """Decision thresholds (defaults from keel.eval.diagnose.Thresholds)."""
    d = Thresholds()
    p.add_argument("--ppl-rise", type=float, default=d.ppl_rise,
                   help=f"relative pretraining-perplexity rise that is a spike (default {d.ppl_rise})")
    p.add_argument("--probe-drop", type=float, default=d.probe_drop,
                   help=f"absolute probe-accuracy loss that is a drop / not recovered (default {d.probe_drop})")
    p.add_argument("--collapse-drop", type=float, default=d.collapse_drop,
                   help=f"relative fall of distinct-2 or entropy that flags mode collapse (default {d.collapse_drop})")
    p.add_argument("--repeat-rise", type=float, default=d.repeat_rise,
                   help=f"absolute rise of the repeated 4-gram rate that flags mode collapse (default {d.repeat_rise})")


def parser() -> argparse.ArgumentParser:
    """The ``keel diagnose`` argument parser."""
    p = argparse.ArgumentParser(
        prog="keel diagnose",
        description="Compare a tuned model with its base: pretraining perplexity, a zero/few-shot capability probe "
                    "and diversity; verdict catastrophic forgetting / alignment tax / healthy (docs/evaluation.md).")
    p.add_argument("--base", required=True, help="base model: HF model dir, a Keel run dir (uses its hf/), or hub id")
    p.add_argument("--tuned", required=True, help="tuned model: HF model dir, a Keel run dir (uses its hf/), or hub id")
    _data_args(p)
    _run_args(p)
    _threshold_args(p)
    return p


def resolve_model(arg: str, flag: str) -> str:
    """An HF model dir (or a Keel run dir's hf/), or a hub id; UserError otherwise."""
    path = Path(arg).expanduser()
    if path.is_dir():
        for cand in (path, path / "hf"):
            if (cand / "config.json").is_file():
                return str(cand.resolve())
        raise UserError(f"{flag} {arg}: no config.json there or in hf/ (pass a Hugging Face model dir or a Keel run "
                         "dir; ZeRO-3 checkpoints are not read)")
    if not path.exists() and _HUB_ID.fullmatch(arg):
        return arg
    raise UserError(f"{flag} {arg}: not a model directory or a Hugging Face Hub id (owner/name)")


def _check_args(args: argparse.Namespace) -> None:
    """Raise UserError on counts that cannot work."""
    for name in ("shots", "limit", "diversity_prompts", "samples", "max_new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_len < 2:
        raise UserError(f"--max-len must be >= 2, got {args.max_len}")
    get_template(args.template)  # unknown name: UserError before any model is loaded


def _probe(args: argparse.Namespace) -> tuple[list, str]:
    """Probe items and their description."""
    from keel.eval.diagnose import demo_probe, probe_items
    from keel.eval.generate import load_prompts

    if args.probe_data is None:
        items = demo_probe(args.limit)
        return items, f"held-out demo arithmetic, seed {HELDOUT_SEED} ({len(items)} items)"
    prompts, skipped = load_prompts(args.probe_data, args.probe_format, args.limit)
    return probe_items(prompts), f"{args.probe_data} ({len(prompts)} items, {skipped} rows skipped)"


def build_plan(args: argparse.Namespace) -> tuple[Plan, dict]:
    """(measurement plan, description of the data) from the arguments; no model is loaded."""
    from keel.eval.diagnose import continuation_prompts, few_shot_messages, load_pretrain
    from keel.eval.diagnose_measure import Plan
    from keel.eval.generate import SamplingConfig, check_sampling

    pretrain = load_pretrain(args.pretrain_data, args.pretrain_format, args.limit)
    items, probe_desc = _probe(args)
    few = [few_shot_messages(items, i, args.shots, args.seed) for i in range(len(items))]
    sampling = SamplingConfig(args.samples, args.temperature, args.top_p, args.max_new_tokens, args.batch_size,
                              args.seed)
    check_sampling(sampling)
    plan = Plan(pretrain, items, few, continuation_prompts(pretrain, args.diversity_prompts), args.checker,
                args.template, args.masking, args.max_len, args.batch_size, args.max_new_tokens, sampling)
    source = args.pretrain_data or f"held-out demo text, seed {HELDOUT_SEED}"
    data = {"pretrain": f"{source} ({len(pretrain)} examples, masking {args.masking})",
            "probe": f"{probe_desc}, checker {args.checker}, {args.shots}-shot, greedy",
            "diversity": f"{len(plan.diversity_prompts)} continuation prompts x {args.samples} samples "
                         f"(temperature {args.temperature}, top-p {args.top_p})"}
    return plan, data


def _progress(role: str) -> Callable[[str], None]:
    """A stderr progress printer for one model."""
    return lambda step: print(f"  {role}: {step}", file=sys.stderr, flush=True)


def _measure(path: str, role: str, plan: Plan, device: str) -> dict:
    """Measure one model; a model that cannot be loaded is a user error."""
    from keel.eval.diagnose_measure import measure

    print(f"keel diagnose: {role} model {path}", file=sys.stderr, flush=True)
    try:
        return measure(path, plan, device, _progress(role))
    except OSError as err:
        raise UserError(f"cannot load the {role} model {path!r}: {err}") from err


def run(args: argparse.Namespace) -> dict:
    """Measure both models, classify, write diagnosis.md/.json and print the verdict."""
    from keel.eval.diagnose import classify, format_verdict, scores_from, write_outputs

    th = Thresholds(args.ppl_rise, args.probe_drop, args.collapse_drop, args.repeat_rise)
    th.check()
    _check_args(args)
    base, tuned = resolve_model(args.base, "--base"), resolve_model(args.tuned, "--tuned")
    start = time.perf_counter()
    plan, data = build_plan(args)
    measured = {role: _measure(path, role, plan, args.device) for role, path in (("base", base), ("tuned", tuned))}
    verdict = classify(scores_from(measured["base"]), scores_from(measured["tuned"]), th, args.shots)
    config = {**vars(args), "base": base, "tuned": tuned}
    report = {"config": config, "thresholds": asdict(th), "data": data, **measured, "verdict": verdict,
              "seconds": round(time.perf_counter() - start, 2)}
    md, js = write_outputs(report, args.out)
    print(format_verdict(verdict))
    print(f"report: {md} and {js}")
    return report


def main(argv: list[str] | None = None) -> None:
    """Entry point (``keel diagnose ...``): parse, run, turn user errors into a one-line exit."""
    run_cli(parser(), run, argv)
