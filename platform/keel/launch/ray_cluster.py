"""Starting or joining the Ray cluster a command runs on (``keel train``, ``keel preprocess``).

``cluster=local`` starts a Ray instance on this host (or joins one named by ``cluster.address`` /
``RAY_ADDRESS``); ``cluster=slurm`` joins the one ``slurm/sft.sh`` started on the job's nodes and waits
until all of them are alive. A local instance listens on 127.0.0.1 only and requires a fresh token.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from keel.config import KeelConfig
from keel.core import timeline
from keel.errors import ConfigError, UserError
from keel.launch import console

# Ray and Ray Train on an instance of one host that keel train started itself (a setting of the user's wins):
LOCAL_TRAIN_ENV = {
    # No node of a one-host instance is drained by an autoscaler: its watcher actor would be a process
    # started for nothing (Keel handles the scheduler's SIGTERM itself, keel.launch.signals).
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    # The raylet starts a worker per CPU ahead of the first job; Ray Train's and Ray Data's actors run
    # in processes of their own runtime environment, so those workers only idled (about 1 CPU-second each).
    "RAY_prestart_worker_first_driver": "0",
}


def worker_env(cfg: KeelConfig) -> dict[str, str]:
    """The environment of every Ray worker of ``keel train`` (and of the driver, which sets it too)."""
    env = {"TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    if not cfg.cluster.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    for key in ("KEEL_CACHE_DIR", "WANDB_MODE", "WANDB_DIR", "HF_HOME", "HF_HUB_OFFLINE", "TORCH_EXTENSIONS_DIR",
                "KEEL_SECRET_FILES", console.VERBOSE_ENV, timeline.ENV):
        if os.environ.get(key):
            env[key] = os.environ[key]
    if "TORCH_EXTENSIONS_DIR" not in env:  # JIT builds per environment, not in a cache every environment shares
        from keel.model.tiny import cache_root
        from keel.train.startup import extensions_dir

        env["TORCH_EXTENSIONS_DIR"] = str(extensions_dir(cache_root()))
    return {**env, **console.worker_env()}


def secure_local_start() -> None:
    """Before ``ray.init`` starts a single-node instance: its servers listen on loopback only and it requires a
    fresh token (Ray >= 2.52; this process and the Ray processes it starts inherit it)."""
    import secrets

    import ray._private.ray_constants as ray_constants

    # Ray takes a routable interface as the node address on Linux, and binds the GCS, raylet, workers and
    # agents to it (or to all interfaces); with "clusters" off it uses 127.0.0.1, as it does on macOS.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False  # read when Ray was imported: this process needs it set too
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
    # Ray read its config and token when it was imported; it refreshes them so when it enables auth itself.
    import ray._raylet as raylet

    raylet.Config.initialize("")
    raylet.AuthenticationTokenLoader.instance().reset_cache()


def init_ray(cfg: KeelConfig, local_cpus: int | None = None) -> None:
    """Start or join Ray (once per process). ``local_cpus`` (``keel preprocess --procs``): a local instance of
    that many CPUs for Ray Data, whose workers' output is streamed; without it, or when joining a cluster,
    Ray as ``keel train``'s workers need it."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    if address or local_cpus is None:
        _init_for_training(cfg, address)
        return
    secure_local_start()  # loopback only, token auth
    ray.init(num_cpus=local_cpus, object_store_memory=cfg.cluster.object_store_memory_mb * 2**20,
             include_dashboard=False, log_to_driver=True, configure_logging=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})


class BackgroundStart:
    """``init_ray(cfg)`` in a thread, so Ray's servers start while the driver plans the data (the two are
    independent; Ray's start is mostly waiting on its own processes). :meth:`wait` re-raises its error.

    The thread outlives the start: Ray starts its GCS and raylet with ``PR_SET_PDEATHSIG``, which kills them
    when the *thread* that started them ends, so it parks until the process exits (a daemon, it never holds
    the exit up; a driver that fails meanwhile takes Ray's processes with it the same way)."""

    def __init__(self, cfg: KeelConfig) -> None:
        self.error: BaseException | None = None
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(cfg,), name="keel-ray-start", daemon=True)
        self.thread.start()

    def _run(self, cfg: KeelConfig) -> None:
        try:
            with _quiet_sigterm_notice():
                init_ray(cfg)
            import ray.train.torch  # noqa: F401  (the driver's next import, while it still plans the data)
        except BaseException as err:  # handed to the main thread by wait()
            self.error = err
        self.ready.set()
        if self.error is None:
            threading.Event().wait()  # parked for the process's life (see the class docstring)

    def wait(self) -> None:
        """Block until Ray is up; its start-up error, if any, raised here."""
        self.ready.wait()
        if self.error is not None:
            raise self.error

    def settle(self) -> None:
        """Block until the start has ended, either way (a driver that failed meanwhile exits after it)."""
        self.ready.wait()


def stop_ray() -> None:
    """Stop Ray at the end of a run: leave a joined cluster; stop an instance this process started at once.

    Ray stops its processes one after the other, giving each a second to exit after SIGTERM; its autoscaler
    monitor, of no use on one host, never exits within that second, so it is killed first. At the
    interpreter's exit Ray also sleeps half a second first; this stop spares that too."""
    import ray

    if not ray.is_initialized():
        return
    node = getattr(ray._private.worker, "_global_node", None)  # set only where this process started Ray
    if node is not None:
        for info in node.all_processes.get("monitor", []):
            info.process.kill()
    ray.shutdown()


class _DropSigtermNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "SIGTERM handler is not set" not in record.getMessage()


class _quiet_sigterm_notice:
    """Ray warns that it set no SIGTERM handler off the main thread; the driver installs its own
    (``keel.launch.signals.on_preemption``) once Ray is up, so the notice says nothing to the user."""

    def __enter__(self) -> None:
        self.filter = _DropSigtermNotice()
        logging.getLogger("ray._private.worker").addFilter(self.filter)

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("ray._private.worker").removeFilter(self.filter)


def _init_for_training(cfg: KeelConfig, address: str | None) -> None:
    """Join ``address``, or start a local instance sized for ``cluster.num_workers`` training workers."""
    import ray

    env = worker_env(cfg)
    os.environ.update(env)
    kwargs: dict[str, Any] = {"runtime_env": {"env_vars": env}, "log_to_driver": console.verbose(),
                              "configure_logging": False}
    if address:
        ray.init(address=address, **kwargs)
        wait_for_nodes(cfg.cluster.num_nodes, cfg.cluster.join_timeout_s)
        return
    if cfg.cluster.name == "slurm":
        raise ConfigError("cluster=slurm joins the Ray cluster that slurm/sft.sh starts on the job's nodes, "
                          "but neither RAY_ADDRESS nor cluster.address is set")
    secure_local_start()  # every Ray server on 127.0.0.1, token auth with a fresh token
    for key, value in LOCAL_TRAIN_ENV.items():  # Ray Train passes them on to its controller and workers
        os.environ.setdefault(key, value)
    # Logical CPUs: one per worker plus headroom for Ray Data's coordinator tasks.
    ray.init(num_cpus=cfg.cluster.num_workers * cfg.cluster.cpus_per_worker + 2,
             object_store_memory=cfg.cluster.object_store_memory_mb * 2**20,
             include_dashboard=False, dashboard_host="127.0.0.1", **kwargs)


def wait_for_nodes(expected: int, timeout_s: float) -> int:
    """Block until ``expected`` Ray nodes are alive; a clear error after ``timeout_s``."""
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        alive = sum(1 for n in ray.nodes() if n["Alive"])
        if alive >= expected:
            print(f"ray: {alive} node(s) alive")
            return alive
        if time.monotonic() > deadline:
            raise UserError(f"only {alive} of cluster.num_nodes={expected} Ray nodes joined within "
                            f"{timeout_s}s (cluster.join_timeout_s); see the Ray node logs")
        time.sleep(2)
