"""The ``keel`` command. Only this package touches Hydra."""

from __future__ import annotations

import sys

USAGE = """usage: keel <command> [hydra overrides]

commands:
  train     fine-tune per the composed config (e.g. `keel train mix.T=2 trainer.max_steps=5`)
            `keel train --cfg job` prints the composed config; `keel train --help` lists groups
"""


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    command, rest = argv[0], argv[1:]
    if command == "train":
        from keel.cli.train import main as train_main

        sys.argv = ["keel train", *rest]
        train_main()
        return
    sys.exit(f"keel: unknown command {command!r}\n\n{USAGE}")


if __name__ == "__main__":
    main()
