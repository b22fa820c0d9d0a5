"""§6/§2: a non-finite step is skipped on every rank and counted; too many in a row stop the run;
time-based checkpoints; a loss spike rolls back to the last checkpoint."""

from __future__ import annotations

import json
import math
import subprocess

import pytest
import torch

from .conftest import KEEL, keel_env, keel_train

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


def _adam_states(ckpt) -> list[torch.Tensor]:
    """Every rank's Adam moments and step counts in a checkpoint."""
    out = []
    for path in sorted(ckpt.rglob("*optim_states.pt")):
        sd = torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        out += [t for s in sd["optimizer_state_dict"]["state"].values() for t in s.values()]
    assert out, f"no optimizer states under {ckpt}"
    return out


def _equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_nan_skip_timed_checkpoints_and_spike_rollback(tmp_path):
    """Two runs of 6 steps from the same seed.

    skipped: rank 0's loss is NaN at step 5: the step is skipped on every rank and counted, and step 6 trains
    again; checkpoints every 2 steps, and rank 0's clock (checkpoint_every_s tiny) asks for more (always after
    step 1: the first bundle takes longer than 1 ms; after the others only when over 1 ms passed since a save).
    spiked: rank 0's loss x1e3 at step 5 with trainer.spike_rollback: every rank reloads checkpoint 4 and goes
    on with step 6's data at step 6's LR. That equals the NaN skip exactly: same LRs, step-6 loss, fp32 weights
    and Adam state (whose step count says one update was left out in both).
    """
    common = ["trainer.max_steps=6", "logger=none", "trainer.warmup_steps=2", "trainer.keep_checkpoints=10",
              "trainer.spike_window=3", "trainer.spike_z=10"]
    spiked, skipped = tmp_path / "spiked", tmp_path / "skipped"
    r = keel_train(skipped, *common, "fault.nan_at_steps=[5]", "trainer.checkpoint_every=2",
                   "trainer.checkpoint_every_s=0.001")
    ref = _rows(skipped)
    assert r["bad_steps"] == 1 and r["steps"] == 6 and ref[-1]["bad_steps"] == 1
    assert [x["bad_step"] for x in ref] == [False] * 4 + [True, False]
    assert math.isnan(ref[4]["loss"]) and math.isfinite(ref[5]["loss"]) and math.isfinite(ref[5]["grad_norm"])
    ref_ck = skipped / "checkpoints"
    names = {p.name for p in ref_ck.glob("step_*")}
    assert {"step_000001", "step_000002", "step_000004", "step_000006"} <= names, names  # timed, periodic, final
    assert all(torch.isfinite(t).all() for t in _fp32_partitions(ref_ck / "step_000006"))

    s = keel_train(spiked, *common, "trainer.checkpoint_every=1", "fault.spike_at_steps=[5]",
                   "trainer.spike_rollback=true")
    assert (s["steps"], s["loss_spikes"], s["rollbacks"], s["rolled_back_steps"]) == (6, 1, 1, 1)
    rows = _rows(spiked)
    assert [x.get("rolled_back_to") for x in rows] == [None] * 4 + [4, None] and rows[4]["loss"] > 100 * rows[3]["loss"]
    assert "step 5: loss spike; rolled back to checkpoint step 4 (steps 5..5 undone; their data is skipped" in (
        tmp_path / "spiked.console").read_text()
    assert [x["lr"] for x in rows] == [x["lr"] for x in ref] and rows[5]["lr"] != rows[4]["lr"]  # LR by data position
    assert rows[5]["loss"] == ref[5]["loss"]  # step 6 starts from step 4's weights in both runs
    ck = spiked / "checkpoints"
    # Step 5's checkpoint is written after the rollback: step 4's weights, never the spiked ones.
    assert _equal(_fp32_partitions(ck / "step_000005"), _fp32_partitions(ck / "step_000004"))
    for name in ("step_000004", "step_000006"):
        assert _equal(_fp32_partitions(ck / name), _fp32_partitions(ref_ck / name)), name
        assert _equal(_adam_states(ck / name), _adam_states(ref_ck / name)), name
    assert not _equal(_fp32_partitions(ck / "step_000006"), _fp32_partitions(ck / "step_000004"))  # step 6 trained


def test_zero2_skips_a_nan_step_and_consecutive_ones_stop_the_run(tmp_path):
    """Under ZeRO-2 with accumulation: a NaN at step 2 is skipped and step 3 trains again; NaNs at steps 4
    and 5 are trainer.max_bad_steps=2 in a row, so the run stops there with an error naming the setting."""
    run_dir = tmp_path / "run"
    env = keel_env()
    cmd = [KEEL, "train", f"hydra.run.dir={run_dir}", "trainer.progress=false", "logger=none",
           "trainer.max_steps=6", "fault.nan_at_steps=[2,4,5]", "trainer.max_bad_steps=2", "deepspeed=zero2",
           "trainer.grad_accum=2", "trainer.micro_batch_size=1"]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    text = out.stdout + out.stderr
    assert out.returncode != 0
    assert "trainer.max_bad_steps=2" in text and "2 consecutive optimizer steps" in text, text[-4000:]
    rows = _rows(run_dir)
    assert [r["bad_step"] for r in rows] == [False, True, False, True, True]
    assert math.isfinite(rows[2]["loss"]) and math.isfinite(rows[2]["grad_norm"]) and rows[-1]["bad_steps"] == 3


def test_watchdog_ends_a_stalled_run_naming_the_rank(tmp_path):
    """Rank 1 hangs after step 2 (the other rank then blocks in the next collective): within
    trainer.step_timeout_s the run fails with an error naming the rank, and rank 1's Python stacks, showing
    where it hangs, are in the run directory."""
    run_dir = tmp_path / "run"
    env = keel_env()
    cmd = [KEEL, "train", f"hydra.run.dir={run_dir}", "trainer.progress=false", "trainer.max_steps=4", "logger=none",
           "trainer.step_timeout_s=5", "fault.hang_rank=1", "fault.hang_at_step=2"]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "training stalled: " in out.stderr + out.stdout and "rank 1: step 2 (training)" in out.stderr + out.stdout
    dump = run_dir / "watchdog" / "rank1-step2.txt"
    assert dump.is_file() and "in end_step" in dump.read_text()  # the stack shows where the rank hangs (fault.py)
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2]
