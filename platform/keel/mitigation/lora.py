"""LoRA (PEFT): train low-rank adapters on the linear layers; the base weights stay frozen.

Under ZeRO-3 the base is wrapped after ``zero.Init`` has partitioned it: PEFT reads layer
shapes from ``in_features``/``out_features``, the new adapter parameters are created whole
(seeded, so every rank starts from the same ones) and DeepSpeed partitions them at
``deepspeed.initialize``. Saving gathers the adapter partitions first (a collective), since
a partitioned parameter holds only this rank's slice and would be saved empty.

Outputs: ``<run>/adapter/`` (``adapter_model.safetensors`` + ``adapter_config.json``) and,
with ``merge_export`` and ``trainer.save_hf``, the merged full model in ``<run>/hf/``; along the way
(``trainer.export_every``) the same under ``<run>/exports/step_N/``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from keel.errors import ConfigError
from keel.mitigation.base import Mitigation

ADAPTER_DIR = "adapter"
LORA_MIN_LR = 1e-5
ALL_LINEAR = "all-linear"  # PEFT: every linear layer but the output head
LLAMA_STYLE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Families whose attention and MLP projections carry the Llama names.
DEFAULT_TARGETS: dict[str, list[str]] = {t: LLAMA_STYLE for t in (
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2", "granite")}


def target_modules(options: Any, model_type: str) -> list[str] | str:
    """The configured targets, else the family's defaults (PEFT's ``all-linear`` for other families)."""
    targets = list(options.target_modules) if options.target_modules else DEFAULT_TARGETS.get(model_type)
    if targets is None or targets == [ALL_LINEAR]:
        return ALL_LINEAR
    return targets


def check_targets(targets: list[str] | str, module_names: list[str]) -> None:
    """Refuse target names that match no module (PEFT matches a name or a dotted suffix)."""
    if targets == ALL_LINEAR:
        return
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in module_names)]
    if missing:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in module_names if n})
        raise ConfigError(f"config error: mitigation.lora.target_modules {missing} match no module of the model "
                         f"(its module names end in {leaves})")


def model_module_names(path: str, trust_remote_code: bool) -> tuple[str, list[str]]:
    """Model type and module names of the model at ``path``, built on the meta device (no weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return config.model_type, [name for name, _ in model.named_modules()]


def peft_config(options: Any, model_type: str) -> Any:
    """The PEFT LoraConfig for ``mitigation.lora``."""
    from peft import LoraConfig, TaskType

    return LoraConfig(task_type=TaskType.CAUSAL_LM, r=options.r, lora_alpha=options.alpha,
                      lora_dropout=options.dropout, bias=options.bias,
                      target_modules=target_modules(options, model_type))


def wrap(model: Any, options: Any, seed: int) -> Any:
    """``model`` with LoRA adapters, initialised from ``seed`` alone (identical on every rank)."""
    from peft import get_peft_model

    config = peft_config(options, model.config.model_type)
    with torch.random.fork_rng(devices=[]):  # leaves the training RNG stream untouched
        torch.manual_seed(seed)
        # autocast_adapter_dtype=False: adapters take the base dtype, like every other DeepSpeed parameter.
        return get_peft_model(model, config, autocast_adapter_dtype=False)


def adapter_state(model: Any) -> dict[str, torch.Tensor]:
    """The adapter weights, whole, on every rank (a collective under ZeRO-3: partitions are gathered)."""
    import deepspeed
    from peft import get_peft_model_state_dict

    trainable = [p for p in model.parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters(trainable, modifier_rank=None):
        state = get_peft_model_state_dict(model, save_embedding_layers=False)
        state = {k: v.detach().cpu().clone() for k, v in state.items()}
    empty = [k for k, v in state.items() if v.numel() == 0]
    if not state or empty:
        raise RuntimeError(f"LoRA adapter weights are empty after gathering: {empty or 'no adapter keys'}")
    return state


def save_adapter(model: Any, out: Path, rank: int) -> None:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` (every rank must call it)."""
    state = adapter_state(model)
    if rank == 0:
        model.save_pretrained(str(out), state_dict=state, safe_serialization=True, save_embedding_layers=False)


def merged_model(model_path: str, adapter_dir: Path, dtype: torch.dtype, trust_remote_code: bool = False) -> Any:
    """The base model at ``model_path`` with the adapter merged into its weights."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, trust_remote_code=trust_remote_code)
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()


@contextmanager
def _whole_loads() -> Iterator[None]:
    """``from_pretrained`` without ZeRO-3's zero.Init inside, the run's setting restored after: a merged export
    along the way (trainer.export_every) happens mid-training."""
    from transformers.integrations import deepspeed as hf_ds

    ref = hf_ds._hf_deepspeed_config_weak_ref  # transformers keeps the run's HfDeepSpeedConfig only here
    hf_ds.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = ref


def export_merged(model_path: str, adapter_dir: Path, out: Path, cfg: Any) -> None:
    """Save base + adapter merged as a plain HF model (safetensors, config, tokenizer) at ``out``."""
    from keel.model.build import load_tokenizer

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.model.dtype]
    with _whole_loads():  # the base loads whole on rank 0, not zero.Init-partitioned
        model = merged_model(model_path, adapter_dir, dtype, cfg.model.trust_remote_code)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    load_tokenizer(model_path, cfg.model.trust_remote_code).save_pretrained(str(out))


class Lora(Mitigation):
    name = "lora"

    def configure(self, cfg: Any) -> None:
        """Resolve and check the target modules on the driver, so config.yaml records them."""
        from keel.model.build import model_path

        o = self.options
        model_type, names = model_module_names(model_path(cfg), cfg.model.trust_remote_code)
        targets = target_modules(o, model_type)
        check_targets(targets, names)
        o.target_modules = [targets] if isinstance(targets, str) else targets
        print(f"lora: r={o.r} alpha={o.alpha} dropout={o.dropout:g} on {o.target_modules} ({model_type}); "
              "the base weights are frozen")

    def check_config(self, cfg: Any) -> list[str]:
        if cfg.trainer.lr < LORA_MIN_LR:
            return [f"LoRA at lr {cfg.trainer.lr:g} < {LORA_MIN_LR:g} barely moves the adapters: "
                    "LoRA usually wants ~1e-4 (trainer.lr)"]
        return []

    def wrap_model(self, model: Any, cfg: Any) -> Any:
        return wrap(model, self.options, cfg.trainer.seed)

    def export(self, engine: Any, cfg: Any, info: Any, out: Path, full: bool) -> dict:
        """The adapter, and with ``merge_export`` the merged full model as the HF export."""
        adapter = out / ADAPTER_DIR
        save_adapter(engine.module, adapter, info.rank)
        hf_dir = out / "hf" if full and self.options.merge_export else None
        if hf_dir is not None and info.rank == 0:
            export_merged(info.model_path, adapter, hf_dir, cfg)
        return {"adapter_dir": str(adapter), "hf_dir": str(hf_dir) if hf_dir else None}
