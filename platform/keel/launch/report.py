"""What ``keel train`` tells the user: the data plan's tables before training, the run summary after it."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from keel.config import KeelConfig
from keel.launch.slurm import slurm_job
from keel.tracking.logger import STARTS

if TYPE_CHECKING:
    from keel.data.pipeline import RowPlan


def print_mixture(report: dict) -> None:
    """The data plan: packed rows, each source's share, epochs and tokens, the length, validation, schedule."""
    print(f"data: {report['rows']} packed rows of {report['max_len']} tokens, "
          f"packing efficiency {report['packing_efficiency']:.1%}")
    print(f"  {'source':<14}{'rows read':>10}{'available':>10}{'rejected':>9}{'weight':>8}{'share':>7}"
          f"{'examples':>9}{'epochs':>7}{'tokens':>10}{'trained':>10}")
    for name, s in report["sources"].items():
        print(f"  {name:<14}{s.get('rows_read', '-'):>10}{s['available']:>10}{s['rejected']:>9}{s['weight']:>8.3f}"
              f"{s['example_share']:>7.3f}{s['examples']:>9}{s['epochs']:>7.2f}{s['tokens']:>10}"
              f"{s['trained_tokens']:>10}")
    if "length" in report:
        _print_length(report["length"])
    if "validation" in report:
        v = report["validation"]
        held = ", ".join(f"{k} {s['examples']} ({s['from']})" for k, s in v["sources"].items())
        print(f"  validation: {v['rows']} packed rows, never trained: {held}")
    if "schedule" in report:
        _print_schedule(report["schedule"])


def _print_length(length: dict) -> None:
    """How long the run is, and, when trainer.epochs sized it, what the epochs came to."""
    asked = length.get("epochs_asked")
    how = f"trainer.epochs={asked:g}: " if asked is not None else ""
    print(f"  length: {how}{length['steps']} steps of {length['rows_per_step']} rows, "
          f"{length['epochs']:.3f} epochs of the sources' natural size ({length['natural_size']} examples)")


def _print_schedule(sched: dict) -> None:
    """The mixture at start and end, then per segment each source's example share, expected weight, token share."""
    def fmt(mix: dict) -> str:
        return ", ".join(f"{k} {v:.3f}" for k, v in mix.items())
    print(f"  mixture schedule ({sched['interpolation']}, {len(sched['segments'])} segments; "
          "weight above = its mean over the planned examples)")
    print(f"    start: {fmt(sched['start'])}")
    print(f"    end:   {fmt(sched['end'])}")
    names = list(sched["start"])
    print(f"    {'steps':<10}" + "".join(f"{n[:15]:>16}" for n in names)
          + "   (per source: example share / expected weight / token share)")
    for seg in sched["segments"]:
        lo, hi = seg["steps"]
        cells = "".join(f"{seg['example_share'][n]:>6.2f}/{seg['weights'][n]:.2f}/{seg['token_share'][n]:.2f}"
                        for n in names)
        print(f"    {f'{lo}-{hi}':<10}{cells}")


def run_summary(cfg: KeelConfig, run_dir: Path, plan: RowPlan, result: dict, model_path: str, t0: float) -> dict:
    """``summary.json``: rank 0's run result with the run's geometry, restarts, data plan and wall time."""
    restarts = len((run_dir / STARTS).read_text().splitlines()) - 1
    return {"world_size": cfg.cluster.num_workers, "zero_stage": cfg.deepspeed.stage, **result, "restarts": restarts,
            "packing_efficiency": plan.report["packing_efficiency"],
            "tokens_per_source": {k: v["tokens"] for k, v in plan.report["sources"].items()},
            "mixture": plan.report["sources"], "mixture_schedule": plan.report.get("schedule"),
            "attention": result.get("attention", cfg.model.attention), "model_path": model_path,
            "wall_s": time.perf_counter() - t0, "pid": os.getpid(), **slurm_job()}


def summary_table(summary: dict) -> str:
    """The run summary printed at the end of ``keel train``."""
    keys = ("world_size", "nodes", "zero_stage", "steps", "restarts", "preempted", "bad_steps", "loss_spikes",
            "rollbacks", "rolled_back_steps", "loss_first", "loss_last",
            *(("val_loss_last", "best_step", "best_val_loss", "early_stopped") if "best_step" in summary else ()),
            "tokens_trained", "tokens_per_s", "packing_efficiency", "trainable_params", "total_params", "wall_s",
            "hf_dir")
    lines = ["", "Keel run summary", "-" * 60]
    for k in keys:
        v = summary.get(k)
        lines.append(f"  {k:<20} {v:.4f}" if isinstance(v, float) else f"  {k:<20} {v}")
    lines.append(f"  {'tokens_per_source':<20} {summary['tokens_per_source']}")
    return "\n".join(lines)
