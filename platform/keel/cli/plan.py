"""``keel plan``: size the configured run per GPU, offline, before submitting it.

Takes the same Hydra overrides as ``keel train`` (same composition and validation, without the
no-GPU refusal: it sizes the configured cluster, not this machine).
"""

from __future__ import annotations

import argparse
import json
import sys

from hydra import compose, initialize_config_module
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from keel.cli.train import validate
from keel.config import KeelConfig
from keel.errors import UserError

DESCRIPTION = """Print what the configured run needs per GPU: parameters, world size, ZeRO stage, template,
attention backend, and memory (model states, activations, logits, margin) against --gpu-memory-gib.
Remaining arguments are Hydra overrides, as for `keel train` (e.g. `keel plan model=llama3 cluster=slurm
cluster.num_nodes=2 cluster.gpus_per_node=8`)."""


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Flags, then Hydra overrides; anything else dash-led is an error."""
    parser = argparse.ArgumentParser(prog="keel plan", description=DESCRIPTION, allow_abbrev=False)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0,
                        help="memory of one GPU in GiB (default 80)")
    args, rest = parser.parse_known_args(argv)
    bad = [item for item in rest if item.startswith("-")]
    if bad:
        parser.error(f"unrecognized option {bad[0]}")
    if args.gpu_memory_gib <= 0:
        parser.error(f"--gpu-memory-gib must be > 0, got {args.gpu_memory_gib:g}")
    return args, rest


def load_config(overrides: list[str]) -> KeelConfig:
    """Compose and validate like ``keel train``; user errors exit with ``keel: ...``."""
    try:
        with initialize_config_module(config_module="keel.conf", version_base=None):
            cfg: DictConfig = compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        sys.exit(f"keel: {err}")
    return validate(cfg)


def main(argv: list[str] | None = None) -> None:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    cfg = load_config(overrides)
    from keel.launch.plan import plan, render

    try:
        result = plan(cfg, args.gpu_memory_gib)
    except UserError as err:
        sys.exit(f"keel: {err}")
    print(json.dumps(result, indent=2) if args.json else render(result))


if __name__ == "__main__":
    main()
