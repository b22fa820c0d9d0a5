"""``keel preprocess``: the whole data path offline on Ray Data, to Parquet shards + report.json.

Takes the same Hydra overrides as ``keel train`` (the rows are exactly those that run would
train on); ``keel train data.preprocessed=DIR`` then trains from the shards.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from keel.cli.inspect import load_config
from keel.errors import UserError

DESCRIPTION = """Run sources -> format -> template -> mask -> mix -> pack on Ray Data and write Parquet
shards of packed rows plus report.json (and rejects.jsonl) to --out. Remaining arguments are Hydra
overrides, as for `keel train`: preprocess with the overrides you will train with, then
`keel train <same overrides> data.preprocessed=DIR`."""


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Flags, then Hydra overrides (anything dash-led that is not a flag is an error)."""
    parser = argparse.ArgumentParser(prog="keel preprocess", description=DESCRIPTION, allow_abbrev=False)
    parser.add_argument("--out", default="preprocessed", help="output folder (default ./preprocessed)")
    parser.add_argument("--procs", type=int, default=os.cpu_count() or 1,
                        help="parallel encoders and shard writers (default: the CPU count)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    args, rest = parser.parse_known_args(argv)
    bad = [item for item in rest if item.startswith("-")]
    if bad:
        parser.error(f"unrecognized option {bad[0]}")
    if args.procs < 1:
        parser.error(f"--procs must be >= 1, got {args.procs}")
    return args, rest


def _prepare_out(out: Path, overwrite: bool) -> None:
    """Lock ``out`` for this process's life (a second `keel preprocess` into it, or a `keel train` reading it, is
    refused naming the holder), then empty it if allowed (the lock file stays: it is the lock)."""
    from keel.launch.runlock import LOCK_FILE, DirectoryInUse, acquire

    try:
        acquire(out, "keel preprocess")
    except DirectoryInUse as err:
        sys.exit(f"keel: {err}")
    old = [p for p in out.iterdir() if p.name != LOCK_FILE]
    if old and not overwrite:
        sys.exit(f"keel: {out} exists and is not empty; pass --overwrite to replace it")
    for p in old:
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def print_report(report: dict, out: Path) -> None:
    """The headline numbers for the terminal."""
    print(f"preprocess: {report['rows']} packed rows in {report['shards']} shards, "
          f"packing efficiency {report['packing_efficiency']:.1%}")
    print(f"  {'source':<18}{'format':<10}{'rows read':>10}{'available':>10}{'rejected':>10}{'held out':>9}"
          f"{'tokens':>12}{'trained':>9}")
    for name, s in report["sources"].items():
        print(f"  {name:<18}{s['format']:<10}{s['rows_read']:>10}{s['available']:>10}{s['rejected']:>10}"
              f"{s['val_examples']:>9}{s['tokens']:>12}{s['trained_fraction']:>9.1%}")
    for name, reasons in report["rejects_by_reason"].items():
        for reason, count in sorted(reasons.items(), key=lambda kv: -kv[1]):
            print(f"  {name}: rejected {count}x: {reason}")
    for note in report["data_report"]["self_check"]["notes"]:
        print(f"note: {note}")
    print(f"wrote {out}/rows-*.parquet, {out / 'report.json'} and {out / 'rejects.jsonl'}")


def main(argv: list[str] | None = None) -> None:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    cfg = load_config(overrides, None, "auto")
    if cfg.data.preprocessed:
        sys.exit("keel: data.preprocessed names the input of `keel train`, not of `keel preprocess`")
    out = Path(args.out).resolve()
    _prepare_out(out, args.overwrite)
    from keel.launch.ray_preprocess import preprocess

    try:
        report = preprocess(cfg, out, args.procs)
    except UserError as err:  # bad data (data.on_error=raise), unreadable source: no traceback
        sys.exit(f"keel: {err}")
    print_report(report, out)


if __name__ == "__main__":
    main()
