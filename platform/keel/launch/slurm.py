"""The Slurm environment a driver or worker runs in, when it runs inside a Slurm job."""

from __future__ import annotations

import os
import socket


def slurm_job() -> dict:
    """The Slurm job and how often it was requeued, when the driver runs inside one."""
    if "SLURM_JOB_ID" not in os.environ:
        return {}
    return {"slurm_job_id": os.environ["SLURM_JOB_ID"],
            "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0"))}


def node_name() -> str:
    """The Slurm node this process runs on (set by slurmd for every step), else the hostname."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()
