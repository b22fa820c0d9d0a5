"""`sbatch slurm/sft.sh` on the real two-node Slurm of tests/cluster/slurm_local.sh.

Skipped when no Slurm controller answers, unless KEEL_REQUIRE_SLURM=1 (set by .ci/run, which
brings the cluster up first): then a missing cluster is a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SFT = REPO / "slurm" / "sft.sh"
pytestmark = pytest.mark.cluster


def _slurm_up() -> bool:
    if shutil.which("sinfo") is None:
        return False
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, timeout=30)
    return out.returncode == 0 and len(re.findall(r"idle|mixed|alloc", out.stdout)) >= 2


@pytest.fixture(scope="module", autouse=True)
def slurm() -> None:
    if not _slurm_up():
        if os.environ.get("KEEL_REQUIRE_SLURM") == "1":
            pytest.fail("KEEL_REQUIRE_SLURM=1 but no 2-node Slurm answers (tests/cluster/slurm_local.sh up)")
        pytest.skip("no local Slurm cluster (run tests/cluster/slurm_local.sh up)")


def _env() -> dict[str, str]:
    """The job's environment (sbatch exports it): this venv's `keel`, offline W&B, small Ray nodes."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "SLURM_"))}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env.update(WANDB_MODE="offline", KEEL_RAY_OBJECT_STORE_MB="512")
    return env


def _sbatch(submit_dir: Path, *args: str, wait: bool = False) -> tuple[str, subprocess.CompletedProcess]:
    # The local cluster has no GPUs: override the script's --gpus-per-node=8 (Slurm would refuse the job).
    cmd = ["sbatch", "--parsable", "--gpus-per-node=0", *(["--wait"] if wait else []), str(SFT), "model=tiny",
           "logger=none",
           "trainer.progress=false", *args]
    out = subprocess.run(cmd, cwd=submit_dir, env=_env(), capture_output=True, text=True, timeout=900)
    job = out.stdout.strip().split(";")[0].splitlines()[0] if out.stdout.strip() else ""
    return job, out


def _job(job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=30)
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout))


def _requeued(state: dict[str, str]) -> bool:
    """Requeued and back in the queue (the old run's processes are gone)."""
    return int(state.get("Restarts", "0")) >= 1 and state.get("JobState") == "PENDING"


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(2)


def _logs(run_dir: Path) -> str:
    return "\n".join(f"== {p}\n{p.read_text()[-3000:]}" for p in sorted((run_dir / "logs").glob("*.log")))


def _steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def test_two_nodes_train(tmp_path: Path) -> None:
    job, out = _sbatch(tmp_path, "mix.T=2", "trainer.max_steps=4", wait=True)
    run_dir = tmp_path / "outputs" / f"slurm-{job}"
    assert out.returncode == 0, f"sbatch --wait failed: {out.stderr}\n{_logs(run_dir)}"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4
    assert summary["nodes"] == ["node1", "node2"]
    assert sorted(summary["rank_to_node"].values()) == ["node1", "node2"]  # one worker on each node
    assert summary["slurm_job_id"] == job
    assert "name: slurm" in (run_dir / "config.yaml").read_text()
    # Ray was torn down on both nodes: no raylet of this job's temp dir is left.
    left = subprocess.run(["pgrep", "-f", f"/tmp/ray-{job}/"], capture_output=True, text=True)
    assert left.stdout.strip() == "", f"Ray processes left behind: {left.stdout}"


def test_preempted_job_requeues_and_resumes(tmp_path: Path) -> None:
    job, out = _sbatch(tmp_path, "trainer.max_steps=12", "trainer.checkpoint_every=3")
    assert out.returncode == 0 and job, out.stderr
    run_dir = tmp_path / "outputs" / f"slurm-{job}"
    try:
        _wait_for(lambda: len(_steps(run_dir)) >= 2, 600, "two trained steps")
        subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, timeout=30)
        _wait_for(lambda: _requeued(_job(job)), 300, "the job to be requeued")
        # Slurm holds a requeued batch job for ~2 min before it may start again; release it now.
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True, timeout=30)
        _wait_for(lambda: _job(job).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"), 600, "the job to end")
    finally:
        if _job(job).get("JobState") in ("RUNNING", "PENDING", "REQUEUED"):
            subprocess.run(["scancel", job], timeout=30)
    state = _job(job)
    assert state["JobState"] == "COMPLETED", f"{state}\n{_logs(run_dir)}"
    log = (run_dir / "logs" / "sft.log").read_text()
    assert "USR1 received, forwarding it to the driver" in log
    assert "driver exited with 75" in log and "requeueing job" in log
    assert re.search(r"resume: continuing from \S+ \(step \d+\)", log), log[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["slurm_restart_count"] == 1 and summary["steps"] == 12
    assert _steps(run_dir) == list(range(1, 13))  # every step once: nothing lost, nothing repeated
