"""Model and tokenizer builders: ``model=tiny`` offline, anything else by hub id or path."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from keel.config import KeelConfig


def model_path(cfg: KeelConfig) -> str:
    """Local directory or hub id of the base model (builds the tiny model if needed)."""
    if cfg.model.path == "tiny":
        from keel.model.tiny import ensure_tiny

        return str(ensure_tiny(cfg.model.tiny))
    return cfg.model.path


def load_tokenizer(path: str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        # Padding only fills packed-row tails, which are never attended to or trained.
        tok.pad_token = tok.eos_token
    return tok


def load_model(path: str, cfg: KeelConfig, attention: str) -> Any:
    """Load the causal LM with Keel's attention backend registered and selected."""
    import torch
    from transformers import AutoModelForCausalLM

    from keel.model.attention import implementation  # importing it registers the packed backends

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.model.dtype]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=implementation(attention),
                                                 trust_remote_code=cfg.model.trust_remote_code)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model


def full_numel(p: Any) -> int:
    """A parameter's size, in full also when ZeRO-3 has partitioned it."""
    return getattr(p, "ds_numel", p.numel())


def param_counts(model: Any) -> tuple[int, int]:
    """Trainable and total parameters (ZeRO-3 partitioned ones counted in full)."""
    trainable = total = 0
    for p in model.parameters():
        n = full_numel(p)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def is_local(path: str) -> bool:
    return Path(path).is_dir()
