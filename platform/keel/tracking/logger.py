"""Run logging on rank 0: ``metrics.jsonl``, a console progress bar and W&B (``logger``)."""

from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path
from typing import Any

STARTS = "starts.jsonl"
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

    def __init__(self, cfg: Any, run_dir: Path, plain_cfg: dict, total_steps: int, start_step: int = 0) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.history = self._history(start_step)
        with (run_dir / STARTS).open("a") as fh:  # one line per worker-group start (restarts)
            fh.write(json.dumps({"start_step": start_step}) + "\n")
        self.run = None
        if cfg.logger.name == "wandb":
            self.run = self._init_wandb(cfg, run_dir, plain_cfg)
        self.bar = None
        if cfg.trainer.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def _history(self, start_step: int) -> list[dict]:
        """Metrics of steps <= start_step; later lines (work lost since the checkpoint) are dropped."""
        if not self.path.is_file():
            return []
        rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        kept = [r for r in rows if r["step"] <= start_step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        return kept

    def totals(self) -> dict:
        """Run-level figures over every step of the run, resumed ones included."""
        h = self.history
        return {"steps": len(h), "loss_first": h[0]["loss"], "loss_last": h[-1]["loss"],
                "tokens_trained": sum(r["tokens"] for r in h),
                "tokens_per_s": sum(r["tokens"] for r in h) / max(sum(r["step_s"] for r in h), 1e-9)}

    @staticmethod
    def _init_wandb(cfg: Any, run_dir: Path, plain_cfg: dict) -> Any:
        import wandb

        id_file = run_dir / "wandb_id.txt"  # one W&B run per Keel run, across restarts
        if not id_file.is_file():
            id_file.write_text(uuid.uuid4().hex[:12])
        run = wandb.init(project=cfg.logger.project, entity=cfg.logger.entity, dir=str(run_dir),
                         mode=wandb_mode(cfg.logger.mode), config=redact(plain_cfg), id=id_file.read_text(),
                         resume="allow", name=run_dir.name, reinit="finish_previous")
        run.define_metric("train/step")
        run.define_metric("*", step_metric="train/step")
        return run

    def log(self, metrics: dict) -> None:
        self.history.append(metrics)
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
