"""The training loop run by every data-parallel worker (engine-agnostic about Ray).

One optimizer step consumes one bundle of ``grad_accum * micro_batch_size`` packed rows
per rank. The loss is the sum of token losses divided by the global count of supervised
tokens in the step (all-reduced over ranks and micro-steps).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from keel.config import to_plain
from keel.data.masking import IGNORE
from keel.train.checkpoint import save_final
from keel.train.deepspeed import ds_config
from keel.train.flops import device_peak, matmul_params, step_flops
from keel.train.loss import backward_scale, token_weights, weighted_loss_sum
from keel.train.schedule import lr_factor


@dataclass
class WorkerInfo:
    """What a worker needs besides the config and its bundles."""

    rank: int
    world_size: int
    run_dir: Path
    model_path: str
    attention: str
    step_source_tokens: list[list[int]]
    source_names: list[str]


def _seed_all(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_engine(cfg: Any, info: WorkerInfo) -> tuple[Any, Any]:
    """Model, AdamW and LR schedule wrapped in a DeepSpeed engine."""
    import deepspeed

    from keel.model.build import load_model

    # Joins the process group Ray Train created (gloo on CPU, NCCL on GPU).
    deepspeed.init_distributed(dist_backend="nccl" if cfg.cluster.use_gpu else "gloo")
    ds = ds_config(cfg, info.world_size)
    hf_ds = None
    if cfg.deepspeed.stage == 3:
        # Keeps transformers' zero.Init active so weights load already partitioned.
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds = HfDeepSpeedConfig(ds)
    model = load_model(info.model_path, cfg, info.attention)
    t = cfg.trainer
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, t.warmup_steps, t.max_steps, t.min_lr_ratio))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds)
    return engine, hf_ds


def _all_reduce(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def train_step(engine: Any, bundle: dict, cfg: Any, world: int) -> dict:
    """Forward/backward over the bundle's micro-batches and one optimizer step."""
    ids = torch.as_tensor(bundle["input_ids"]).long()
    targets = torch.as_tensor(bundle["targets"]).long()
    pos = torch.as_tensor(bundle["position_ids"]).long()
    seq_lens = np.asarray(bundle["seq_lens"], dtype=np.int64)
    weights, local_norm = token_weights(targets, pos, cfg.trainer.loss_norm)
    norm, supervised, real_global, sum_sq = _all_reduce(
        [local_norm, float((targets != IGNORE).sum()), float(seq_lens.sum()), float((seq_lens**2).sum())])
    scale = backward_scale(norm, world)
    lr = engine.lr_scheduler.get_last_lr()[0]
    micro = cfg.trainer.micro_batch_size
    loss_sum = 0.0
    for a in range(cfg.trainer.grad_accum):
        sl = slice(a * micro, (a + 1) * micro)
        logits = engine(input_ids=ids[sl], position_ids=pos[sl]).logits
        part = weighted_loss_sum(logits, targets[sl], weights[sl])
        engine.backward(part * scale, scale_wrt_gas=False)
        engine.step()
        loss_sum += float(part.detach())
    (loss_total,) = _all_reduce([loss_sum])
    grad_norm = engine.get_global_grad_norm()
    capacity = ids.numel() * world
    return {"loss": loss_total / max(norm, 1.0), "lr": lr, "supervised_tokens": int(supervised),
            "tokens": int(real_global), "sum_sq_lengths": sum_sq, "packing_efficiency": real_global / capacity,
            "grad_norm": float(grad_norm) if grad_norm is not None else None}


def _check_bundle(bundle: dict, step: int) -> None:
    got = int(np.asarray(bundle["step"]).reshape(-1)[0])
    if got != step:
        raise RuntimeError(f"data order broken: rank expected rows of step {step}, got step {got}")


def _flops_counter(model: Any, cfg: Any) -> Any:
    n = matmul_params(model)
    layers, d = model.config.num_hidden_layers, model.config.hidden_size
    return lambda tokens, sum_sq: step_flops(n, layers, d, tokens, int(sum_sq))


def _attention_calls() -> dict:
    from keel.model.attention import CALLS

    return {k: v for k, v in CALLS.items() if v}


def _check_backend(name: str) -> None:
    """Fail rather than let a configured attention backend be silently skipped."""
    from keel.model.attention import CALLS

    if CALLS.get(name, 0) == 0:
        raise RuntimeError(f"attention backend {name!r} was configured but never executed")


def train(cfg: Any, info: WorkerInfo, bundles: Iterator[dict]) -> dict:
    """Run ``trainer.max_steps`` optimizer steps; returns rank 0's results."""
    _seed_all(cfg.trainer.seed)
    engine, _hf_ds = build_engine(cfg, info)
    engine.train()
    logger = None
    if info.rank == 0:
        from keel.tracking.logger import RunLogger

        logger = RunLogger(cfg, info.run_dir, to_plain(cfg), cfg.trainer.max_steps)
    flops_of = _flops_counter(engine.module, cfg)
    peak = device_peak(cfg.cluster.use_gpu, cfg.trainer.peak_tflops)
    losses, tokens_seen, t_start = [], 0, time.perf_counter()
    for step in range(cfg.trainer.max_steps):
        t0 = time.perf_counter()
        bundle = next(bundles)
        t_data = time.perf_counter() - t0
        _check_bundle(bundle, step)
        m = train_step(engine, bundle, cfg, info.world_size)
        dt = time.perf_counter() - t0
        if step == 0:
            _check_backend(info.attention)
        flops = flops_of(m["tokens"], m.pop("sum_sq_lengths"))
        m["tflops_per_device"] = flops / dt / info.world_size / 1e12
        m["mfu"] = flops / dt / info.world_size / peak if peak else None
        tokens_seen += m["tokens"]
        losses.append(m["loss"])
        if logger is not None:
            src = dict(zip(info.source_names, info.step_source_tokens[step]))
            logger.log({"step": step + 1, **m, "tokens_seen": tokens_seen, "tokens_per_s": m["tokens"] / dt,
                        "step_s": dt, "data_wait_s": t_data, "data_wait_share": t_data / dt,
                        **{f"data/tokens/{k}": v for k, v in src.items()}})
    train_s = time.perf_counter() - t_start
    ckpt_dir, hf_dir = save_final(engine, cfg, info, cfg.trainer.max_steps)
    result = {"steps": len(losses), "loss_first": losses[0], "loss_last": losses[-1],
              "tokens_trained": tokens_seen, "train_s": train_s, "checkpoint_dir": str(ckpt_dir),
              "hf_dir": str(hf_dir) if hf_dir else None,
              "tokens_per_s": tokens_seen / train_s, "attention_calls": _attention_calls()}
    if logger is not None:
        logger.finish(result)
    return result
