"""What the driver hands the rank-0 logger through the run directory: the W&B group and the data report.

The driver knows the job it runs in (a Ray Jobs submission id is only in the entrypoint's
environment, not in the Ray Train workers'); the logger runs on a worker, so the driver
writes ``wandb_group.txt`` and ``data_report.json`` into the run directory before training.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from keel.config import KeelConfig


GROUP_FILE = "wandb_group.txt"
REPORT_FILE = "data_report.json"
MIX_COLUMNS = ("source", "weight", "share", "examples", "tokens", "trained_tokens", "rejected")
SCHEDULE_COLUMNS = ("first_step", "end_step", "source", "weight", "example_share", "token_share")


def _ray_submission_id(env: Mapping[str, str]) -> str | None:
    """The Ray Jobs submission id: RAY_JOB_SUBMISSION_ID, else the job config the job supervisor sets."""
    if env.get("RAY_JOB_SUBMISSION_ID"):
        return env["RAY_JOB_SUBMISSION_ID"]
    try:
        job_config = json.loads(env.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "") or "{}")
    except json.JSONDecodeError:
        return None
    return (job_config.get("metadata") or {}).get("job_submission_id")


def run_group(run_dir: Path, env: Mapping[str, str] | None = None, ray_job_id: str | None = None) -> str:
    """WANDB_RUN_GROUP, else the Slurm (array) job, else the Ray job, else the run directory's name."""
    env = os.environ if env is None else env
    if env.get("WANDB_RUN_GROUP"):
        return env["WANDB_RUN_GROUP"]
    slurm = env.get("SLURM_ARRAY_JOB_ID") or env.get("SLURM_JOB_ID")
    if slurm:
        return f"slurm-{slurm}"
    ray = _ray_submission_id(env) or ray_job_id
    if ray:
        return f"ray-{ray}"
    return run_dir.name


def ray_job_id(cfg: KeelConfig) -> str | None:
    """Ray's job id when the driver joined a running cluster (a fresh local one numbers every run's job alike)."""
    if not (cfg.cluster.address or os.environ.get("RAY_ADDRESS")):
        return None
    import ray

    return ray.get_runtime_context().get_job_id() if ray.is_initialized() else None


def write_run_context(run_dir: Path, cfg: KeelConfig, report: dict) -> None:
    """Driver side: the data report, and the group unless an earlier start of this run chose it."""
    (run_dir / REPORT_FILE).write_text(json.dumps(report, indent=2))
    group = run_dir / GROUP_FILE
    if not group.is_file():
        group.write_text(run_group(run_dir, ray_job_id=ray_job_id(cfg)))


def read_group(run_dir: Path) -> str:
    """Worker side: the driver's choice, else what this process's environment says."""
    path = run_dir / GROUP_FILE
    return path.read_text().strip() if path.is_file() else run_group(run_dir)


def read_report(run_dir: Path) -> dict:
    """The driver's data report ({} when the run was not started by the driver, e.g. in tests)."""
    path = run_dir / REPORT_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def run_tags(cfg: KeelConfig) -> list[str]:
    """W&B tags: the model, each mitigation and the mixture mode (W&B caps a tag at 64 characters)."""
    tags = [f"model:{cfg.model.name}", *(f"mitigation:{m}" for m in cfg.mitigation.enabled), f"mix:{cfg.mix.name}"]
    return [t[:64] for t in tags]


def mixture_rows(report: dict) -> list[list]:
    """One row per source of the realised mixture, in ``MIX_COLUMNS`` order."""
    return [[name, s["weight"], s["example_share"], s["examples"], s["tokens"], s["trained_tokens"], s["rejected"]]
            for name, s in report.get("sources", {}).items()]


def schedule_rows(report: dict) -> list[list]:
    """One row per schedule segment and source, in ``SCHEDULE_COLUMNS`` order ([] for a fixed mixture)."""
    segments = report.get("schedule", {}).get("segments", [])
    return [[seg["steps"][0], seg["steps"][1], name, w, seg["example_share"][name], seg["token_share"][name]]
            for seg in segments for name, w in seg["weights"].items()]


def step_weights(report: dict, step: int) -> dict[str, float]:
    """The mixture weights the rows of 0-based ``step`` were sampled at (its schedule segment's)."""
    for seg in report.get("schedule", {}).get("segments", []):
        if seg["steps"][0] <= step < seg["steps"][1]:
            return dict(seg["weights"])
    return {name: s["weight"] for name, s in report.get("sources", {}).items()}
