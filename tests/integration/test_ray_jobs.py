"""`keel submit` and launchers/notebook.ipynb against a local Ray cluster started here.

The cluster is a real `ray start --head` with the job server and token authentication on,
as users run it; the jobs it runs are real tiny `keel train` runs.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TINY = ["model=tiny", "trainer.max_steps=2", "logger=none", "trainer.progress=false"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A Ray head with its job server; yields the environment a client needs."""
    tmp = tmp_path_factory.mktemp("ray")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PATH=f"{BIN}:{env.get('PATH', '')}", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
               WANDB_MODE="offline")
    port, dash = _free_port(), _free_port()
    cmd = [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--include-dashboard=true",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--ray-client-server-port={_free_port()}",
           f"--dashboard-agent-listen-port={_free_port()}", "--num-cpus=4", "--disable-usage-stats",
           "--object-store-memory=536870912", f"--temp-dir=/tmp/ray-jobs-{os.getpid()}"]
    log = (tmp / "ray.log").open("w")
    # Its own process group: Ray's daemons stay in it, so teardown can reach all of them.
    head = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    env["KEEL_RAY_ADDRESS"] = address = f"http://127.0.0.1:{dash}"
    try:
        _wait_for_job_server(address, env, head, tmp / "ray.log")
        yield env
    finally:
        _stop(head)


def _stop(head: subprocess.Popen) -> None:
    """SIGTERM (`ray start --block` stops Ray), then SIGKILL whatever of the group is left."""
    head.terminate()
    try:
        head.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(head.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _wait_for_job_server(address: str, env: dict, head: subprocess.Popen, log: Path) -> None:
    probe = [sys.executable, "-c", f"from keel.launch.submit import client; client({address!r}).list_jobs()"]
    deadline = time.monotonic() + 120
    while subprocess.run(probe, env=env, capture_output=True).returncode != 0:
        if head.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"the Ray head did not start:\n{log.read_text()[-3000:]}")
        time.sleep(2)


def _keel_submit(env: dict, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "keel"), "submit", "--address", env["KEEL_RAY_ADDRESS"], *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_keel_submit_runs_a_tiny_job(cluster: dict, tmp_path: Path) -> None:
    out = _keel_submit(cluster, tmp_path, "--job-id", "keel-test-ok", *TINY)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run_dir = tmp_path / "outputs" / "ray-keel-test-ok"
    assert "job_id=keel-test-ok status=SUCCEEDED" in out.stdout
    assert "Keel run summary" in out.stdout  # the job's logs were streamed back
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 2
    assert _keel_submit(cluster, tmp_path, "--status", "keel-test-ok").stdout.strip() == "SUCCEEDED"
    assert "Keel run summary" in _keel_submit(cluster, tmp_path, "--logs", "keel-test-ok").stdout
    assert _keel_submit(cluster, tmp_path, "--stop", "keel-test-ok").stdout.strip() == "not running"


def test_keel_submit_rejects_a_bad_override_before_submitting(cluster: dict, tmp_path: Path) -> None:
    out = _keel_submit(cluster, tmp_path, "--job-id", "keel-test-typo", "mix.TT=2")
    assert out.returncode != 0 and "mix.TT" in out.stderr
    status = _keel_submit(cluster, tmp_path, "--status", "keel-test-typo")
    assert status.returncode != 0  # never submitted: the job server does not know it


def test_notebook_runs_green(cluster: dict, tmp_path: Path) -> None:
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(REPO / "launchers" / "notebook.ipynb", as_version=4)
    env = {**cluster, "KEEL_OVERRIDES": " ".join(TINY)}
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
        client.execute()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "SUCCEEDED" in text and "step   2" in text
    assert "mix.TT" in text  # the typo cell showed the validation error
