"""Checkpoints: the DeepSpeed state of every rank, and a consolidated Hugging Face dir."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def save_engine(engine: Any, run_dir: Path, step: int) -> Path:
    """DeepSpeed checkpoint (partitioned params, optimizer, scheduler) of all ranks."""
    root = run_dir / "checkpoints"
    engine.save_checkpoint(str(root), tag=f"step_{step:06d}", client_state={"step": step})
    return root / f"step_{step:06d}"


def consolidated_state_dict(engine: Any) -> dict | None:
    """Full state dict on rank 0 (a collective under ZeRO-3: every rank must call it)."""
    if engine.zero_optimization_stage() == 3:
        return engine._zero3_consolidated_16bit_state_dict()
    return engine.module.state_dict()


def save_hf(engine: Any, model_path: str, out: Path, rank: int) -> None:
    """Write safetensors + config + tokenizer that ``from_pretrained`` loads."""
    state = consolidated_state_dict(engine)
    if rank != 0:
        return
    from keel.model.build import load_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    engine.module.save_pretrained(str(out), state_dict=state, safe_serialization=True)
    load_tokenizer(model_path).save_pretrained(str(out))


def save_final(engine: Any, cfg: Any, info: Any, step: int) -> tuple[Path, Path | None]:
    ckpt = save_engine(engine, info.run_dir, step)
    hf_dir = info.run_dir / "hf" if cfg.trainer.save_hf else None
    if hf_dir is not None:
        save_hf(engine, info.model_path, hf_dir, info.rank)
    return ckpt, hf_dir
