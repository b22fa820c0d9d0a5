"""A worker's DeepSpeed engine: the model as the plugins wrap it, with the chunked-loss head, AdamW and the LR
schedule; and the attention backend it runs, resolved on the worker."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from keel.config import KeelConfig
from keel.core.worker import WorkerInfo
from keel.mitigation.base import Plugin
from keel.train import startup
from keel.train.deepspeed import ds_config
from keel.train.schedule import lr_lambda


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_engine(cfg: KeelConfig, info: WorkerInfo, plugins: list[Plugin], load_universal: bool = False
                 ) -> tuple[Any, Any]:
    """Model (as the plugins wrap it), AdamW over its trainable parameters and the LR schedule
    in a DeepSpeed engine."""
    import deepspeed

    from keel.model.build import load_model

    startup.skip_shm_comm_op()  # on CPU DeepSpeed would JIT-build, under a lock file, an op training never uses
    # Joins the process group Ray Train created (gloo on CPU, NCCL on GPU).
    deepspeed.init_distributed(dist_backend="nccl" if cfg.cluster.use_gpu else "gloo")
    ds = ds_config(cfg, info.world_size, load_universal)
    hf_ds = None
    if cfg.deepspeed.stage == 3:
        # Keeps transformers' zero.Init active so weights load already partitioned.
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds = HfDeepSpeedConfig(ds)
    model = load_model(info.model_path, cfg, info.attention)
    for plugin in plugins:
        model = plugin.wrap_model(model, cfg)
    _install_loss_head(model, info.rank)
    t = cfg.trainer
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t))  # trainer.lr_schedule
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds)
    return engine, hf_ds


def _install_loss_head(model: Any, rank: int) -> None:
    """The chunked-loss LM head (keel.train.head), before DeepSpeed hooks the modules; rank 0 says why not."""
    from keel.train.head import install

    _, why = install(model)
    if why and rank == 0:
        print(f"warning: the loss uses full-vocabulary logits (memory grows with tokens x vocabulary): {why}",
              flush=True)


def resolve_attention(cfg: KeelConfig, info: WorkerInfo) -> str:
    """The attention backend for ``model.attention`` (``info.attention``), resolved where the worker runs (its
    GPU, its flash-attn) and for what the model's attention needs (softcapping, sliding windows)."""
    from transformers import AutoConfig

    from keel.model.backends import model_features, resolve

    config = AutoConfig.from_pretrained(info.model_path, trust_remote_code=cfg.model.trust_remote_code)
    chosen = resolve(info.attention, cfg.cluster.use_gpu, model_features(config),
                     log=print if info.rank == 0 else None)
    if info.rank == 0:
        print(f"attention backend: {chosen} (model.attention={info.attention}, resolved on the workers)", flush=True)
    return chosen


def attention_calls() -> dict:
    """How often each attention backend ran in this process (those that ran)."""
    from keel.model.attention import CALLS

    return {k: v for k, v in CALLS.items() if v}


def check_backend(name: str) -> None:
    """Fail rather than let a configured attention backend be silently skipped."""
    from keel.model.attention import CALLS

    if CALLS.get(name, 0) == 0:
        raise RuntimeError(f"attention backend {name!r} was configured but never executed")
