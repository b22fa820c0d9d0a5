"""Run logging on rank 0: ``metrics.jsonl``, a console progress bar and W&B (``logger``)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

SECRET_KEY = re.compile(r"(_KEY|_TOKEN|SECRET|PASSWORD)", re.IGNORECASE)


def redact(obj: Any) -> Any:
    """Copy of a config with secret-looking keys and known secret values blanked."""
    secrets = [v for k, v in os.environ.items() if SECRET_KEY.search(k) and len(v) >= 8]
    if isinstance(obj, dict):
        return {k: "<redacted>" if SECRET_KEY.search(str(k)) else redact(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    if isinstance(obj, str) and any(s in obj for s in secrets):
        return "<redacted>"
    return obj


def wandb_mode(mode: str) -> str:
    """``auto``: honour WANDB_MODE, else online with an API key, else offline."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


class RunLogger:
    """Writes one JSON object per optimizer step and mirrors it to W&B and the console."""

    def __init__(self, cfg: Any, run_dir: Path, plain_cfg: dict, total_steps: int) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.path.unlink(missing_ok=True)
        self.run = None
        if cfg.logger.name == "wandb":
            self.run = self._init_wandb(cfg, run_dir, plain_cfg)
        self.bar = None
        if cfg.trainer.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, desc="train", unit="step", dynamic_ncols=True)

    @staticmethod
    def _init_wandb(cfg: Any, run_dir: Path, plain_cfg: dict) -> Any:
        import wandb

        run = wandb.init(project=cfg.logger.project, entity=cfg.logger.entity, dir=str(run_dir),
                         mode=wandb_mode(cfg.logger.mode), config=redact(plain_cfg),
                         name=run_dir.name, reinit="finish_previous")
        run.define_metric("train/step")
        run.define_metric("*", step_metric="train/step")
        return run

    def log(self, metrics: dict) -> None:
        with self.path.open("a") as fh:
            fh.write(json.dumps(metrics) + "\n")
        if self.run is not None:
            self.run.log({("train/" + k if "/" not in k else k): v for k, v in metrics.items()})
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}")

    def finish(self, summary: dict) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.run is not None:
            for k, v in summary.items():
                if isinstance(v, (int, float, str)):
                    self.run.summary[k] = v
            self.run.finish()
