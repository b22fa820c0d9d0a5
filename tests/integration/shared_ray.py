"""One Ray cluster for the whole test session, which the integration runs join instead of each starting its own.

Starting Ray (its GCS, raylet, agents and pooled workers) and stopping it cost every `keel train` subprocess
about ten seconds; joining a running head costs under one. The head is a real `ray start --head --block`
listening on 127.0.0.1 with token authentication, as `slurm/sft.sh` starts one, so the joined path the tests
take is the one Slurm and Ray-job users take. It starts on first use and stops at the end of the session.

Tests about Ray's own start (test_ray_local) and the quick start's default path (test_train_e2e) keep
starting their own instance: `keel_env(shared_ray=False)`.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from keel.launch.ray_cluster import LOCAL_TRAIN_ENV

BIN = Path(sys.executable).parent
NUM_CPUS = 6  # the largest test group (2 workers x 1 CPU + Ray Data's headroom) with room to spare


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SharedHead:
    """A `ray start --head` in its own process group; :meth:`env` starts it on first use."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.client_env: dict[str, str] = {}
        self.tmp = Path(tempfile.mkdtemp(prefix="keel-test-ray-"))

    def env(self) -> dict[str, str]:
        """What a client needs to join the head (RAY_ADDRESS and the token)."""
        if self.proc is None:
            self._start()
        return self.client_env

    def _start(self) -> None:
        token, port = secrets.token_hex(32), _free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        # Loopback only (Ray binds a routable interface on Linux unless "clusters" are off), token auth on.
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
                   TOKENIZERS_PARALLELISM="false", WANDB_MODE="offline", **LOCAL_TRAIN_ENV)
        cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
               "--node-ip-address=127.0.0.1", f"--port={port}", "--include-dashboard=false",
               f"--num-cpus={NUM_CPUS}", "--disable-usage-stats", "--object-store-memory=536870912",
               f"--temp-dir={self.tmp / 'ray'}"]
        log = self.tmp / "head.log"
        self.proc = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                     start_new_session=True)  # its own group: teardown reaches every daemon
        # A client on this host finds the raylet at its own node address: loopback for it too.
        self.client_env = {"RAY_ADDRESS": f"127.0.0.1:{port}", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
                           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", **LOCAL_TRAIN_ENV}
        self._wait_until_up(log)

    def _wait_until_up(self, log: Path) -> None:
        probe = [sys.executable, "-c", "import ray; ray.init(); ray.shutdown()"]
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")}, **self.client_env}
        deadline = time.monotonic() + 120
        while subprocess.run(probe, env=env, capture_output=True, timeout=120).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"the shared Ray head did not start:\n{log.read_text()[-3000:]}")
            time.sleep(1)

    def stop(self) -> None:
        """SIGTERM to the whole group (Ray's daemons at once), then SIGKILL whatever of it is left."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=2)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc = None


HEAD = SharedHead()


def keel_env(shared_ray: bool = True, **extra: str) -> dict[str, str]:
    """The environment of a `keel` subprocess: this one's, W&B offline, joined to the session's Ray head
    (``shared_ray``) or starting its own instance (no RAY_ADDRESS)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN",
                                                            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    env["WANDB_MODE"] = "offline"
    if shared_ray:
        env.update(HEAD.env())
    return {**env, **extra}
