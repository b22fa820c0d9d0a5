"""§7: secrets in the environment never reach the run directory or the console."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from .conftest import KEEL

pytestmark = pytest.mark.integration

# Fake, distinctive values: any occurrence in an output is a leak.
SECRETS = {"WANDB_API_KEY": "keelfakewandbkey" + "0123456789abcdef0123456789abcdef",
           "HF_TOKEN": "hf_keelFakeToken0123456789abcdefXYZ"}


def _leaks(run_dir: Path) -> list[str]:
    """Every file under the run directory (W&B offline files included) that holds a secret, binary-safe."""
    needles = [s.encode() for s in SECRETS.values()]
    found = []
    for path in sorted(p for p in run_dir.rglob("*") if p.is_file() and not p.is_symlink()):
        data = path.read_bytes()
        found += [f"{path.relative_to(run_dir)}: {n.decode()[:8]}..." for n in needles if n in data]
    return found


def test_secrets_stay_out_of_the_run_dir_and_console(tmp_path):
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(SECRETS, WANDB_MODE="offline")
    cmd = [KEEL, "train", f"hydra.run.dir={run_dir}", "trainer.progress=false", "trainer.max_steps=2",
           "logger=wandb", "logger.mode=offline"]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert list((run_dir / "wandb").glob("offline-run-*")), "the W&B offline run was not written"
    assert _leaks(run_dir) == []
    for name, value in SECRETS.items():
        assert value not in out.stdout and value not in out.stderr, f"{name} printed to the console"
