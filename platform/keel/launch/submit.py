"""Ray Jobs: run ``keel train`` on a running Ray cluster through its job server.

The job's entrypoint is ``keel train`` with the caller's overrides; its ``runtime_env``
carries the caller's working directory (data files, local configs) and the environment the
run needs. Secrets go by reference: ``secret_files`` sends only paths of files the cluster
nodes hold, which the job reads there; a secret passed by value in ``env`` is stored in clear
by Ray (job table, dashboard), so it draws a warning. Outputs go to ``run_dir``, which must
be reachable from the head node (a shared filesystem); by default ``outputs/ray-<job id>``
under the submitting directory.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from keel.errors import UserError
from keel.tracking.secrets import SECRET_FILES_ENV, is_secret_key

# Never uploaded with the working dir: environments, outputs and caches.
EXCLUDES = [".venv", "venv", ".git", "outputs", "wandb", "__pycache__", "*.pyc", ".pytest_cache", ".ruff_cache"]
# Forwarded to the job when set here. Secrets are not: pass them by reference (secret_files=, a file on
# the cluster), or by value with env= (a warning: runtime_env keeps them in clear).
FORWARDED_ENV = ("WANDB_MODE", "WANDB_PROJECT", "WANDB_ENTITY", "KEEL_CACHE_DIR", "HF_HOME", "HF_HUB_OFFLINE")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


@dataclass
class JobResult:
    """What a submission ended as (``status`` is a Ray JobStatus name)."""

    job_id: str
    status: str
    run_dir: str
    address: str

    @property
    def ok(self) -> bool:
        return self.status == "SUCCEEDED"


def default_address() -> str:
    """The job server: RAY_API_SERVER_ADDRESS, an http RAY_ADDRESS, else the local default."""
    for key in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        value = os.environ.get(key, "")
        if value.startswith("http"):
            return value
    return "http://127.0.0.1:8265"


def client(address: Optional[str] = None) -> Any:
    """A JobSubmissionClient (token auth is read from RAY_AUTH_TOKEN / ~/.ray as Ray does)."""
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address or default_address())


def entrypoint(overrides: list[str], run_dir: str) -> str:
    """The shell command the job runs."""
    args = ["keel", "train", f"hydra.run.dir={run_dir}", *overrides]
    return " ".join(shlex.quote(a) for a in args)


def runtime_env(working_dir: Optional[str], env: Optional[dict[str, str]] = None,
                secret_files: Optional[dict[str, str]] = None) -> dict:
    """The job's runtime_env: working dir, forwarded variables, ``env``, and secret files by path only."""
    # Stopping a job SIGTERMs the driver, which checkpoints after the current step: give it
    # time before Ray escalates to SIGKILL (Ray's default is 3 s).
    # The driver's own ray.init adds worker env vars: let Ray merge them with the job's.
    env_vars = {"RAY_JOB_STOP_WAIT_TIME_S": "300", "RAY_OVERRIDE_JOB_RUNTIME_ENV": "1"}
    env_vars.update({k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)})
    env_vars.update(env or {})
    if secret_files:
        env_vars[SECRET_FILES_ENV] = json.dumps(check_secret_files(secret_files), sort_keys=True)
    out: dict[str, Any] = {"env_vars": env_vars}
    if working_dir:
        out["working_dir"] = str(Path(working_dir).resolve())
        out["excludes"] = EXCLUDES
    return out


def check_secret_files(secret_files: dict[str, str]) -> dict[str, str]:
    """Secret files as the job reads them: absolute paths on the cluster nodes (a relative one would
    name a file inside the uploaded working dir, i.e. upload the secret)."""
    for key, path in secret_files.items():
        if not key.isidentifier():
            raise UserError(f"--secret-file {key}=...: {key!r} is not an environment variable name")
        if not (path.startswith("/") or path.startswith("~")):
            raise UserError(f"--secret-file {key}={path}: the path must be absolute, on the cluster nodes (a "
                             "relative path would be read from the uploaded working directory)")
    return dict(secret_files)


def secret_warnings(env: Optional[dict[str, str]]) -> list[str]:
    """One warning per secret-looking variable passed by value, which the job's runtime_env keeps in clear."""
    return [f"keel submit: warning: --env {key}=... puts a secret into the job's runtime_env in clear: the Ray GCS "
            f"stores it, and `ray job list`, the job API and the dashboard show it to anyone who can reach the job "
            f"server. Prefer --secret-file {key}=/path/on/the/cluster (only the path is sent), or set {key} in the "
            "environment of the cluster's `ray start`" for key in (env or {}) if is_secret_key(key)]


def submit(overrides: list[str], address: Optional[str] = None, *, run_dir: Optional[str] = None,
           working_dir: Optional[str] = ".", env: Optional[dict[str, str]] = None, wait: bool = True,
           follow: bool = True, job_id: Optional[str] = None,
           secret_files: Optional[dict[str, str]] = None) -> JobResult:
    """Submit ``keel train <overrides>``; with ``wait``, stream its logs and return its final status.

    ``secret_files`` maps environment variable names to files on the cluster nodes: the job reads
    them there (``keel.tracking.secrets.load_secret_files``), so no secret travels with the job.
    """
    job_id = job_id or f"keel-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    run_dir = str(Path(run_dir or Path("outputs") / f"ray-{job_id}").resolve())
    renv = runtime_env(working_dir, env, secret_files)
    for warning in secret_warnings(env):
        print(warning, file=sys.stderr, flush=True)
    c = client(address)
    c.submit_job(entrypoint=entrypoint(overrides, run_dir), submission_id=job_id,
                 runtime_env=renv, metadata={"keel_run_dir": run_dir})
    print(f"keel submit: job {job_id} submitted to {c.get_address()}; run dir {run_dir}", flush=True)
    status = str(c.get_job_status(job_id).value) if not wait else wait_for(job_id, c, follow)
    return JobResult(job_id, status, run_dir, c.get_address())


def wait_for(job_id: str, c: Any, follow: bool = True, poll_s: float = 2.0) -> str:
    """Block until the job ends (printing its logs as they come when ``follow``); its status."""
    if follow:
        _run(_follow(c, job_id))
    while (status := str(c.get_job_status(job_id).value)) not in TERMINAL:
        time.sleep(poll_s)
    print(f"keel submit: job {job_id} {status}", flush=True)
    return status


def _run(coro: Any) -> None:
    """Run a coroutine to completion, also where an event loop already runs (Jupyter)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(coro)
        return
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, coro).result()


async def _follow(c: Any, job_id: str) -> None:
    async for chunk in c.tail_job_logs(job_id):
        sys.stdout.write(chunk)
        sys.stdout.flush()


def status(job_id: str, address: Optional[str] = None) -> str:
    return str(client(address).get_job_status(job_id).value)


def logs(job_id: str, address: Optional[str] = None) -> str:
    return client(address).get_job_logs(job_id)


def stop(job_id: str, address: Optional[str] = None) -> bool:
    """Ask the job to stop (the driver gets SIGTERM: it checkpoints and exits); True if it was running."""
    return bool(client(address).stop_job(job_id))
