"""Model architectures without weights, for sizing offline (``keel plan``) and building presets in tests.

A preset's ``model.arch`` becomes the family's Hugging Face config (``hf_config``); a local checkpoint
is read from its own config.json; the tiny model from ``model.tiny``. Parameter counts come from an
instance on the meta device: exact for any family, and nothing is allocated or downloaded.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from keel.config import ARCH_FAMILY_KEYS, ArchConfig, ModelConfig, TinyModelConfig
from keel.errors import ConfigError

# Keel's arch keys whose Hugging Face name differs.
HF_NAMES = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
            "num_kv_heads": "num_key_value_heads"}
# Families whose config names the MLP activation differently.
ACTIVATION_KEY = {"gemma2": "hidden_activation"}


@dataclass(frozen=True)
class ModelShape:
    """What sizing needs of a model: its dimensions and parameter counts."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_word_embeddings: bool
    total_params: int
    trainable_params: int
    largest_layer_params: int  # the most parameters one module holds itself (DeepSpeed's "largest layer")
    source: str  # where the architecture came from


def hf_kwargs(arch: ArchConfig) -> dict[str, Any]:
    """``model.arch`` as keyword arguments of the family's Hugging Face config class."""
    plain = asdict(arch)
    kwargs: dict[str, Any] = {}
    for key, value in plain.items():
        if key in ("model_type", "extra", "hidden_act") or key in ARCH_FAMILY_KEYS:
            continue
        if value is None and key in ("head_dim", "rope_scaling"):
            continue  # the family's own default (hidden_size // num_heads; plain RoPE)
        kwargs[HF_NAMES.get(key, key)] = value
    for key, families in ARCH_FAMILY_KEYS.items():
        if arch.model_type in families:  # passed even when None: None switches the feature off
            kwargs[key] = plain[key]
    kwargs[ACTIVATION_KEY.get(arch.model_type, "hidden_act")] = arch.hidden_act
    return {**kwargs, **plain["extra"]}


def hf_config(arch: ArchConfig, **overrides: Any) -> Any:
    """The Hugging Face config of ``model.arch`` (``overrides`` e.g. shrink it for a test)."""
    from transformers import AutoConfig

    return AutoConfig.for_model(arch.model_type, **{**hf_kwargs(arch), **overrides})


def tiny_arch(spec: TinyModelConfig) -> ArchConfig:
    """The tiny model's architecture (keel.model.tiny builds a Llama with these dimensions)."""
    return ArchConfig(model_type="llama", vocab_size=spec.vocab_size, hidden_size=spec.hidden_size,
                      intermediate_size=spec.intermediate_size, num_layers=spec.num_layers,
                      num_heads=spec.num_heads, num_kv_heads=spec.num_kv_heads,
                      max_position_embeddings=spec.max_position_embeddings)


def model_hf_config(model: ModelConfig) -> tuple[Any, str]:
    """The Hugging Face config of the configured model and where it came from: a local ``model.path``'s
    config.json, else the tiny spec, else the preset's ``model.arch``."""
    from transformers import AutoConfig

    if Path(model.path).is_dir():
        return (AutoConfig.from_pretrained(model.path, trust_remote_code=model.trust_remote_code),
                f"{model.path}/config.json")
    if model.path == "tiny":
        return hf_config(tiny_arch(model.tiny)), "model.tiny"
    if model.arch is None:
        raise ConfigError(f"config error: model.arch is not set and model.path={model.path} is not a local "
                         "directory: sizing offline needs the architecture (a preset's model.arch, or a local "
                         "checkpoint whose config.json is read)")
    return hf_config(model.arch), f"model.arch (model={model.name})"


def meta_model(config: Any, trust_remote_code: bool = False) -> Any:
    """The causal LM of ``config`` on the meta device: shapes without memory."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def param_counts(model: Any) -> tuple[int, int, int]:
    """Total and trainable parameters (shared ones once) and the largest module's own parameters."""
    params = list(model.parameters())  # each shared (tied) parameter once
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return total, trainable, largest


def shape_of(config: Any, counts: tuple[int, int, int], source: str) -> ModelShape:
    """A ``ModelShape`` from a Hugging Face config and its parameter counts."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return ModelShape(
        model_type=config.model_type, vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_layers=config.num_hidden_layers, num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads, head_dim=head_dim,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        total_params=counts[0], trainable_params=counts[1], largest_layer_params=counts[2], source=source)
