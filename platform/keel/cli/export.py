"""``keel export``: a Keel checkpoint as a model ``from_pretrained`` loads, offline on the CPU.

    keel export outputs/RUN/checkpoints/step_000500 --out models/step500
    keel export outputs/LORA_RUN/checkpoints/step_000500 --out adapters/step500          # the LoRA adapter
    keel export outputs/LORA_RUN/checkpoints/step_000500 --out models/step500 --merge    # base + adapter merged

Any complete checkpoint of any ZeRO stage and number of workers: it is verified against its
manifest, the rank shards are merged into full fp32 weights (DeepSpeed's zero_to_fp32) and written
as safetensors in the run's dtype, with the base model's config, generation config and tokenizer
(the base model the checkpoint records must be readable here: a local dir or the HF cache).
No Ray, no process group, no GPU.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from keel.cli.main import run_cli


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="keel export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, metavar="CHECKPOINT_DIR",
                   help="a Keel checkpoint, e.g. outputs/RUN/checkpoints/step_000500")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="new (or empty) output directory")
    p.add_argument("--merge", action="store_true",
                   help="LoRA checkpoints: write the base model with the adapter merged in (default: the adapter)")
    return p


def _run(args: argparse.Namespace) -> dict:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed only reads files here; no device is probed
    from keel.train.export import export_checkpoint

    result = export_checkpoint(args.checkpoint, args.out, merge=args.merge)
    print(f"keel export: step {result['step']} of {result['checkpoint']} (written by {result['world_size']} workers) "
          f"-> {result['out']}: {result['kind']}, {result['dtype']}, base {result['base_model']}")
    return result


def main(argv: list[str] | None = None) -> dict:
    return run_cli(_parser(), _run, argv)
