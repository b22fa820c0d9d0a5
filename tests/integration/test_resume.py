"""Faults: a killed worker restarts from the last checkpoint; a failed driver resumes."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from .conftest import KEEL, keel_train

pytestmark = pytest.mark.integration

COMMON = ("trainer.max_steps=4", "trainer.checkpoint_every=2", "logger=none")


def _losses(run_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _rows_seen(run_dir) -> list[dict]:
    """Per step: real and supervised tokens, and tokens per source (what data was trained)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k.startswith("data/tokens/") or k in ("tokens", "supervised_tokens")}
            for r in rows]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    keel_train(run_dir, *COMMON)
    return run_dir


def test_killed_worker_restarts_from_checkpoint(tmp_path, reference):
    run_dir = tmp_path / "run"
    s = keel_train(run_dir, *COMMON, "cluster.max_failures=1", "fault.kill_rank=1", "fault.at_step=2")
    assert s["restarts"] == 1 and s["resumed_from_step"] == 2 and s["steps"] == 4
    assert _losses(run_dir) == pytest.approx(_losses(reference), abs=1e-6)
    assert _rows_seen(run_dir) == _rows_seen(reference)


def test_failed_driver_resumes_from_newest_checkpoint(tmp_path, reference):
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [KEEL, "train", f"hydra.run.dir={run_dir}", "trainer.progress=false", *COMMON,
           "fault.kill_rank=0", "fault.at_step=3"]
    failed = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert failed.returncode != 0
    assert [p.name for p in (run_dir / "checkpoints").glob("step_*")] == ["step_000002"]
    s = keel_train(run_dir, *COMMON, "fault.kill_rank=0", "fault.at_step=3")  # fires once per run dir
    assert s["resumed_from_step"] == 2 and s["restarts"] == 0
    assert _losses(run_dir) == pytest.approx(_losses(reference), abs=1e-6)
    assert _rows_seen(run_dir) == _rows_seen(reference)
