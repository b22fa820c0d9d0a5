"""Model FLOPs utilisation (MFU) for packed training.

FLOPs of one optimizer step (forward + backward):

    6 · N_t · T  +  4 · N_f · T  +  6 · n_layers · d_model · Σ_i L_i²

N_t / N_f = trainable / frozen parameters in matmuls (all parameters except the input
embedding), T = real tokens in the step, L_i = length of packed example i. The first terms are
the dense 6N rule, less the weight-gradient matmul (2N) a frozen weight skips (LoRA's base
weights still take part in the forward and the input-gradient matmuls); the third
is causal attention (QKᵀ and PV cost 2·L²·d each per layer forward, halved by the causal
mask, tripled for backward), computed with each example's own length: packing must not be
credited with attention across the whole row it never computes. MFU = FLOPs / (step time ·
world size · peak bf16 FLOP/s of one device).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from keel.model.build import full_numel

# Dense bf16 peak FLOP/s per device (no sparsity).
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def matmul_params(model: Any) -> tuple[int, int]:
    """Trainable and frozen parameters that take part in matmuls (ZeRO-3 partitioned sizes counted in full)."""
    embed = model.get_input_embeddings().weight
    trainable = frozen = 0
    for p in model.parameters():
        if p is embed:
            continue
        if p.requires_grad:
            trainable += full_numel(p)
        else:
            frozen += full_numel(p)
    return trainable, frozen


def step_flops(params: tuple[int, int], n_layers: int, d_model: int, tokens: int, sum_sq_lengths: int) -> float:
    """Training FLOPs of one step, ``params`` = (trainable, frozen) matmul parameters (see module docstring)."""
    trainable, frozen = params
    return (6.0 * trainable + 4.0 * frozen) * tokens + 6.0 * n_layers * d_model * sum_sq_lengths


def device_peak(use_gpu: bool, override_tflops: float | None) -> float | None:
    """Peak bf16 FLOP/s of one device, or None when unknown (CPU without an override)."""
    if override_tflops:
        return override_tflops * 1e12
    if not use_gpu:
        return None
    import torch

    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def counter(model: Any) -> Callable[[int, float], float]:
    """``flops(tokens, sum_sq_lengths)`` of one optimizer step of ``model``."""
    params = matmul_params(model)
    layers, d = model.config.num_hidden_layers, model.config.hidden_size
    return lambda tokens, sum_sq: step_flops(params, layers, d, tokens, int(sum_sq))


def step_metrics(m: dict, dt: float, t_data: float, flops: float, peak: float | None, world: int) -> dict:
    """A step's metrics with its throughput: tokens/s, time, data wait, TFLOP/s per device and MFU."""
    return {**m, "tokens_per_s": m["tokens"] / dt, "step_s": dt, "data_wait_s": t_data,
            "data_wait_share": t_data / dt, "tflops_per_device": flops / dt / world / 1e12,
            "mfu": flops / dt / world / peak if peak else None}
