"""One optimizer step on a worker: forward/backward over its bundle's micro-batches, then the update.

One optimizer step consumes one bundle of ``grad_accum * micro_batch_size`` packed rows per rank. The
loss is the sum of token losses divided by the global count of supervised tokens in the step
(all-reduced over ranks and micro-steps).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from keel.config import KeelConfig
from keel.core.collectives import all_reduce_sum
from keel.core.loss import backward_scale, token_weights
from keel.data.masking import IGNORE
from keel.mitigation.base import Plugin
from keel.train.forward import micro_loss_sum
from keel.train.guards import is_bad
from keel.train.head import find as find_loss_head


@dataclass(frozen=True)
class StepRequests:
    """What this rank asks of every rank after the step; summed on the step's all-reduce, so every rank agrees
    to stop or checkpoint after the same step without an extra collective."""

    stop: bool = False  # this rank saw a preemption request
    save: bool = False  # rank 0's clock says a time-based checkpoint is due


@dataclass
class StepBatch:
    """A bundle's rows as host tensors, with the per-token loss weights."""

    ids: torch.Tensor
    targets: torch.Tensor
    pos: torch.Tensor
    seq_lens: np.ndarray  # [R, D] example lengths per row, 0-padded
    weights: torch.Tensor
    local_norm: float

    @classmethod
    def of(cls, bundle: dict, loss_norm: str) -> StepBatch:
        ids = torch.tensor(bundle["input_ids"], dtype=torch.long)  # copies: Ray hands out read-only arrays
        targets = torch.tensor(bundle["targets"], dtype=torch.long)
        pos = torch.tensor(bundle["position_ids"], dtype=torch.long)
        weights, local_norm = token_weights(targets, pos, loss_norm)
        return cls(ids, targets, pos, np.asarray(bundle["seq_lens"], dtype=np.int64), weights, local_norm)

    def micro_loss(self, engine: Any, head: Any, rows: slice) -> torch.Tensor:
        """Σ w · CE of one micro-batch (``rows``), every input on the engine's device."""
        return micro_loss_sum(engine, self.ids[rows], self.pos[rows], self.targets[rows], self.weights[rows],
                              self.seq_lens[rows], head)


def train_step(engine: Any, bundle: dict, cfg: KeelConfig, world: int, plugins: Sequence[Plugin] = (),
               requests: StepRequests = StepRequests()) -> dict:
    """Forward/backward over the bundle's micro-batches and one optimizer step; the step's metrics.

    The plugins see each micro-batch's loss (``micro_loss``) and, between the last backward and the
    optimizer step, the gradients (``after_backward``). ``requests`` ride on the step's all-reduce.

    Non-finite steps are skipped on every rank: the step's loss is all-reduced before the last
    backward; when it is not finite, every rank's last backward is scaled by NaN, so the global
    gradient norm (all-reduced by DeepSpeed) is non-finite everywhere and DeepSpeed's ZeRO
    optimizer drops the update and zeroes the gradients (as it does for any non-finite gradient
    norm). The LR scheduler, which DeepSpeed does not advance then, is stepped here so the LR
    stays a function of the data position.
    """
    batch = StepBatch.of(bundle, cfg.trainer.loss_norm)
    seq_lens = batch.seq_lens
    norm, supervised, real_global, sum_sq, stop, save = all_reduce_sum(
        [batch.local_norm, float((batch.targets != IGNORE).sum()), float(seq_lens.sum()), float((seq_lens**2).sum()),
         float(requests.stop), float(requests.save)])
    lr = engine.lr_scheduler.get_last_lr()[0]
    loss_total, extra = _accumulate(engine, batch, cfg, backward_scale(norm, world), plugins)
    grad_norm = engine.get_global_grad_norm()
    grad_norm = float(grad_norm) if grad_norm is not None else None
    applied = getattr(engine, "was_step_applied", lambda: True)()  # DeepSpeed: False when it skipped the update
    bad = is_bad(loss_total, grad_norm, applied)
    if bad and applied:
        raise RuntimeError(f"a non-finite step was applied to the weights: deepspeed.stage={cfg.deepspeed.stage} "
                           "does not skip non-finite gradients; use deepspeed.stage 1, 2 or 3")
    if bad and engine.lr_scheduler is not None:
        engine.lr_scheduler.step()
    capacity = batch.ids.numel() * world
    return {"loss": loss_total / max(norm, 1.0), "lr": lr, "supervised_tokens": int(supervised),
            "tokens": int(real_global), "sum_sq_lengths": sum_sq, "stop": stop > 0, "save": save > 0,
            "bad": bad, "packing_efficiency": real_global / capacity, "grad_norm": grad_norm, **extra}


def _accumulate(engine: Any, batch: StepBatch, cfg: KeelConfig, scale: float, plugins: Sequence[Plugin]
                ) -> tuple[float, dict]:
    """Every micro-batch's forward and backward, the engine stepped after each (DeepSpeed updates after the
    last); returns the step's loss sum, all-reduced, and the plugins' ``after_backward`` metrics."""
    head = find_loss_head(getattr(engine, "module", None))
    micro = cfg.trainer.micro_batch_size
    last = cfg.trainer.grad_accum - 1
    loss_sum, loss_total, extra = 0.0, 0.0, {}
    for a in range(cfg.trainer.grad_accum):
        part = batch.micro_loss(engine, head, slice(a * micro, (a + 1) * micro))
        for p in plugins:
            part = p.micro_loss(part, a)
        loss_sum += float(part.detach())
        if a == last:
            (loss_total,) = all_reduce_sum([loss_sum])
            if not math.isfinite(loss_total):  # every rank: non-finite gradients, DeepSpeed skips the update
                part = part * float("nan")
        engine.backward(part * scale, scale_wrt_gas=False)
        if a == last:
            extra = {k: v for p in plugins for k, v in p.after_backward(engine).items()}
        engine.step()
    return loss_total, extra
