"""Ray Train + Ray Data engine: packed step bundles streamed to DeepSpeed workers.

``cluster=local`` starts a Ray instance on this host (or joins one named by
``cluster.address`` / ``RAY_ADDRESS``); ``cluster=slurm`` joins the one ``slurm/sft.sh``
started on the job's nodes and waits until all of them are alive. Either runs a
``TorchTrainer`` with ``cluster.num_workers`` workers, each streaming its own Ray dataset of
step bundles.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from keel.config import from_plain, to_plain
from keel.errors import ConfigError, UserError
from keel.launch import console

WORKER_RESULT = "worker_result.json"


def _worker_env(cfg: Any) -> dict[str, str]:
    env = {"TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    if not cfg.cluster.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    for key in ("KEEL_CACHE_DIR", "WANDB_MODE", "WANDB_DIR", "HF_HOME", "HF_HUB_OFFLINE", "TORCH_EXTENSIONS_DIR",
                "KEEL_SECRET_FILES", console.VERBOSE_ENV):
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


def init_ray(cfg: Any) -> None:
    """Start or join Ray; a local instance listens on 127.0.0.1 only and requires a fresh token."""
    import ray

    if ray.is_initialized():
        return
    env = _worker_env(cfg)
    os.environ.update(env)
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS")
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


def node_name() -> str:
    """The Slurm node this process runs on (set by slurmd for every step), else the hostname."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def _gather_nodes(world_size: int) -> list[str]:
    """Every rank's node name, in rank order (a collective: all ranks call it)."""
    import torch.distributed as dist

    names: list[Any] = [None] * world_size
    dist.all_gather_object(names, node_name())
    return [str(n) for n in names]


def train_loop_per_worker(config: dict) -> None:
    """Entry point on every Ray Train worker."""
    import ray.train

    from keel.tracking.secrets import load_secret_files
    from keel.train.loop import WorkerInfo, train

    load_secret_files()  # keel submit --secret-file: each worker reads the files on its own node
    ctx = ray.train.get_context()
    console.setup_worker(Path(config["run_dir"]), ctx.get_world_rank())  # before anything prints
    cfg = from_plain(config["cfg"])
    info = WorkerInfo(rank=ctx.get_world_rank(), world_size=ctx.get_world_size(),
                      run_dir=Path(config["run_dir"]), model_path=config["model_path"],
                      attention=config["attention"], step_source_tokens=config["step_source_tokens"],
                      source_names=config["source_names"], run_meta=config["run_meta"])
    if config.get("val_refs"):
        import ray

        info.val_batches = ray.get(config["val_refs"][info.rank])  # this rank's validation micro-batches
    shard = ray.train.get_dataset_shard(_shard_name(info.rank))
    batches = shard.iter_batches(batch_size=1, batch_format="numpy", prefetch_batches=1)
    bundles = ({k: v[0] for k, v in b.items()} for b in batches)
    nodes = _gather_nodes(info.world_size)
    if info.rank == 0:
        print(f"workers: {_where(nodes)}", flush=True)
    result = train(cfg, info, bundles)
    if info.rank == 0:
        result["rank_to_node"] = {str(r): n for r, n in enumerate(nodes)}
        result["nodes"] = sorted(set(nodes))
        (info.run_dir / WORKER_RESULT).write_text(json.dumps(result))


def _where(nodes: list[str]) -> str:
    """Which ranks run on which node, e.g. ``node1 (ranks 0-7), node2 (ranks 8-15)``."""
    by_node: dict[str, list[int]] = {}
    for rank, node in enumerate(nodes):
        by_node.setdefault(node, []).append(rank)
    return ", ".join(f"{n} (rank{'s' if len(r) > 1 else ''} {r[0]}{f'-{r[-1]}' if len(r) > 1 else ''})"
                     for n, r in by_node.items())


def _shard_name(rank: int) -> str:
    return f"train_{rank}"


def _datasets(bundles: list[dict], world: int) -> dict[str, Any]:
    """One Ray dataset per rank holding that rank's bundles in step order.

    ``streaming_split`` balances blocks across consumers but hands each block to whichever
    consumer asks first, so a rank could get another rank's bundle or a later step first
    (seen across nodes). Routing by slot keeps the layout exact on any cluster.
    """
    import ray.data

    by_rank: dict[int, list[dict]] = {rank: [] for rank in range(world)}
    for b in bundles:  # one pass; the bundles come step-major, so each list is in step order
        by_rank[b["slot"]].append(b)
    # One block per bundle, so the worker's prefetch streams bundles one by one.
    return {_shard_name(rank): ray.data.from_items(mine, override_num_blocks=max(len(mine), 1))
            for rank, mine in by_rank.items()}


def _print_launch(cfg: Any, run_dir: Path) -> None:
    """What runs where, before the workers start."""
    from keel.train.schedule import describe

    c = cfg.cluster
    device = "GPU, nccl" if c.use_gpu else "CPU, gloo"
    logs = "" if console.verbose() else f"; worker logs in {console.logs_dir(run_dir)} (keel train -v shows them here)"
    print(f"launch: {c.num_workers} Ray Train workers ({device}, {c.cpus_per_worker} CPU each), DeepSpeed "
          f"ZeRO-{cfg.deepspeed.stage}, {cfg.trainer.max_steps} steps{logs}")
    print(describe(cfg.trainer), flush=True)


def _put(val_batches: list[list[dict]] | None) -> list[Any] | None:
    """Each rank's validation micro-batches in the object store (every worker fetches only its own, once)."""
    import ray

    return None if val_batches is None else [ray.put(mine) for mine in val_batches]


def run(cfg: Any, run_dir: Path, model_path: str, attention: str, bundles: list[dict],
        step_source_tokens: list[list[int]], source_names: list[str], run_meta: dict,
        val_batches: list[list[dict]] | None = None) -> dict:
    """Run distributed training (``val_batches``: each rank's validation micro-batches); returns rank 0's result."""
    from ray.train import DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    init_ray(cfg)
    loop_config = {"cfg": to_plain(cfg), "run_dir": str(run_dir), "model_path": model_path,
                   "attention": attention, "step_source_tokens": step_source_tokens,
                   "source_names": source_names, "run_meta": run_meta, "val_refs": _put(val_batches)}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if cfg.cluster.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.cluster.num_workers, use_gpu=cfg.cluster.use_gpu,
                                     resources_per_worker={"CPU": cfg.cluster.cpus_per_worker},
                                     placement_strategy=cfg.cluster.ray_placement),
        run_config=RunConfig(name="keel", storage_path=str(run_dir.resolve() / "ray"),
                             failure_config=FailureConfig(max_failures=cfg.cluster.max_failures)),
        datasets=_datasets(bundles, cfg.cluster.num_workers),
        dataset_config=DataConfig(datasets_to_split=[]),  # each rank reads only its own dataset
    )
    _print_launch(cfg, run_dir)
    with console.following(run_dir):  # rank 0's console lines; the workers' logs on failure
        trainer.fit()
    return json.loads((run_dir / WORKER_RESULT).read_text())
