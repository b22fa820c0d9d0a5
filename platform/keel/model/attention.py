"""Packed-sequence attention registered in Transformers' attention interface.

``sdpa_block``: exact block-diagonal causal attention for packed rows, built from
``position_ids`` (a new example starts wherever the position restarts at 0). It is the
CPU path and the oracle other backends are tested against. Importing this module
registers it, so ``AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa_block")``
runs packed rows with no attention mask and no token attends across examples.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

BACKENDS = ("sdpa_block",)

# Counts of forward calls per backend, so a run can log what actually executed.
CALLS: dict[str, int] = {name: 0 for name in BACKENDS}


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, S] example index per token: increments wherever position_ids restarts at 0."""
    starts = (position_ids == 0).to(torch.int32)
    starts[:, 0] = 1
    return torch.cumsum(starts, dim=1)


def block_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, 1, S, S] boolean mask: causal and within the same packed example."""
    doc = document_ids(position_ids)
    same = doc[:, :, None] == doc[:, None, :]
    s = position_ids.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=position_ids.device).tril()
    return (same & causal)[:, None]


def cu_seqlens(position_ids: torch.Tensor) -> torch.Tensor:
    """Cumulative example boundaries of a flattened packed batch (varlen kernels' input)."""
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).flatten()
    end = torch.tensor([flat.numel()], device=flat.device)
    return torch.cat([starts, end]).to(torch.int32)


def sdpa_block_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                         value: torch.Tensor, attention_mask: Any, scaling: float | None = None,
                         dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Attention over [B, H, S, D] with a block-diagonal causal mask from position_ids."""
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        raise ValueError("sdpa_block attention needs position_ids (packed rows restart them per example)")
    if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
        raise ValueError("sdpa_block attention does not take a block/flex mask")
    mask = block_causal_mask(position_ids.expand(query.shape[0], -1))
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dtype == torch.bool:
        mask = mask & attention_mask[..., : mask.shape[-1]]
    n_rep = query.shape[1] // key.shape[1]
    if n_rep > 1:  # grouped-query attention: repeat K/V heads
        key = key.repeat_interleave(n_rep, dim=1)
        value = value.repeat_interleave(n_rep, dim=1)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling)
    CALLS["sdpa_block"] += 1
    return out.transpose(1, 2).contiguous(), None


def _no_mask(*args: Any, **kwargs: Any) -> None:
    """The mask is built inside the attention function from position_ids."""
    return None


AttentionInterface.register("sdpa_block", sdpa_block_attention)
AttentionMaskInterface.register("sdpa_block", _no_mask)


def resolve(name: str, use_gpu: bool) -> str:
    """The backend ``model.attention`` names, with ``auto`` chosen for the device."""
    if name == "auto":
        return "sdpa_block"  # the only backend so far; GPU varlen kernels come with issue 5
    if name not in BACKENDS:
        raise ValueError(f"model.attention={name!r} is not available; choose one of {['auto', *BACKENDS]}")
    return name
