"""Integration runs: real `keel train` subprocesses (local Ray, 2 CPU workers, gloo, ZeRO-3)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

KEEL = str(Path(sys.executable).with_name("keel"))


def keel_train(run_dir: Path, *overrides: str, timeout: int = 600, env: dict | None = None) -> dict:
    """Run `keel train` into ``run_dir`` and return its summary.json.

    ``env`` adds variables; the console output is kept beside the run dir (``<run>.console``).
    """
    full_env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    full_env.update(env or {}, WANDB_MODE="offline")
    cmd = [KEEL, "train", f"hydra.run.dir={run_dir}", "trainer.progress=false", *overrides]
    out = subprocess.run(cmd, cwd=run_dir.parent, env=full_env, capture_output=True, text=True, timeout=timeout)
    run_dir.with_name(run_dir.name + ".console").write_text(out.stdout + out.stderr)
    if out.returncode != 0:
        pytest.fail(f"keel train failed ({out.returncode}):\n{out.stdout[-4000:]}\n{out.stderr[-6000:]}")
    return json.loads((run_dir / "summary.json").read_text())
