"""A single-node Ray instance started by Keel listens on loopback only and requires a fresh token."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.integration

PROBE = textwrap.dedent("""
    import json, os, sys
    import psutil
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf
    from keel.launch import ray_cluster

    with initialize_config_module(config_module="keel.conf", version_base=None):
        cfg = OmegaConf.to_object(compose(config_name="config", overrides=["logger=none"]))
    ray_cluster.init_ray(cfg)
    import ray

    @ray.remote
    def pid():
        return os.getpid()

    ray.get([pid.remote() for _ in range(2)])  # workers up: their gRPC servers listen too
    me = psutil.Process()
    procs = [me, *me.children(recursive=True)]
    sockets = []
    for p in procs:
        try:
            sockets += [[p.pid, p.name(), c.laddr.ip, c.laddr.port] for c in p.net_connections(kind="inet")
                        if c.status == psutil.CONN_LISTEN]
        except psutil.Error:
            pass
    env = next(p for p in procs if p.name() == "gcs_server").environ()
    print(json.dumps({"sockets": sockets, "auth_mode": env.get("RAY_AUTH_MODE"), "token": env.get("RAY_AUTH_TOKEN"),
                      "gcs": ray.get_runtime_context().gcs_address, "processes": len(procs)}), flush=True)
    sys.stdin.read()  # stays up while the test tries to join without the token
    ray.shutdown()
""")

JOIN = textwrap.dedent("""
    import sys, ray
    try:
        ray.init(address=sys.argv[1], configure_logging=False)
    except Exception as err:
        sys.exit(f"refused: {type(err).__name__}: {err}")
    print("joined")
""")

LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")


def test_local_ray_listens_on_loopback_only_with_a_fresh_token(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    probe = subprocess.Popen([sys.executable, "-c", PROBE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        line = probe.stdout.readline()
        assert line, probe.stderr.read()[-4000:]
        seen = json.loads(line)
        outside = [s for s in seen["sockets"] if s[2] not in LOOPBACK]
        assert seen["sockets"] and not outside, outside  # GCS, raylet, workers, agents: none on another interface
        names = {s[1] for s in seen["sockets"]}
        assert {"gcs_server", "raylet"} <= names, names
        assert seen["auth_mode"] == "token" and len(seen["token"] or "") >= 32
        (tmp_path / "home").mkdir()  # no ~/.ray/auth_token to fall back on
        # A local client without the token (on loopback, where the GCS listens) is turned away.
        client = {**env, "HOME": str(tmp_path / "home"), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                  "RAY_gcs_rpc_server_connect_timeout_s": "3"}  # it retries: give up sooner
        joined = subprocess.run([sys.executable, "-c", JOIN, seen["gcs"]], capture_output=True, text=True,
                                timeout=120, env=client, cwd=tmp_path)
        assert joined.returncode != 0 and "InvalidAuthToken" in joined.stderr, joined.stderr[-3000:]
        assert "refused" in joined.stderr.splitlines()[-1]
    finally:
        probe.stdin.close()
        probe.wait(timeout=120)
