"""``keel plan``: what the configured run needs per GPU, offline, before anything is submitted.

Sizes the configured cluster (not this machine): the world size comes from ``cluster``, the model's
shape from ``model.arch`` or a local checkpoint's config.json (built on the meta device: nothing is
downloaded or allocated), the memory terms from keel.train.memory.
"""

from __future__ import annotations

import importlib.util
import warnings
from typing import Any

from keel.config import KeelConfig
from keel.model.arch import ModelShape, meta_model, model_hf_config, param_counts, shape_of
from keel.model.backends import GPU_ORDER
from keel.train import memory

# The module each kernel model.attention=auto tries on a GPU worker needs (keel.model.backends.resolve,
# best first: GPU_ORDER); sdpa_block is the fallback.
BACKEND_MODULES = {"fa_varlen": "flash_attn", "torch_varlen": "torch.nn.attention.varlen",
                   "flex": "torch.nn.attention.flex_attention"}


def predict_attention(name: str, use_gpu: bool) -> tuple[str, str]:
    """The backend the workers will run and why; for ``auto`` on GPUs a prediction from this host's
    packages (the workers resolve it themselves, on their own devices)."""
    if name != "auto":
        return name, "model.attention as configured"
    if not use_gpu:
        return "sdpa_block", "model.attention=auto on CPU workers"
    for candidate in GPU_ORDER:
        if _installed(BACKEND_MODULES[candidate]):
            return candidate, (f"predicted: model.attention=auto resolves on the workers' GPUs to the first "
                               f"of {list(GPU_ORDER)} they can run; {candidate} assumes they have this host's "
                               "packages")
    return "sdpa_block", "predicted: none of the GPU kernels is installed here"


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def model_shape(cfg: KeelConfig) -> tuple[ModelShape, memory.Layout]:
    """The configured model's shape (parameter counts with LoRA's adapters when enabled) and the
    activation layout of one of its layers, from a meta-device instance."""
    config, source = model_hf_config(cfg.model)
    model = meta_model(config, cfg.model.trust_remote_code)
    layout = layer_layout(model, config)
    if cfg.mitigation.lora is not None:
        import torch
        from peft import get_peft_model

        from keel.mitigation.lora import peft_config

        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore", FutureWarning)
            model = get_peft_model(model, peft_config(cfg.mitigation.lora, config.model_type))
    return shape_of(config, param_counts(model), source), layout


def layer_layout(model: Any, config: Any) -> memory.Layout:
    """The activation widths of one decoder layer, read off the model itself: how many RMSNorms a layer
    has (Gemma 2: 4) and whether q and k are normalised per head (Qwen3)."""
    layer = model.get_decoder().layers[0]
    norms = sum(1 for child in layer.children() if "norm" in type(child).__name__.lower())
    attn = getattr(layer, "self_attn", None)
    qk_norm = attn is not None and any("norm" in type(c).__name__.lower() for c in attn.children())
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return memory.Layout(hidden=config.hidden_size, q=heads * head_dim, kv=kv_heads * head_dim,
                         intermediate=config.intermediate_size, heads=heads, norms=norms, qk_norm=qk_norm)


def memory_terms(cfg: KeelConfig, shape: ModelShape, layout: memory.Layout, attention: str) -> dict[str, int]:
    """Bytes per GPU: model states, ZeRO buffers, activations, logits (and EWC's state when enabled)."""
    b = 2 if cfg.model.dtype == "bfloat16" else 4
    ds, rows, max_len = cfg.deepspeed, cfg.trainer.micro_batch_size, cfg.packing.max_len
    world = cfg.cluster.num_workers
    terms = {
        "model_states": memory.model_states(shape.total_params, shape.trainable_params, shape.largest_layer_params,
                                            world, ds.stage, b, ds.offload_optimizer, ds.offload_param),
        "zero_buffers": memory.gathered_layer(ds.stage, b, shape.largest_layer_params)
        + memory.zero_buffers(ds.stage, b, ds.overlap_comm),
        "activations": memory.activations(layout, shape.num_layers, rows, max_len, b,
                                          cfg.model.gradient_checkpointing, dense=attention == "sdpa_block"),
        "logits": memory.logits(shape.hidden_size, shape.vocab_size, rows * max_len, b,
                                softcap=shape.model_type == "gemma2"),
    }
    if cfg.mitigation.ewc is not None and not ds.offload_optimizer:  # F and θ*: fp32 partitions on the GPU
        terms["ewc"] = 8 * shape.trainable_params // world
    return terms


def notes(cfg: KeelConfig, attention: str) -> list[str]:
    """What the numbers assume or leave out."""
    out = []
    c = cfg.cluster
    if not c.use_gpu:
        why = c.use_gpu_auto or "cluster.use_gpu=false"
        out.append(f"the workers would run on CPU ({why}); the sizes are per worker")
    if attention == "sdpa_block":
        out.append("sdpa_block builds a dense S×S mask per layer (counted); if SDPA falls back to its math "
                   "kernel it also materialises heads×S×S scores per layer (not counted)")
    if cfg.deepspeed.offload_optimizer or cfg.deepspeed.offload_param:
        out.append("offloaded states live in host memory (not counted here)")
    return out


def plan(cfg: KeelConfig, gpu_memory_gib: float = 80.0) -> dict[str, Any]:
    """The plan of the configured run: parameters, layout and memory per GPU, and whether it fits."""
    shape, layout = model_shape(cfg)
    attention, why = predict_attention(cfg.model.attention, cfg.cluster.use_gpu)
    terms = memory_terms(cfg, shape, layout, attention)
    allocated = sum(terms.values())
    terms["margin"] = memory.margin(allocated)
    total = allocated + terms["margin"]
    gib = {k: round(v / memory.GIB, 2) for k, v in terms.items()}
    return {
        "model": cfg.model.name, "model_path": cfg.model.path, "arch_source": shape.source,
        "model_type": shape.model_type, "params": shape.total_params, "trainable_params": shape.trainable_params,
        "largest_layer_params": shape.largest_layer_params,
        "world_size": cfg.cluster.num_workers, "use_gpu": cfg.cluster.use_gpu, "cluster": cfg.cluster.name,
        "zero_stage": cfg.deepspeed.stage, "overlap_comm": cfg.deepspeed.overlap_comm,
        "offload": {"optimizer": cfg.deepspeed.offload_optimizer, "param": cfg.deepspeed.offload_param},
        "template": cfg.template.name, "attention": attention, "attention_note": why,
        "dtype": cfg.model.dtype, "gradient_checkpointing": cfg.model.gradient_checkpointing,
        "max_len": cfg.packing.max_len, "micro_batch_size": cfg.trainer.micro_batch_size,
        "grad_accum": cfg.trainer.grad_accum,
        "per_gpu_gib": {**gib, "total": round(total / memory.GIB, 2)},
        "gpu_memory_gib": gpu_memory_gib, "fits": total <= gpu_memory_gib * memory.GIB,
        "notes": notes(cfg, attention),
    }


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


MEMORY_ROWS = (
    ("model_states", "model states", "params, grads, optimizer states (partitioned)"),
    ("ewc", "EWC state", "Fisher + anchor, fp32 partitions"),
    ("zero_buffers", "ZeRO buffers", "gathered largest layer, gradient reduce bucket(s)"),
    ("activations", "activations", ""),
    ("logits", "logits/loss", "chunked LM head over supervised positions"),
    ("margin", "margin", "CUDA context + NCCL 1.5 GiB, 10% fragmentation"),
)


def render(p: dict[str, Any]) -> str:
    """The plan as a terminal report."""
    ckpt = "with" if p["gradient_checkpointing"] else "without"
    offload = [k for k, v in p["offload"].items() if v] or ["none"]
    lines = [
        "keel plan: an estimate of the configured run (nothing loaded, nothing submitted)",
        f"  model       {p['model']} ({p['model_path']}), {p['model_type']}, sized from {p['arch_source']}",
        f"  parameters  {_count(p['params'])} total, {_count(p['trainable_params'])} trainable",
        f"  cluster     {p['cluster']}: world size {p['world_size']} ({'GPU' if p['use_gpu'] else 'CPU'} workers)",
        f"  ZeRO        stage {p['zero_stage']}, overlap_comm {p['overlap_comm']}, offload {', '.join(offload)}",
        f"  template    {p['template']}",
        f"  attention   {p['attention']} ({p['attention_note']})",
        f"  dtype       {p['dtype']}, gradient checkpointing {'on' if p['gradient_checkpointing'] else 'off'}",
        f"  batch       micro-batch {p['micro_batch_size']} x max_len {p['max_len']} tokens, "
        f"grad_accum {p['grad_accum']}",
        "  memory per GPU (GiB):",
    ]
    gib = p["per_gpu_gib"]
    for key, label, what in MEMORY_ROWS:
        if key in gib:
            what = what or f"{ckpt} gradient checkpointing"
            lines.append(f"    {label:<14}{gib[key]:>8.2f}   {what}")
    verdict = "fits" if p["fits"] else "does NOT fit"
    lines.append(f"    {'total':<14}{gib['total']:>8.2f}   {verdict} in {p['gpu_memory_gib']:g} GiB per GPU")
    lines += [f"  note: {n}" for n in p["notes"]]
    return "\n".join(lines)
