"""Where a training worker stands in the run: what every worker-side hook may rely on."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class Worker:
    """One data-parallel rank of a run (``keel.train.trainer.WorkerInfo`` adds what the trainer needs)."""

    rank: int
    world_size: int
    run_dir: Path
    model_path: str  # the base model's directory
