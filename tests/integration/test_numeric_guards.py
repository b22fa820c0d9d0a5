"""§6/§2: a non-finite step is skipped on every rank and counted; too many in a row stop the run;
time-based checkpoints."""

from __future__ import annotations

import json
import math
import os
import subprocess

import pytest
import torch

from .conftest import KEEL, keel_train

pytestmark = pytest.mark.integration


def _rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _fp32_partitions(ckpt) -> list[torch.Tensor]:
    """Every rank's fp32 master weights (ZeRO-3 partitions) in a checkpoint."""
    out = []
    for path in sorted(ckpt.rglob("*optim_states.pt")):
        sd = torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        out += [t.clone() for t in sd["fp32_flat_groups"]]
    assert out, f"no optimizer states under {ckpt}"
    return out


def test_nan_step_is_skipped_and_timed_checkpoints(tmp_path):
    run_dir = tmp_path / "run"
    # checkpoint_every_s tiny: rank 0's clock asks for a checkpoint after every step.
    s = keel_train(run_dir, "trainer.max_steps=3", "logger=none", "fault.nan_at_steps=[2]",
                   "trainer.checkpoint_every_s=0.001", "trainer.keep_checkpoints=3")
    assert s["bad_steps"] == 1 and s["steps"] == 3
    rows = _rows(run_dir)
    assert [r["bad_step"] for r in rows] == [False, True, False] and rows[-1]["bad_steps"] == 1
    assert math.isnan(rows[1]["loss"]) and math.isfinite(rows[2]["loss"]) and math.isfinite(rows[2]["grad_norm"])
    assert rows[2]["lr"] != rows[1]["lr"]  # the LR schedule follows the data position through a skipped step
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert ckpts == ["step_000001", "step_000002", "step_000003"]  # the timed ones, then the final one
    after1, after2, after3 = (_fp32_partitions(run_dir / "checkpoints" / c) for c in ckpts)
    assert all(torch.equal(a, b) for a, b in zip(after1, after2))  # step 2's update was dropped on every rank
    assert not all(torch.equal(a, b) for a, b in zip(after2, after3))  # step 3 trained again
    assert all(torch.isfinite(t).all() for t in after3)


def test_consecutive_bad_steps_stop_the_run(tmp_path):
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [KEEL, "train", f"hydra.run.dir={run_dir}", "trainer.progress=false", "logger=none",
           "trainer.max_steps=4", "fault.nan_at_steps=[2,3]", "trainer.max_bad_steps=2"]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    text = out.stdout + out.stderr
    assert out.returncode != 0
    assert "trainer.max_bad_steps=2" in text and "2 consecutive optimizer steps" in text, text[-4000:]
    assert [r["bad_step"] for r in _rows(run_dir)] == [False, True, True]


def test_nan_step_is_skipped_under_zero2_with_accumulation(tmp_path):
    run_dir = tmp_path / "run"
    s = keel_train(run_dir, "trainer.max_steps=3", "logger=none", "fault.nan_at_steps=[2]", "deepspeed=zero2",
                   "trainer.grad_accum=2", "trainer.micro_batch_size=1")
    assert s["bad_steps"] == 1 and s["zero_stage"] == 2
    rows = _rows(run_dir)
    assert [r["bad_step"] for r in rows] == [False, True, False]
    assert math.isfinite(rows[2]["loss"]) and math.isfinite(rows[2]["grad_norm"])


def test_watchdog_ends_a_stalled_run_naming_the_rank(tmp_path):
    """Rank 1 hangs after step 2 (the other rank then blocks in the next collective): within
    trainer.step_timeout_s the run fails with an error naming the rank, and rank 1's Python stacks, showing
    where it hangs, are in the run directory."""
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [KEEL, "train", f"hydra.run.dir={run_dir}", "trainer.progress=false", "trainer.max_steps=4", "logger=none",
           "trainer.step_timeout_s=5", "fault.hang_rank=1", "fault.hang_at_step=2"]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "training stalled: " in out.stderr + out.stdout and "rank 1: step 2 (training)" in out.stderr + out.stdout
    dump = run_dir / "watchdog" / "rank1-step2.txt"
    assert dump.is_file() and "_maybe_fault" in dump.read_text()  # the stack shows where the rank hangs
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2]
