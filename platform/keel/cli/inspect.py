"""``keel inspect``: what each source becomes as trainable tokens, in the terminal and as HTML.

Composes the same config as ``keel train`` (without a Hydra run directory), encodes every
source, prints N rendered examples per source with the trained tokens highlighted, and
writes ``inspect.html`` and ``inspect.json`` (per-source stats and rejects).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra import compose, initialize_config_module
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from keel.cli.explicit import user_keys
from keel.cli.train import validate
from keel.config import KeelConfig, SourceConfig
from keel.data import inspect as view
from keel.data.sources import source_format
from keel.errors import UserError

if TYPE_CHECKING:
    from keel.data.examples import SourceData

DESCRIPTION = """Show N rendered examples per source with trained tokens highlighted, and write
inspect.html + inspect.json. Remaining arguments are Hydra overrides, as for `keel train`
(e.g. `keel inspect 5 masking=last_turn template=chatml`)."""


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Flags, then Hydra overrides; a bare integer is N, anything else dash-led is an error."""
    parser = argparse.ArgumentParser(prog="keel inspect", description=DESCRIPTION, allow_abbrev=False)
    parser.add_argument("--n", type=int, default=None, help="examples shown per source (default 3)")
    parser.add_argument("--out", default="inspect", help="folder for inspect.html/inspect.json (default ./inspect)")
    parser.add_argument("--no-color", action="store_true", help="mark trained tokens with ⟦ ⟧ instead of colour")
    parser.add_argument("--file", help="inspect this one file (or glob / hf:dataset) instead of data.sources")
    parser.add_argument("--format", default="auto", help="format of --file (default auto)")
    args, rest = parser.parse_known_args(argv)
    overrides = []
    for item in rest:
        if item.isdigit() and args.n is None:
            args.n = int(item)
        elif item.startswith("-"):
            parser.error(f"unrecognized option {item}")
        else:
            overrides.append(item)
    args.n = 3 if args.n is None else args.n
    if args.n < 0:
        parser.error(f"--n must be >= 0, got {args.n}")
    return args, overrides


def file_source(path: str, fmt: str) -> dict:
    """A ``kind=file`` source reading every row of ``path``."""
    name = Path(path).stem.split("*")[0] or "file"
    return {"name": name, "kind": "file", "path": path, "format": fmt}


def load_config(overrides: list[str], file: str | None, fmt: str) -> KeelConfig:
    """Compose and validate the config like ``keel train``; user errors exit with ``keel: ...``."""
    try:
        with initialize_config_module(config_module="keel.conf", version_base=None):
            cfg: DictConfig = compose(config_name="config", overrides=overrides)
            explicit = user_keys("config", overrides)
        if file is not None:
            cfg.data.sources = [OmegaConf.merge(OmegaConf.structured(SourceConfig), file_source(file, fmt))]
    except (HydraException, OmegaConfBaseException) as err:
        sys.exit(f"keel: {err}")
    return validate(cfg, explicit)


def load_sources(cfg: KeelConfig) -> tuple[Any, list[SourceData]]:
    """The tokenizer of the configured model and every source, encoded as for training."""
    from keel.data.encoding import TextEncoder
    from keel.data.pipeline import load_source
    from keel.model.build import load_tokenizer, model_path

    tokenizer = load_tokenizer(model_path(cfg), cfg.model.trust_remote_code)
    enc = TextEncoder(tokenizer)
    return tokenizer, [load_source(src, cfg, enc) for src in cfg.data.sources]


def summary_line(stats: dict) -> str:
    """One line per source for the terminal."""
    return (f"{stats['examples']} examples of {stats['rows_read']} rows, {stats['rejected']} rejected, "
            f"{stats['tokens']} tokens, {stats['trained_fraction']:.1%} trained, "
            f"length {stats['length']['min']}..{stats['length']['max']} (mean {stats['length']['mean']:.0f})")


def print_source(tokenizer: Any, data: SourceData, stats: dict, n: int, color: bool) -> None:
    """Terminal view of one source: summary, reject reasons, N rendered examples."""
    print(f"=== {data.name} [{stats['format']}]: {summary_line(stats)}")
    for group in stats["rejects_by_reason"]:
        print(f"  rejected {group['count']}x: {group['reason']} (e.g. {view.where_row(group['examples'][0])})")
    for i in range(min(n, len(data.input_ids))):
        print(f"--- {data.name} example {i} ({len(data.input_ids[i])} tokens)")
        print(view.render_terminal(tokenizer, data.input_ids[i], data.targets[i], color))
    print()


def run_summary(cfg: KeelConfig) -> dict:
    """The settings that decide what gets trained, for the report header."""
    return {"model": cfg.model.path, "template": cfg.template.name, "masking": cfg.masking.name,
            "train_eot": cfg.masking.train_eot, "packing.max_len": cfg.packing.max_len,
            "default_system": cfg.template.default_system}


def write_report(out: Path, cfg: KeelConfig, tokenizer: Any, sources: list[SourceData], stats: list[dict],
                 n: int) -> None:
    """Write ``inspect.html`` and ``inspect.json`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    sections = []
    for data, st in zip(sources, stats):
        examples = [view.render_html(tokenizer, data.input_ids[i], data.targets[i])
                    for i in range(min(n, len(data.input_ids)))]
        sections.append(view.source_html(st, examples))
    summary = run_summary(cfg)
    # backslashreplace: a stray lone surrogate is shown escaped, never a crash with half a report written
    (out / "inspect.html").write_text(view.report_html("keel inspect", summary, sections), encoding="utf-8",
                                      errors="backslashreplace")
    payload = {"config": summary, "sources": stats}
    (out / "inspect.json").write_text(json.dumps(payload, indent=2, ensure_ascii=False, default=str) + "\n",
                                      encoding="utf-8", errors="backslashreplace")


def use_color(no_color: bool) -> bool:
    """ANSI colour only on a terminal, and never with --no-color or NO_COLOR set."""
    return not no_color and "NO_COLOR" not in os.environ and sys.stdout.isatty()


def main(argv: list[str] | None = None) -> None:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    cfg = load_config(overrides, args.file, args.format)
    try:
        tokenizer, sources = load_sources(cfg)
        stats = [{**view.source_stats(s), "format": source_format(src)} for s, src in zip(sources, cfg.data.sources)]
    except UserError as err:  # bad data path, unreadable source: no traceback
        sys.exit(f"keel: {err}")
    color = use_color(args.no_color)
    for data, st in zip(sources, stats):
        print_source(tokenizer, data, st, args.n, color)
    out = Path(args.out)
    write_report(out, cfg, tokenizer, sources, stats, args.n)
    print(f"wrote {out / 'inspect.html'} and {out / 'inspect.json'}")


if __name__ == "__main__":
    main()
