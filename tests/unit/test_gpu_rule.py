"""What runs on a GPU: ``cluster.use_gpu`` (null = auto) and keel train's refusal to train a real model on
CPU workers unless ``cluster.use_gpu=false`` is given."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import keel.config
import pytest
from keel.config import from_plain, require_gpu, to_plain

from tests.conftest import compose

REPO = Path(__file__).resolve().parents[2]


def _compose(monkeypatch: pytest.MonkeyPatch, *overrides: str, env: dict | None = None, cuda: int = 0):
    for key in ("SLURM_JOB_NUM_NODES", "SLURM_GPUS_ON_NODE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in (env or {}).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(keel.config, "cuda_devices", lambda: cuda)
    return compose(*overrides)


def test_headline_command_without_gpus_is_refused_at_validation(tmp_path):
    """`keel train cluster=slurm model=llama3 mix.T=2` where the job has no GPUs exits non-zero naming GPUs,
    before Ray or any model work (nothing written into the run directory, no tokenizer fetched)."""
    keel = Path(sys.executable).with_name("keel")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RAY_"))}
    env["HF_HUB_OFFLINE"] = "1"  # reaching the model would fail differently, naming the hub
    t0 = time.monotonic()
    out = subprocess.run([str(keel), "train", "cluster=slurm", "model=llama3", "mix.T=2"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - t0
    assert out.returncode != 0
    assert "model=llama3 trains on GPUs" in out.stderr and "cluster.use_gpu=false" in out.stderr, out.stderr
    assert "--gpus-per-node" in out.stderr and "attention backend" not in out.stdout
    hydra_own = {"train.log", "keel.lock"}  # Hydra writes its job log, the run-dir lock callback keel.lock, first
    written = [p.name for p in tmp_path.rglob("*")
               if p.is_file() and ".hydra" not in p.parts and p.name not in hydra_own]
    assert written == [], written  # run_training writes config.yaml and data_report.json first
    assert elapsed < 60, elapsed


@pytest.mark.parametrize(("overrides", "env", "cuda", "use_gpu", "refused"), [
    (["cluster=slurm", "model=llama3"], {}, 8, False, True),  # a CPU job: this host's GPUs do not count
    (["cluster=slurm", "model=llama3"], {"SLURM_GPUS_ON_NODE": "8"}, 0, True, False),
    (["cluster=slurm", "model=llama3", "cluster.gpus_per_node=4"], {}, 0, True, False),
    (["cluster=slurm", "model=llama3", "cluster.use_gpu=false"], {}, 0, False, False),
    (["model=qwen3"], {}, 0, False, True),  # local: no CUDA device here
    (["model=qwen3"], {}, 1, False, True),  # local: 1 device for 2 workers
    (["model=qwen3"], {}, 2, True, False),
    (["model=qwen3", "cluster.num_workers=1"], {}, 1, True, False),
    (["model=qwen3", "cluster.use_gpu=true"], {}, 0, True, False),  # workers joined elsewhere: as given
    (["model=qwen3", "cluster.use_gpu=false"], {}, 0, False, False),
    ([], {}, 0, False, False),  # tiny trains on CPU
    ([], {}, 8, False, False),  # ... also on a host with GPUs, unless told otherwise
    (["cluster.use_gpu=true"], {}, 8, True, False),
    (["model=tiny", "model.path=/some/checkpoint"], {}, 0, False, False),
])
def test_use_gpu_auto_and_the_refusal(monkeypatch, overrides, env, cuda, use_gpu, refused):
    cfg = _compose(monkeypatch, *overrides, env=env, cuda=cuda)
    assert cfg.cluster.use_gpu is use_gpu
    if refused:
        with pytest.raises(ValueError, match=r"trains on GPUs, but none were found .*cluster\.use_gpu=false"):
            require_gpu(cfg)
    else:
        require_gpu(cfg)


def test_resolved_value_survives_the_workers_revalidation(monkeypatch):
    """Workers rebuild the config from its plain form: the resolved use_gpu arrives as given, and an explicit
    false stays allowed there (the refusal is the driver's, before anything starts)."""
    cfg = _compose(monkeypatch, "cluster=slurm", "model=llama3", env={"SLURM_GPUS_ON_NODE": "8",
                                                                          "SLURM_JOB_NUM_NODES": "2"})
    worker = from_plain(to_plain(cfg))
    assert (worker.cluster.use_gpu, worker.cluster.num_workers, worker.cluster.use_gpu_auto) == (True, 16, None)
    cpu = from_plain(to_plain(_compose(monkeypatch, "model=llama3", "cluster.use_gpu=false")))
    assert cpu.cluster.use_gpu is False
    require_gpu(cpu)


def test_slurm_script_requests_gpus():
    text = (REPO / "slurm" / "sft.sh").read_text()
    assert "\n#SBATCH --gpus-per-node=8\n" in text and "--gres=gpu:8" in text
