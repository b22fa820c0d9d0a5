"""One micro-batch's forward and loss, as training and validation run it.

Inputs go to the model's device (from pinned host memory on CUDA); the example boundaries of the
packed rows are computed once per micro-batch on the host and handed to every attention layer
(transformers passes the flash-attention kwargs ``cu_seq_lens_*``/``max_length_*`` through to the
attention functions); with Keel's chunked-loss head (``keel.train.head``) only supervised positions
get logits.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from keel.core.loss import supervised_positions, weighted_loss_sum
from keel.train.head import find as find_loss_head


def packed_boundaries(seq_lens: np.ndarray, row_len: int) -> tuple[torch.Tensor, int]:
    """(cu_seqlens [int32], longest segment) of rows flattened one after another, from each row's example
    lengths; a row's tail padding is a segment of its own, as its position_ids restart there."""
    segments: list[int] = []
    for lens in np.asarray(seq_lens).reshape(len(seq_lens), -1):
        lens = [int(n) for n in lens if n > 0]
        tail = row_len - sum(lens)
        segments += lens + ([tail] if tail > 0 else [])
    cu = np.concatenate([[0], np.cumsum(segments)]).astype(np.int32)
    return torch.from_numpy(cu), max(segments)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``; a CUDA copy goes from pinned host memory without blocking the host."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def device_of(model: Any) -> torch.device:
    """Where ``model`` (a DeepSpeed engine or a module) computes."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


def micro_loss_sum(model: Any, ids: torch.Tensor, pos: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
                   seq_lens: np.ndarray, head: Any = ...) -> torch.Tensor:
    """Σ weight · cross-entropy of one micro-batch of packed rows (host tensors [R, S]; ``seq_lens`` [R, D]
    example lengths per row). ``head``: the model's LossHead (found in the model when not given)."""
    if head is ...:
        head = find_loss_head(getattr(model, "module", model))
    cu, longest = packed_boundaries(seq_lens, ids.shape[1])
    assert torch.equal(cu[:-1].long(), torch.nonzero(pos.reshape(-1) == 0).flatten()), \
        "the rows' seq_lens disagree with their position_ids"
    device = device_of(model)
    cu = to_device(cu, device)
    model_in = {"input_ids": to_device(ids, device), "position_ids": to_device(pos, device),
                "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}
    if head is None:  # the model's own head: full-vocabulary logits
        logits = model(**model_in).logits
        return weighted_loss_sum(logits, targets.to(logits.device), weights.to(logits.device))
    index, sup_targets, sup_weights = (to_device(t, device) for t in supervised_positions(targets, weights))
    with head.request(index, sup_targets, sup_weights) as req:
        out = model(**model_in)
    return req.result(out.logits)
