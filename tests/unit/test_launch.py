"""Launch plumbing without a cluster: cluster=slurm sizing, Ray job entrypoints, sbatch script."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest
from keel.launch import submit as jobs
from keel.launch.driver import EXIT_PREEMPTED

from tests.conftest import compose

REPO = Path(__file__).resolve().parents[2]


def _cluster(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], *overrides: str):
    for key in ("SLURM_JOB_NUM_NODES", "SLURM_GPUS_ON_NODE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return compose("cluster=slurm", *overrides).cluster


def test_slurm_cpu_job_runs_one_worker_per_node(monkeypatch):
    c = _cluster(monkeypatch, {"SLURM_JOB_NUM_NODES": "3"})
    assert (c.num_nodes, c.num_workers, c.use_gpu, c.ray_placement) == (3, 3, False, "STRICT_SPREAD")


def test_slurm_gpu_job_runs_one_worker_per_gpu(monkeypatch):
    c = _cluster(monkeypatch, {"SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "8"})
    assert (c.num_workers, c.use_gpu, c.ray_placement) == (16, True, "PACK")


def test_slurm_outside_a_job_is_one_node(monkeypatch):
    c = _cluster(monkeypatch, {})
    assert (c.num_nodes, c.num_workers, c.ray_placement) == (1, 1, "PACK")


def test_slurm_overrides_win_and_are_checked(monkeypatch):
    c = _cluster(monkeypatch, {"SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "4"}, "cluster.num_workers=6")
    assert c.num_workers == 6
    with pytest.raises(ValueError, match="cluster.num_workers 9 exceeds the 8 GPUs"):
        _cluster(monkeypatch, {"SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "4"}, "cluster.num_workers=9")
    with pytest.raises(ValueError, match="cluster.placement"):
        _cluster(monkeypatch, {}, "cluster.placement=EVERYWHERE")


def test_local_cluster_is_unchanged(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "4")
    c = compose().cluster
    assert (c.num_nodes, c.num_workers, c.use_gpu, c.ray_placement) == (1, 2, False, "PACK")


def test_job_entrypoint_quotes_overrides():
    cmd = jobs.entrypoint(["model=tiny", "data.sources=[a b]"], "/runs/x y")
    assert shlex.split(cmd) == ["keel", "train", "hydra.run.dir=/runs/x y", "model=tiny", "data.sources=[a b]"]


def test_runtime_env_forwards_only_listed_variables(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", "not-forwarded-secret")
    env = jobs.runtime_env(str(tmp_path), {"EXTRA": "1"})
    assert env["working_dir"] == str(tmp_path.resolve()) and ".venv" in env["excludes"]
    assert env["env_vars"]["WANDB_MODE"] == "offline" and env["env_vars"]["EXTRA"] == "1"
    assert "WANDB_API_KEY" not in env["env_vars"]
    assert "working_dir" not in jobs.runtime_env(None)


def test_default_address(monkeypatch):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # a GCS address is not a job server
    assert jobs.default_address() == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://head:8265")
    assert jobs.default_address() == "http://head:8265"


@pytest.mark.parametrize("script", ["slurm/sft.sh", "slurm/ray_node.sh", "slurm/env.sh",
                                    "tests/cluster/slurm_local.sh"])
def test_shell_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(REPO / script)], capture_output=True).returncode == 0


def test_sbatch_script_defaults():
    text = (REPO / "slurm" / "sft.sh").read_text()
    for directive in ("--signal=B:USR1@120", "--requeue", "--nodes=", "--time=", "--gpus-per-node=8"):
        assert f"#SBATCH {directive}" in text
    assert f"EXIT_PREEMPTED={EXIT_PREEMPTED}" in text  # the code the driver exits with


def test_sbatch_script_refuses_to_run_outside_slurm():
    env = {"PATH": "/usr/bin:/bin"}
    out = subprocess.run(["bash", str(REPO / "slurm" / "sft.sh")], capture_output=True, text=True, env=env)
    assert out.returncode == 2 and "submit it with sbatch" in out.stderr


def test_the_trainer_is_ray_trains_less_its_placement_group_cleaner():
    """Every callback TorchTrainer would run, in order, but the one that starts a watcher process per run."""
    from keel.launch.ray_train import trainer_class
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    def loop() -> None:
        pass

    def names(cls: type) -> list[str]:
        trainer = cls(loop, scaling_config=ScalingConfig(num_workers=1))
        return [type(cb).__name__ for cb in trainer._create_default_callbacks()]

    assert issubclass(trainer_class(), TorchTrainer)
    theirs = names(TorchTrainer)
    assert "PlacementGroupCleanerCallback" in theirs  # else the subclass has nothing left to do: drop it
    assert names(trainer_class()) == [n for n in theirs if n != "PlacementGroupCleanerCallback"]
