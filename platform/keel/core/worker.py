"""Where a training worker stands in the run: what the trainer and every worker-side plugin hook rely on."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class WorkerInfo:
    """What a worker needs besides the config and its bundles (built by ``keel.launch.ray_train``)."""

    rank: int
    world_size: int
    run_dir: Path
    model_path: str  # the base model's directory
    attention: str  # model.attention; the backend resolved on the worker once the trainer starts
    step_source_tokens: list[list[int]]  # per step, the tokens each source contributes (the metrics' data/tokens)
    source_names: list[str]
    run_meta: dict  # fingerprints stored with every checkpoint (keel.train.resume.run_meta)
    val_batches: list[dict] | None = None  # this rank's validation micro-batches (keel.train.validation)
