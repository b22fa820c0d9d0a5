"""Integration runs: real `keel train` subprocesses (Ray, 2 CPU workers, gloo, ZeRO-3), joined to the session's
Ray head (``shared_ray``) unless a test is about Ray's own start."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .shared_ray import HEAD, keel_env

KEEL = str(Path(sys.executable).with_name("keel"))


@pytest.fixture(scope="session", autouse=True)
def _stop_shared_ray() -> Iterator[None]:
    """The session's Ray head (started by the first test that joins it) stops with the session."""
    yield
    HEAD.stop()


def keel_train(run_dir: Path, *overrides: str, timeout: int = 600, env: dict | None = None,
               shared_ray: bool = True) -> dict:
    """Run `keel train` into ``run_dir`` and return its summary.json.

    ``env`` adds variables; ``shared_ray=False`` starts a Ray instance of its own instead of joining the
    session's; the console output is kept beside the run dir (``<run>.console``).
    """
    full_env = keel_env(shared_ray, **(env or {}))
    cmd = [KEEL, "train", f"hydra.run.dir={run_dir}", "trainer.progress=false", *overrides]
    out = subprocess.run(cmd, cwd=run_dir.parent, env=full_env, capture_output=True, text=True, timeout=timeout)
    run_dir.with_name(run_dir.name + ".console").write_text(out.stdout + out.stderr)
    if out.returncode != 0:
        pytest.fail(f"keel train failed ({out.returncode}):\n{out.stdout[-4000:]}\n{out.stderr[-6000:]}")
    return json.loads((run_dir / "summary.json").read_text())
