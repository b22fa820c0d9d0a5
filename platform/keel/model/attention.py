"""Packed-sequence attention backends registered in Transformers' attention interface.

A new example starts wherever ``position_ids`` restarts at 0. Importing this module
registers every backend, so ``AutoModelForCausalLM.from_config(cfg,
attn_implementation="sdpa_block")`` runs packed rows with no attention mask and no token
attends across examples:

- ``sdpa_block``: exact block-diagonal causal mask + SDPA; the CPU path and the oracle.
- ``flex``: FlexAttention with a document mask (compiled on GPU; on CPU eager, forward only).
- ``torch_varlen``: PyTorch's built-in varlen flash kernel (``torch.nn.attention.varlen``, CUDA).
- ``flash_attn``: flash-attn's ``flash_attn_varlen_func`` (CUDA, extra ``keel-sft[gpu]``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

BACKENDS = ("sdpa_block", "flex", "torch_varlen", "flash_attn")

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
    position_ids = _position_ids(kwargs, "sdpa_block")
    if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
        raise ValueError("sdpa_block attention does not take a block/flex mask")
    mask = block_causal_mask(position_ids.expand(query.shape[0], -1))
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dtype == torch.bool:
        mask = mask & attention_mask[..., : mask.shape[-1]]
    key, value = _repeat_kv(query, key, value)  # grouped-query attention
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling)
    CALLS["sdpa_block"] += 1
    return out.transpose(1, 2).contiguous(), None


def _repeat_kv(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n_rep = query.shape[1] // key.shape[1]
    if n_rep == 1:
        return key, value
    return key.repeat_interleave(n_rep, dim=1), value.repeat_interleave(n_rep, dim=1)


def _position_ids(kwargs: dict, backend: str) -> torch.Tensor:
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        raise ValueError(f"{backend} attention needs position_ids (packed rows restart them per example)")
    return position_ids


_FLEX_COMPILED: Any = None


def _flex_fn(device: torch.device) -> Any:
    from torch.nn.attention.flex_attention import flex_attention

    global _FLEX_COMPILED
    if device.type == "cpu":
        return flex_attention  # eager: exact, slow; the CPU test path
    if _FLEX_COMPILED is None:
        _FLEX_COMPILED = torch.compile(flex_attention, dynamic=False)
    return _FLEX_COMPILED


def flex_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                           value: torch.Tensor, attention_mask: Any, scaling: float | None = None,
                           dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """FlexAttention with a causal document mask."""
    from torch.nn.attention.flex_attention import create_block_mask

    pos = _position_ids(kwargs, "flex").expand(query.shape[0], -1)
    doc = document_ids(pos)

    def mask_mod(b: Any, h: Any, q: Any, k: Any) -> Any:
        return (q >= k) & (doc[b, q] == doc[b, k])

    s = query.shape[2]
    block = create_block_mask(mask_mod, query.shape[0], None, s, s, device=query.device)
    key, value = _repeat_kv(query, key, value)
    out = _flex_fn(query.device)(query, key, value, block_mask=block, scale=scaling)
    CALLS["flex"] += 1
    return out.transpose(1, 2).contiguous(), None


def _varlen_inputs(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, pos: torch.Tensor):
    """[B, H, S, D] -> [B*S, H, D] plus cu_seqlens and the longest example."""
    b, _, s, _ = query.shape
    cu = cu_seqlens(pos.expand(b, -1))
    flat = [t.transpose(1, 2).reshape(b * s, t.shape[1], t.shape[3]) for t in (query, key, value)]
    return (*flat, cu, int((cu[1:] - cu[:-1]).max()))


def torch_varlen_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                         value: torch.Tensor, attention_mask: Any, scaling: float | None = None,
                         dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """PyTorch's built-in varlen flash attention over the flattened packed batch."""
    from torch.nn.attention.varlen import varlen_attn

    q, k, v, cu, longest = _varlen_inputs(query, key, value, _position_ids(kwargs, "torch_varlen"))
    out = varlen_attn(q, k, v, cu, cu, longest, longest, scale=scaling, window_size=(-1, 0),
                      enable_gqa=q.shape[1] != k.shape[1])
    CALLS["torch_varlen"] += 1
    return out.reshape(query.shape[0], query.shape[2], query.shape[1], -1), None


def flash_attn_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                       value: torch.Tensor, attention_mask: Any, scaling: float | None = None,
                       dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """flash-attn's varlen kernel over the flattened packed batch."""
    from flash_attn import flash_attn_varlen_func

    q, k, v, cu, longest = _varlen_inputs(query, key, value, _position_ids(kwargs, "flash_attn"))
    out = flash_attn_varlen_func(q, k, v, cu, cu, longest, longest, dropout_p=dropout,
                                 softmax_scale=scaling, causal=True)
    CALLS["flash_attn"] += 1
    return out.reshape(query.shape[0], query.shape[2], query.shape[1], -1), None


def _no_mask(*args: Any, **kwargs: Any) -> None:
    """Masks are built inside the attention functions from position_ids."""
    return None


_FORWARDS = {"sdpa_block": sdpa_block_attention, "flex": flex_attention_forward,
             "torch_varlen": torch_varlen_forward, "flash_attn": flash_attn_forward}
for _name, _fn in _FORWARDS.items():
    AttentionInterface.register(_name, _fn)
    AttentionMaskInterface.register(_name, _no_mask)


def unavailable_reason(name: str, use_gpu: bool) -> str | None:
    """Why backend ``name`` cannot run here, or None when it can."""
    import importlib.util

    cuda = use_gpu and torch.cuda.is_available()
    if name == "flash_attn":
        if importlib.util.find_spec("flash_attn") is None:
            return "flash-attn is not installed: pip install 'keel-sft[gpu]' (needs CUDA)"
        return None if cuda else "flash_attn needs a CUDA device (cluster.use_gpu=true)"
    if name == "torch_varlen":
        if importlib.util.find_spec("torch.nn.attention.varlen") is None:
            return f"torch {torch.__version__} has no torch.nn.attention.varlen (needs torch>=2.10)"
        return None if cuda else "torch_varlen needs a CUDA device (cluster.use_gpu=true)"
    if name == "flex":
        if importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
            return f"torch {torch.__version__} has no FlexAttention"
        # Eager flex runs forward on CPU (the tests use it) but has no CPU backward to train with.
        return None if cuda else "flex has no backward pass on CPU; train with sdpa_block there"
    return None


def resolve(name: str, use_gpu: bool) -> str:
    """The backend ``model.attention`` names; ``auto`` picks the best available for the device.

    A configured backend that cannot run is an error, never a silent fallback.
    """
    if name == "auto":
        if not (use_gpu and torch.cuda.is_available()):
            return "sdpa_block"
        for candidate in ("flash_attn", "torch_varlen", "flex"):
            if unavailable_reason(candidate, use_gpu) is None:
                return candidate
        return "sdpa_block"
    if name not in BACKENDS:
        raise ValueError(f"model.attention={name!r} is not a backend; choose one of {['auto', *BACKENDS]}")
    reason = unavailable_reason(name, use_gpu)
    if reason:
        raise ValueError(f"model.attention={name} cannot be used: {reason}")
    return name
