"""DeepSpeed configuration built from the ``deepspeed`` and ``trainer`` groups."""

from __future__ import annotations

from typing import Any

from keel.config import KeelConfig


def ds_config(cfg: KeelConfig, world_size: int, load_universal: bool = False) -> dict:
    """The DeepSpeed JSON config for this run (ZeRO stage, batch geometry, precision)."""
    zero: dict[str, Any] = {
        "stage": cfg.deepspeed.stage,
        "overlap_comm": cfg.deepspeed.overlap_comm,
        "contiguous_gradients": True,
    }
    if cfg.deepspeed.stage == 3:
        # Needed to write a consolidated Hugging Face checkpoint at the end.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if cfg.deepspeed.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.cluster.use_gpu}
    if cfg.deepspeed.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": cfg.cluster.use_gpu}
    t = cfg.trainer
    out = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * world_size,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.model.dtype == "bfloat16"},
        # Keel passes a torch AdamW (DeepSpeed's fused/CPU Adam need compiled ops).
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if t.max_grad_norm > 0:
        out["gradient_clipping"] = t.max_grad_norm
    if load_universal:  # resuming a checkpoint written by another world size (keel.train.resume.to_universal)
        out["checkpoint"] = {"load_universal": True}
    return out
