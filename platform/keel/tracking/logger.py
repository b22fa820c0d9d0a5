"""Run logging on rank 0: ``metrics.jsonl``, console progress lines and W&B (``logger``)."""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from keel.tracking.context import (
    MIX_COLUMNS,
    SCHEDULE_COLUMNS,
    mixture_rows,
    read_group,
    read_report,
    run_tags,
    schedule_rows,
    step_weights,
)
from keel.tracking.namespace import STEP, TOKENS_SEEN, define_metrics, wandb_row
from keel.tracking.secrets import redact

if TYPE_CHECKING:
    from keel.config import KeelConfig


STARTS = "starts.jsonl"
GENERATIONS = "generations.jsonl"
EVALS = "eval.jsonl"
GENERATION_COLUMNS = ("step", "prompt", "completion", "score")
SOURCE_TOKENS = "data/tokens/"


def wandb_mode(mode: str) -> str:
    """``auto``: honour WANDB_MODE, else online with an API key, else offline."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def _rows_up_to(path: Path, start_step: int) -> list[dict]:
    """Rows of a JSONL file with ``step <= start_step``; later ones (work lost since the checkpoint) are dropped."""
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    kept = [r for r in rows if r["step"] <= start_step]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return kept


def mix_row(metrics: dict, report: dict) -> dict:
    """``mix/share/<source>``: its share of the step's tokens; ``mix/weight/<source>``: its scheduled weight."""
    tokens = {k[len(SOURCE_TOKENS):]: v for k, v in metrics.items() if k.startswith(SOURCE_TOKENS)}
    total = sum(tokens.values())
    row = {f"mix/share/{k}": v / total for k, v in tokens.items()} if total else {}
    row.update({f"mix/weight/{k}": w for k, w in step_weights(report, metrics["step"] - 1).items()})
    return row


def progress_line(metrics: dict, total: int, eta_s: float | None) -> str:
    """The console's line for a step: step, loss, lr, tokens/s and the time left."""
    eta = str(timedelta(seconds=round(eta_s))) if eta_s is not None else "--"
    return (f"step {metrics['step']}/{total}  loss {metrics['loss']:.4f}  lr {metrics['lr']:.3e}  "
            f"{metrics['tokens_per_s']:,.0f} tok/s  ETA {eta}")


class Progress:
    """One console line every ``every`` steps and at the last; the ETA runs on the wall clock since the first
    step this start logged (which pays for warm-up), so evaluations and checkpoints count in it."""

    def __init__(self, total: int, every: int) -> None:
        self.total, self.every = total, every
        self.first: tuple[int, float] | None = None

    def line(self, metrics: dict, now: float) -> str | None:
        step = metrics["step"]
        if self.first is None:
            self.first = (step, now)
        if step % self.every and step != self.total:
            return None
        done, t0 = step - self.first[0], self.first[1]
        eta = (now - t0) / done * (self.total - step) if done else None
        return progress_line(metrics, self.total, eta)


def system_row() -> dict:
    """Peak host memory of this process and, once CUDA is in use, the device memory (GiB)."""
    import resource

    row = {"system/max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # KiB on Linux
    torch = sys.modules.get("torch")  # imported by the training loop; never imported here
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        row["system/gpu_mem_allocated_gib"] = torch.cuda.memory_allocated() / 2**30
        row["system/gpu_max_mem_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        row["system/gpu_mem_reserved_gib"] = torch.cuda.memory_reserved() / 2**30
    return row


class RunLogger:
    """Writes one JSON object per optimizer step and mirrors it to W&B and the console."""

    def __init__(self, cfg: KeelConfig, run_dir: Path, plain_cfg: dict, total_steps: int, start_step: int = 0) -> None:
        self.run_dir = run_dir
        self.path = run_dir / "metrics.jsonl"
        self.history = _rows_up_to(self.path, start_step)  # later lines: work lost since the checkpoint
        self.tokens_seen = sum(r["tokens"] for r in self.history)
        _rows_up_to(run_dir / GENERATIONS, start_step)
        self.eval_history = _rows_up_to(run_dir / EVALS, start_step)  # in-training evaluations (eval.every_n_steps)
        with (run_dir / STARTS).open("a") as fh:  # one line per worker-group start (restarts)
            fh.write(json.dumps({"start_step": start_step}) + "\n")
        self.report = read_report(run_dir)
        self.log_every = cfg.logger.log_every
        self.run = None
        if cfg.logger.name == "wandb":
            self.run, fresh = self._init_wandb(cfg, run_dir, plain_cfg)
            if fresh:
                self._log_mixture(start_step)
        self.progress = Progress(total_steps, self.log_every) if cfg.trainer.progress else None

    def totals(self) -> dict:
        """Run-level figures over every step of the run, resumed ones included."""
        h = self.history
        return {"steps": len(h), "loss_first": h[0]["loss"], "loss_last": h[-1]["loss"],
                "tokens_trained": self.tokens_seen,
                "tokens_per_s": self.tokens_seen / max(sum(r["step_s"] for r in h), 1e-9)}

    @staticmethod
    def _init_wandb(cfg: KeelConfig, run_dir: Path, plain_cfg: dict) -> tuple[Any, bool]:
        """The W&B run and whether this start created it (one W&B run per Keel run, across restarts)."""
        import wandb

        id_file = run_dir / "wandb_id.txt"
        fresh = not id_file.is_file()
        if fresh:
            id_file.write_text(uuid.uuid4().hex[:12])
        mode = wandb_mode(cfg.logger.mode)
        run = wandb.init(project=cfg.logger.project, entity=cfg.logger.entity, dir=str(run_dir),
                         mode=mode, config=redact(plain_cfg), id=id_file.read_text(),
                         resume="allow", name=run_dir.name, group=read_group(run_dir), job_type="sft",
                         tags=run_tags(cfg), reinit="finish_previous")
        define_metrics(run)
        url = getattr(run, "url", None) if mode == "online" else None  # offline runs warn when asked for one
        where = url or f"{mode} run in {run_dir / 'wandb'}"
        print(f"wandb: {where}", flush=True)
        return run, fresh

    def _log_mixture(self, step: int) -> None:
        """The realised mixture (and the schedule's segments) as W&B tables, once per W&B run."""
        import wandb

        row: dict[str, Any] = {STEP: step}
        if self.report.get("sources"):
            row["mix/realised"] = wandb.Table(columns=list(MIX_COLUMNS), data=mixture_rows(self.report))
        if schedule_rows(self.report):
            row["mix/schedule"] = wandb.Table(columns=list(SCHEDULE_COLUMNS), data=schedule_rows(self.report))
        if len(row) > 1:
            self.run.log(row)

    def wandb_row(self, metrics: dict) -> dict:
        """A step's W&B row: the namespaced metrics, tokens seen so far, the mixture and memory."""
        return {**wandb_row(metrics), TOKENS_SEEN: self.tokens_seen, **mix_row(metrics, self.report),
                **system_row()}

    def log(self, metrics: dict) -> None:
        self.history.append(metrics)
        self.tokens_seen += metrics["tokens"]
        with self.path.open("a") as fh:
            fh.write(json.dumps(metrics) + "\n")
        if self.run is not None and metrics["step"] % self.log_every == 0:
            self.run.log(self.wandb_row(metrics))
        line = self.progress.line(metrics, time.monotonic()) if self.progress is not None else None
        if line is not None:
            print(line, flush=True)

    def log_eval(self, row: dict, generations: list[dict]) -> None:
        """One in-training evaluation: appended to ``eval.jsonl``, and its ``eval/`` and ``forgetting/`` keys
        plus the generations table to W&B."""
        self.eval_history.append(row)
        with (self.run_dir / EVALS).open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.run is not None:
            self.run.log(wandb_row(row))
        if generations:
            self.log_generations(row["step"], generations)

    def log_generations(self, step: int, rows: list[dict]) -> None:
        """Sample generations at an eval point: appended to ``generations.jsonl``, and ``eval/generations`` in W&B."""
        clean = [{"step": step, "prompt": r["prompt"], "completion": r["completion"], "score": r.get("score")}
                 for r in rows]
        with (self.run_dir / GENERATIONS).open("a") as fh:
            fh.write("".join(json.dumps(r) + "\n" for r in clean))
        if self.run is not None:
            import wandb

            table = wandb.Table(columns=list(GENERATION_COLUMNS), data=[[r[c] for c in GENERATION_COLUMNS]
                                                                        for r in clean])
            self.run.log({STEP: step, "eval/generations": table})

    def finish(self, summary: dict) -> None:
        if self.run is not None:
            for k, v in summary.items():
                if isinstance(v, (int, float, str)):
                    self.run.summary[k] = v
            self.run.finish()
