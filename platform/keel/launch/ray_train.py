"""Ray Train + Ray Data engine: packed step bundles streamed to DeepSpeed workers.

On the Ray cluster ``keel.launch.ray_cluster`` started or joined, a ``TorchTrainer`` runs
``cluster.num_workers`` workers (``keel.train.trainer`` on each), each streaming its own Ray dataset of
step bundles.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keel.config import KeelConfig, from_plain, to_plain
from keel.core.timeline import mark, process_started
from keel.launch import console
from keel.launch.ray_cluster import init_ray
from keel.launch.slurm import node_name

WORKER_RESULT = "worker_result.json"


@dataclass
class WorkerInputs:
    """What the driver ships to the workers besides the config (``keel.launch.prepare.worker_inputs``)."""

    model_path: str
    attention: str  # model.attention: the workers resolve it
    bundles: list[dict]  # every rank's step bundles from the first step to train on, step-major
    step_source_tokens: list[list[int]]  # per step, the tokens of each source
    source_names: list[str]
    run_meta: dict  # what every checkpoint records about the run (keel.train.resume.run_meta, the attempt)
    val_batches: list[list[dict]] | None = None  # per rank, its validation micro-batches


def _gather_nodes(world_size: int) -> list[str]:
    """Every rank's node name, in rank order (a collective: all ranks call it)."""
    import torch.distributed as dist

    names: list[Any] = [None] * world_size
    dist.all_gather_object(names, node_name())
    return [str(n) for n in names]


def train_loop_per_worker(config: dict) -> None:
    """Entry point on every Ray Train worker."""
    import ray.train

    ctx = ray.train.get_context()
    first = ctx.get_world_rank() == 0
    if first:
        began = process_started()
        if began is not None:
            mark("worker_process", at=began)  # the controller placed the workers; rank 0's process began
        mark("worker_start")  # Ray Train's worker group is up
    from keel.core.worker import WorkerInfo
    from keel.tracking.secrets import load_secret_files
    from keel.train.trainer import train

    if first:
        mark("worker_imports")
    load_secret_files()  # keel submit --secret-file: each worker reads the files on its own node
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
        mark("worker_group")  # every rank's node known: the process group works
    result = train(cfg, info, bundles)
    if info.rank == 0:
        result["rank_to_node"] = {str(r): n for r, n in enumerate(nodes)}
        result["nodes"] = sorted(set(nodes))
        (info.run_dir / WORKER_RESULT).write_text(json.dumps(result))
        mark("worker_end")


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


def _print_launch(cfg: KeelConfig, run_dir: Path) -> None:
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


def run(cfg: KeelConfig, run_dir: Path, inputs: WorkerInputs) -> dict:
    """Run distributed training; returns rank 0's result. A failed worker group is reported as what the user can
    act on where the workers said so: the ranks that stalled, a corrupt checkpoint."""
    started = time.time()
    init_ray(cfg)
    trainer = _torch_trainer(cfg, run_dir, inputs)
    _print_launch(cfg, run_dir)
    mark("fit_start")
    try:
        with console.following(run_dir):  # rank 0's console lines; the workers' logs on failure
            trainer.fit()
        mark("fit_end")
    except Exception as err:
        explained = _explained(err, run_dir, started)
        if explained is err:
            raise
        raise explained from err
    return json.loads((run_dir / WORKER_RESULT).read_text())


def trainer_class() -> type:
    """Ray Train's ``TorchTrainer``, less its ``PlacementGroupCleanerCallback``.

    That callback starts a detached actor per run (a Ray worker process of its own: about 2 CPU-seconds, in the
    middle of the worker group's start) that removes the workers' placement group should the controller die while
    its job lives on. Keel's driver ends its job whenever ``fit`` returns or raises, and a job's placement groups
    go with it, so the actor would only ever watch. Where Ray has no such callback, this is ``TorchTrainer``."""
    from ray.train.torch import TorchTrainer

    class KeelTorchTrainer(TorchTrainer):
        def _create_default_callbacks(self) -> list:
            return [cb for cb in super()._create_default_callbacks()
                    if type(cb).__name__ != "PlacementGroupCleanerCallback"]

    return KeelTorchTrainer


def _torch_trainer(cfg: KeelConfig, run_dir: Path, inputs: WorkerInputs) -> Any:
    """Ray Train's TorchTrainer of ``cluster.num_workers`` workers, each with its own dataset of step bundles."""
    from ray.train import DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    loop_config = {"cfg": to_plain(cfg), "run_dir": str(run_dir), "model_path": inputs.model_path,
                   "attention": inputs.attention, "step_source_tokens": inputs.step_source_tokens,
                   "source_names": inputs.source_names, "run_meta": inputs.run_meta,
                   "val_refs": _put(inputs.val_batches)}
    c = cfg.cluster
    return trainer_class()(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if c.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=c.num_workers, use_gpu=c.use_gpu,
                                     resources_per_worker={"CPU": c.cpus_per_worker},
                                     placement_strategy=c.ray_placement),
        run_config=RunConfig(name="keel", storage_path=str(run_dir.resolve() / "ray"),
                             failure_config=FailureConfig(max_failures=c.max_failures)),
        datasets=_datasets(inputs.bundles, c.num_workers),
        dataset_config=DataConfig(datasets_to_split=[]),  # each rank reads only its own dataset
    )


def _explained(err: Exception, run_dir: Path, started: float) -> Exception:
    """The error to report for a failed worker group: the stalled ranks, a corrupt checkpoint, or ``err`` itself."""
    from keel.train import resume, watchdog

    dumps = watchdog.reports(run_dir, since=started)
    if dumps:  # the workers ended themselves after a stall: say where, not just "actor died"
        return RuntimeError(watchdog.stalled_message(dumps))
    corrupt = resume.corruption_in(err)
    if corrupt:  # found by the ranks hashing what they load: a user decision, not a traceback
        return resume.corruption_error(corrupt)
    return err
