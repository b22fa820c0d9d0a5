"""The driver's data preparation: the packed row plan of the run (built, or read from ``data.preprocessed``),
its warnings and tables, and what each worker gets of it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from keel.config import KeelConfig, to_plain
from keel.launch.ray_train import WorkerInputs
from keel.launch.report import print_mixture
from keel.mitigation.base import Plugin
from keel.tracking.logger import redact

if TYPE_CHECKING:
    from keel.data.pipeline import RowPlan


def prepare_data(cfg: KeelConfig, run_dir: Path, plugins: list[Plugin]) -> tuple[str, Any, RowPlan]:
    """Model path, tokenizer and the packed row plan (built, or read from ``data.preprocessed``);
    writes rejects.jsonl."""
    from keel.data import pipeline
    from keel.mitigation import adjust_hook, schedule_hook, warnings_for
    from keel.model.build import load_tokenizer, model_path

    path = model_path(cfg)
    tokenizer = load_tokenizer(path, cfg.model.trust_remote_code)
    if cfg.data.preprocessed:
        plan, rejects = _preprocessed(cfg, tokenizer, run_dir)
    else:
        extra = tuple(src for p in plugins for src in p.extra_sources())
        plan, rows = pipeline.build(cfg, tokenizer, extra, adjust_hook(plugins), schedule_hook(plugins))
        _write_rejects(run_dir, rows)
        rejects = len(rows)
    pipeline.settle_length(cfg, plan.report)  # trainer.epochs: max_steps is now the planned steps
    # Preprocessed rows already hold (or lack) replay and progressive mixing: those plugins have no rows to check.
    checked = [p for p in plugins if not (cfg.data.preprocessed and p.shapes_rows)]
    for warning in warnings_for(cfg, checked, plan.report):
        print(f"warning: {warning}")
    for note in plan.report["self_check"]["notes"]:
        print(f"note: {note}")
    print_mixture(plan.report)
    if rejects:
        print(f"data: {rejects} rows rejected, see {run_dir / 'rejects.jsonl'}")
    return path, tokenizer, plan


def _write_rejects(run_dir: Path, rejects: list[dict]) -> None:
    with (run_dir / "rejects.jsonl").open("w") as fh:
        for r in rejects:
            fh.write(json.dumps(r, default=str) + "\n")


def _preprocessed(cfg: KeelConfig, tokenizer: Any, run_dir: Path) -> tuple[RowPlan, int]:
    """The rows of ``data.preprocessed`` and its reject count; its rejects.jsonl is copied into the run."""
    import shutil

    from keel.data import preprocessed_dir as preprocessed
    from keel.launch import runlock

    reading = runlock.acquire_shared(Path(cfg.data.preprocessed))  # refused while `keel preprocess` writes it
    try:
        plan, notes = preprocessed.load(cfg, tokenizer, redact(to_plain(cfg)))  # as report.json records it
        shutil.copyfile(Path(cfg.data.preprocessed) / "rejects.jsonl", run_dir / "rejects.jsonl")
    finally:
        runlock.release(reading)
    for note in notes:
        print(note)
    return plan, sum(s["rejected"] for s in plan.report["sources"].values())


def val_batches(val: RowPlan | None, cfg: KeelConfig) -> list[list[dict]] | None:
    """Per rank, its validation micro-batches (``keel.train.validation.micro_batches``); None without validation."""
    if val is None:
        return None
    from keel.train.validation import micro_batches

    return micro_batches(val, cfg.cluster.num_workers, cfg.trainer.micro_batch_size)


def worker_inputs(cfg: KeelConfig, model_path: str, plan: RowPlan, start: int, run_meta: dict) -> WorkerInputs:
    """What the workers get: their rows from step ``start`` (the resumed one) on, and what every worker knows."""
    from keel.data.rank_bundles import step_bundles, step_source_tokens

    t, world = cfg.trainer, cfg.cluster.num_workers
    # The plan is a pure function of the config: resuming ships exactly the rows from the
    # checkpoint's step on, nothing re-read or replayed (the last step's rows if already done).
    first = min(start, t.max_steps - 1)
    bundles = [b for b in step_bundles(plan, world, t.grad_accum, t.micro_batch_size) if b["step"] >= first]
    return WorkerInputs(model_path, cfg.model.attention, bundles,
                        step_source_tokens(plan, world, t.grad_accum, t.micro_batch_size), plan.source_names,
                        run_meta, val_batches(plan.val, cfg))
