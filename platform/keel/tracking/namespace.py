"""W&B names of the ``metrics.jsonl`` keys, the shared x-axes and the run summaries.

``metrics.jsonl`` keeps its flat keys (``step``, ``loss``, ``tokens``...); only what is sent
to W&B is namespaced: ``train/``, ``data/``, ``mix/``, ``eval/``, ``forgetting/``, ``system/``, ``val/``.
"""

from __future__ import annotations

from typing import Any

NAMESPACES = ("train", "data", "mix", "eval", "forgetting", "system", "val")
STEP = "train/step"
TOKENS_SEEN = "train/tokens_seen"  # cumulative tokens over the run (resumed steps included): the other x-axis

# metrics.jsonl key -> W&B name. A flat key not listed goes to train/; a key with a "/" passes through.
NAMESPACE: dict[str, str] = {
    "step": STEP,
    "loss": "train/loss",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "tokens": "train/tokens",
    "supervised_tokens": "train/supervised_tokens",
    "tokens_per_s": "train/tokens_per_s",
    "step_s": "train/step_s",
    "tflops_per_device": "train/tflops_per_device",
    "mfu": "train/mfu",
    "packing_efficiency": "data/packing_efficiency",
    "data_wait_s": "data/wait_s",
    "data_wait_share": "data/wait_share",
    "ewc_penalty": "forgetting/ewc_penalty",  # mitigation=ewc: λ/2·Σ F·(θ − θ*)²
}

# W&B name -> define_metric summary: what the run table and run comparisons show.
SUMMARIES: dict[str, str] = {
    "train/loss": "min,last",
    "train/tokens_per_s": "max,mean",
    "train/mfu": "max,mean",
    "val/loss": "min,last",  # the validation split (data.val_fraction): its best and its last
    TOKENS_SEEN: "max",
}


def wandb_key(key: str) -> str:
    """The W&B name of a ``metrics.jsonl`` key."""
    if "/" in key:
        return key
    return NAMESPACE.get(key, f"train/{key}")


def wandb_row(metrics: dict) -> dict:
    """A metrics row under its W&B names; None values (no MFU on CPU) are left out."""
    return {wandb_key(k): v for k, v in metrics.items() if v is not None}


def define_metrics(run: Any) -> None:
    """Every panel plots against ``train/step``; ``train/tokens_seen`` is there to pick instead."""
    run.define_metric(STEP)
    run.define_metric("*", step_metric=STEP)
    for name, summary in SUMMARIES.items():
        run.define_metric(name, step_metric=STEP, summary=summary)
