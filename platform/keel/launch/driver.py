"""The driver of ``keel train``: it orchestrates, in order, the run directory's lock, the Ray cluster's start
(in the background), the plugins, the data plan, the resume decision, the preemption handlers, the workers, the
run's summary and Ray's stop.

This module imports little: torch and transformers' tokenizers (the plugins, the data plan and the resume
decision need them) are imported after Ray has begun to start, so the two overlap; naming the attention backend
the workers will run (``keel.model.backends``) needs neither."""

from __future__ import annotations

import json
import time
from pathlib import Path

from omegaconf import OmegaConf

from keel.config import KeelConfig, to_plain
from keel.core.timeline import mark
from keel.launch import ray_train
from keel.launch.ray_cluster import BackgroundStart, stop_ray
from keel.launch.report import run_summary, summary_table
from keel.launch.runlock import hold_run_dir
from keel.launch.signals import EXIT_PREEMPTED, on_preemption
from keel.tracking.context import write_run_context
from keel.tracking.logger import STARTS, redact

__all__ = ["EXIT_PREEMPTED", "run_training"]  # EXIT_PREEMPTED: what `keel train` exits with when preempted


def run_training(cfg: KeelConfig, run_dir: Path) -> dict:
    """Everything ``keel train`` does after the config is composed and validated."""
    t0 = time.perf_counter()
    mark("config")  # imports, the composed and validated config
    lock = hold_run_dir(run_dir)
    ray_start = BackgroundStart(cfg)  # Ray's servers start while the driver imports and plans the data
    try:
        summary = _run(cfg, run_dir, lock.attempt, ray_start, t0)
    except BaseException:
        ray_start.settle()  # a failed run exits once Ray is up, so that its exit stops Ray in order
        raise
    stop_ray()  # now, rather than at the interpreter's exit
    return summary


def _run(cfg: KeelConfig, run_dir: Path, attempt: str, ray_start: BackgroundStart, t0: float) -> dict:
    # torch and transformers, imported while Ray starts (the module docstring)
    from keel.launch.prepare import prepare_data, worker_inputs
    from keel.mitigation import configured
    from keel.model.backends import expected
    from keel.train import resume

    print(f"attention backend: {expected(cfg.model.attention, cfg.cluster.use_gpu)}")  # the workers resolve it
    plugins = configured(cfg)
    path, tokenizer, plan = prepare_data(cfg, run_dir, plugins)
    mark("data_plan")
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(redact(to_plain(cfg))))  # as plugins left it
    meta = resume.run_meta(cfg, plan, tokenizer)
    start = resume.first_step(cfg, run_dir, meta)
    # every checkpoint names the run that wrote it
    inputs = worker_inputs(cfg, path, plan, start, {**meta, "attempt": attempt})
    (run_dir / STARTS).unlink(missing_ok=True)
    mark("worker_inputs")
    ray_start.wait()
    mark("ray_init")
    write_run_context(run_dir, cfg, plan.report)  # W&B group and data report for the rank-0 logger
    on_preemption(run_dir)  # after ray.init, which installs its own SIGTERM handler
    result = ray_train.run(cfg, run_dir, inputs)
    summary = run_summary(cfg, run_dir, plan, result, path, t0)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(summary_table(summary))
    mark("summary")
    return summary
