"""``keel eval``: evaluation commands (``keel eval passk --help``).

Generation runs on one process from a consolidated Hugging Face model directory, e.g. the
``outputs/.../hf`` folder a Keel run writes; sharded (ZeRO-3) checkpoints are not read here.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from keel.cli.main import run_cli
from keel.errors import UserError
from keel.eval import checkers


def _ks(text: str) -> list[int]:
    """Parse "1,4,8" into [1, 4, 8]."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--k must be comma-separated integers, got {text!r}") from None


def _passk_parser(sub: argparse._SubParsersAction) -> None:
    """Arguments of ``keel eval passk``."""
    p = sub.add_parser("passk", help="sample n completions per prompt, score them, report pass@k",
                       description="pass@k, diversity and an RL-viability verdict for an HF model dir.")
    p.add_argument("--model", required=True, help="Hugging Face model dir (e.g. a Keel run's outputs/.../hf)")
    p.add_argument("--data", required=True, help="prompts with reference answers (JSON/JSONL/Parquet/CSV)")
    p.add_argument("--format", default="auto", help="data format (default: auto-detect)")
    p.add_argument("--n", type=int, default=8, help="samples per prompt (default 8)")
    p.add_argument("--k", type=_ks, default=[1, 4, 8], help="comma-separated ks, each <= n (default 1,4,8)")
    p.add_argument("--checker", default="math", choices=checkers.names(), help="answer checker (default math)")
    p.add_argument("--allow-code-execution", action="store_true",
                   help="let --checker python run the model's code, in a bubblewrap sandbox (or set "
                        "KEEL_ALLOW_CODE_EXECUTION=1)")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generate call (each gives n rows)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N usable prompts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--out", default="passk_report.json", help="JSON report path (default ./passk_report.json)")


def parser() -> argparse.ArgumentParser:
    """The ``keel eval`` argument parser."""
    top = argparse.ArgumentParser(prog="keel eval", description="Evaluation commands (`keel eval passk --help`).")
    sub = top.add_subparsers(dest="command", required=True, metavar="{passk}")
    _passk_parser(sub)
    return top


def _config(args: argparse.Namespace, ks: list[int], dropped: list[int]) -> dict:
    """The report's record of how it was made."""
    cfg = {k: v for k, v in vars(args).items() if k not in ("command", "k")}
    return {**cfg, "model": str(Path(args.model).resolve()), "k": ks, "k_dropped_gt_n": dropped}


def _progress(done: int, total: int) -> None:
    """One stderr line per finished batch."""
    print(f"  sampled {done}/{total} prompts", file=sys.stderr, flush=True)


def _check_model_dir(path: str) -> None:
    """Raise UserError unless ``path`` is a consolidated HF model dir (has config.json)."""
    if not (Path(path) / "config.json").is_file():
        raise UserError(f"--model must be a Hugging Face model directory with config.json, got {path!r} "
                         "(for a Keel run use its outputs/.../hf folder, not the ZeRO-3 checkpoint)")


def run_passk(args: argparse.Namespace) -> dict:
    """Load, sample, score, print the table and write the report."""
    from keel.eval.generate import SamplingConfig, check_sampling, load_eval_model, load_prompts
    from keel.eval.report import evaluate_passk, format_table, usable_ks, write_report

    checkers.get(args.checker, args.allow_code_execution)  # opt-in and sandbox, before any loading
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be >= 1, got {args.limit}")
    sampling = SamplingConfig(args.n, args.temperature, args.top_p, args.max_new_tokens, args.batch_size, args.seed)
    check_sampling(sampling)
    ks, dropped = usable_ks(args.k, args.n)
    if dropped:
        print(f"keel eval: skipping k={dropped} (> n={args.n})", file=sys.stderr)
    prompts, skipped = load_prompts(args.data, args.format, args.limit)
    _check_model_dir(args.model)
    start = time.perf_counter()
    model, tokenizer = load_eval_model(args.model, args.device)
    body = evaluate_passk(model, tokenizer, prompts, sampling, args.checker, ks, _progress,
                          allow_code_execution=args.allow_code_execution)
    report = {"config": _config(args, ks, dropped), "prompts": len(prompts), "rows_skipped": skipped,
              "seconds": round(time.perf_counter() - start, 2), **body}
    print(format_table(report))
    print(f"report: {write_report(report, args.out)}")
    return report


def main(argv: list[str] | None = None) -> None:
    """Entry point (``keel eval ...``): parse, run, turn user errors into a one-line exit."""
    run_cli(parser(), run_passk, argv)
