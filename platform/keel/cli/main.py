"""The ``keel`` command. Only this package touches Hydra (but ``keel.config``, which registers its schema).

A :class:`keel.errors.UserError` (``ConfigError`` among them) is shown as one ``keel <command>: ...`` line;
any other exception is a bug and keeps its traceback."""

from __future__ import annotations

import argparse
import atexit
import importlib
import os
import sys
from collections.abc import Callable
from typing import Any

from keel.errors import UserError

USAGE = """usage: keel <command> [options | hydra overrides]

commands:
  train     fine-tune per the composed config (e.g. `keel train mix.T=2 trainer.max_steps=5`)
            `keel train --cfg job` prints the composed config; `keel train --help` lists groups;
            `keel train -v` (--verbose) shows every worker's output, not only Keel's lines
  inspect   show rendered examples with trained tokens coloured, and write an HTML report
  preprocess  the data path offline on Ray Data: Parquet shards of packed rows + report.json
            (`keel preprocess --out DIR <overrides>`, then `keel train <overrides> data.preprocessed=DIR`)
  export    a checkpoint as a Hugging Face model: `keel export CHECKPOINT_DIR --out DIR [--merge]`
            (full model, or a LoRA run's adapter / merged model; offline, on the CPU)
  eval      evaluation: `keel eval passk --help`
  diagnose  forgetting vs alignment tax vs healthy, base vs tuned: `keel diagnose --help`
  submit    run `keel train` as a Ray job on a running cluster: `keel submit --help`
  plan      what the configured run needs per GPU, offline, and whether it fits
            (`keel plan model=llama3 cluster=slurm cluster.num_nodes=2 cluster.gpus_per_node=8 [--json]`)
"""

# command -> module with a main(argv) (Hydra-based commands read sys.argv themselves)
COMMANDS = {"train": "keel.cli.train", "inspect": "keel.cli.inspect", "preprocess": "keel.cli.preprocess",
            "eval": "keel.cli.eval", "export": "keel.cli.export",
            "submit": "keel.cli.submit", "diagnose": "keel.cli.diagnose", "plan": "keel.cli.plan"}


def run_cli(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], Any],
            argv: list[str] | None = None) -> Any:
    """Parse ``argv`` and run; a user error (:class:`keel.errors.UserError`: a bad config, data file or flag, a
    missing sandbox...) exits with one ``<prog>: <message>`` line. Anything else is a bug and keeps its
    traceback."""
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return run(args)
    except UserError as err:
        sys.exit(f"{parser.prog}: {err}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        sys.exit(f"keel: unknown command {command!r}\n\n{USAGE}")
    module = importlib.import_module(COMMANDS[command])
    sys.argv = [f"keel {command}", *getattr(module, "argv", list)(rest)]  # a command may order its arguments
    module.main()


def entry() -> None:
    """The ``keel`` console script: :func:`main`, then an exit without the interpreter's teardown.

    After a run every file is written and closed and Ray is stopped; what remains at exit is the atexit
    handlers (run here: log files flushed, anything left stopped) and the teardown of torch's, Ray's and
    gRPC's extension modules, which takes 1.5 s and does nothing for the user. Errors exit as usual."""
    main()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
