"""SIGTERM (Slurm preemption) produces a checkpoint and a resumable exit; the rerun resumes."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest

from .conftest import KEEL, keel_env, keel_train

pytestmark = pytest.mark.integration

ARGS = ("trainer.max_steps=12", "logger=none", "trainer.progress=false")


def _steps_logged(run_dir) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def test_sigterm_checkpoints_and_resumes(tmp_path):
    run_dir = tmp_path / "run"
    env = keel_env()
    proc = subprocess.Popen([KEEL, "train", f"hydra.run.dir={run_dir}", *ARGS], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while _steps_logged(run_dir) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    assert proc.poll() is None, "run ended before it could be preempted"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 75, out[-3000:]  # EXIT_PREEMPTED: the launcher requeues
    summary = json.loads((run_dir / "summary.json").read_text())
    stopped = summary["steps"]
    assert summary["preempted"] is True and 2 <= stopped < 12
    assert (run_dir / "checkpoints" / f"step_{stopped:06d}" / "manifest.json").is_file()
    resumed = keel_train(run_dir, *ARGS)
    assert resumed["resumed_from_step"] == stopped and resumed["steps"] == 12 and not resumed["preempted"]
