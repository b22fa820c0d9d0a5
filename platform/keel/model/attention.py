"""Packed-sequence attention backends registered in Transformers' attention interface.

A new example starts wherever ``position_ids`` restarts at 0. Importing this module
registers every backend, so ``AutoModelForCausalLM.from_config(cfg,
attn_implementation="sdpa_block")`` runs packed rows with no attention mask and no token
attends across examples:

- ``sdpa_block``: exact block-diagonal causal mask + SDPA; the CPU path and the oracle.
- ``flex``: FlexAttention with a document mask (compiled on GPU; on CPU eager, forward only).
- ``torch_varlen``: PyTorch's built-in varlen flash kernel (``torch.nn.attention.varlen``, CUDA),
  called by the signature the installed torch has.
- ``fa_varlen``: flash-attn's ``flash_attn_varlen_func`` (CUDA, extra ``keel-sft[gpu]``). Not named
  ``flash_attn``: transformers treats any implementation name containing "flash" as a request
  for a hub kernel of that name and refuses to load the model.

The model's attention modules may pass ``sliding_window`` (Mistral, Phi-3, Gemma 2, Qwen with
``use_sliding_window``), ``softcap`` (Gemma 2's ``attn_logit_softcapping``) and ``s_aux``
(attention sinks). Each backend honours them exactly or refuses with an error; none is ignored.

The varlen backends take the example boundaries as transformers' flash-attention keyword
arguments ``cu_seq_lens_q``/``cu_seq_lens_k``/``max_length_q``/``max_length_k`` when the
caller passes them (Keel's training step computes them once per micro-batch on the host);
without them they derive the boundaries from ``position_ids`` (one device sync per call).

Which backend runs where (``model.attention=auto``, a kernel's availability) is ``keel.model.backends``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from keel.choices import ATTENTION_BACKENDS as BACKENDS
from keel.errors import ConfigError, UserError
from keel.model.backends import VarlenCall, parameters, varlen_call, varlen_signature_problem

# Counts of forward calls per backend, so a run can log what actually executed.
CALLS: dict[str, int] = {name: 0 for name in BACKENDS}


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, S] example index per token: increments wherever position_ids restarts at 0."""
    starts = (position_ids == 0).to(torch.int32)
    starts[:, 0] = 1
    return torch.cumsum(starts, dim=1)


def block_causal_mask(position_ids: torch.Tensor, sliding_window: int | None = None) -> torch.Tensor:
    """[B, 1, S, S] boolean mask: causal, within the same packed example and, with a sliding
    window W, no further back than W - 1 tokens (transformers' ``kv_idx > q_idx - W``)."""
    doc = document_ids(position_ids)
    same = doc[:, :, None] == doc[:, None, :]
    idx = torch.arange(position_ids.shape[1], device=position_ids.device)
    allowed = idx[:, None] >= idx[None, :]
    if sliding_window is not None:
        allowed = allowed & (idx[:, None] - idx[None, :] < sliding_window)
    return (same & allowed)[:, None]


def cu_seqlens(position_ids: torch.Tensor) -> torch.Tensor:
    """Cumulative example boundaries of a flattened packed batch (varlen kernels' input)."""
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).flatten()
    end = torch.tensor([flat.numel()], device=flat.device)
    return torch.cat([starts, end]).to(torch.int32)


def _refuse(backend: str, what: str, hint: str = "") -> None:
    raise ConfigError(f"model.attention={backend} cannot apply {what}{hint}; "
                     "choose a backend that can (sdpa_block applies everything exactly)")


def _check_sinks(kwargs: dict, backend: str) -> None:
    if kwargs.get("s_aux") is not None:
        _refuse(backend, "attention sinks (s_aux)")


def _softcapped_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                     scaling: float, softcap: float, dropout: float) -> torch.Tensor:
    """Attention with tanh softcapping of the scaled scores, in the order eager attention applies it."""
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if dropout:
        probs = F.dropout(probs, p=dropout)
    return torch.matmul(probs, value)


def sdpa_block_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                         value: torch.Tensor, attention_mask: Any, scaling: float | None = None,
                         dropout: float = 0.0, sliding_window: int | None = None, softcap: float | None = None,
                         **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Attention over [B, H, S, D] with a block-diagonal causal mask from position_ids."""
    _check_sinks(kwargs, "sdpa_block")
    position_ids = _position_ids(kwargs, "sdpa_block")
    if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
        raise ValueError("sdpa_block attention does not take a block/flex mask")
    mask = block_causal_mask(position_ids.expand(query.shape[0], -1), sliding_window)
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dtype == torch.bool:
        mask = mask & attention_mask[..., : mask.shape[-1]]
    key, value = _repeat_kv(query, key, value)  # grouped-query attention
    if softcap is None:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling)
    else:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        out = _softcapped_sdpa(query, key, value, mask, scale, softcap, dropout)
    CALLS["sdpa_block"] += 1
    return out.transpose(1, 2).contiguous(), None


def _repeat_kv(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dim: int = 1
               ) -> tuple[torch.Tensor, torch.Tensor]:
    n_rep = query.shape[dim] // key.shape[dim]
    if n_rep == 1:
        return key, value
    return key.repeat_interleave(n_rep, dim=dim), value.repeat_interleave(n_rep, dim=dim)


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
                           dropout: float = 0.0, sliding_window: int | None = None, softcap: float | None = None,
                           **kwargs: Any) -> tuple[torch.Tensor, None]:
    """FlexAttention with a causal document mask (sliding window in the mask, softcap as a score_mod)."""
    from torch.nn.attention.flex_attention import create_block_mask

    _check_sinks(kwargs, "flex")
    if dropout:
        _refuse("flex", f"attention dropout ({dropout})")
    pos = _position_ids(kwargs, "flex").expand(query.shape[0], -1)
    doc = document_ids(pos)

    def mask_mod(b: Any, h: Any, q: Any, k: Any) -> Any:
        keep = (q >= k) & (doc[b, q] == doc[b, k])
        return keep & (q - k < sliding_window) if sliding_window is not None else keep

    def capped(score: Any, b: Any, h: Any, q: Any, k: Any) -> Any:
        return torch.tanh(score / softcap) * softcap

    s = query.shape[2]
    block = create_block_mask(mask_mod, query.shape[0], None, s, s, device=query.device)
    key, value = _repeat_kv(query, key, value)
    out = _flex_fn(query.device)(query, key, value, score_mod=capped if softcap is not None else None,
                                 block_mask=block, scale=scaling)
    CALLS["flex"] += 1
    return out.transpose(1, 2).contiguous(), None


def _boundaries(kwargs: dict, batch: int, backend: str) -> tuple[torch.Tensor, int]:
    """(cu_seqlens, longest example): the caller's when given, else derived from position_ids."""
    cu, longest = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if cu is not None and longest is not None:
        if kwargs.get("cu_seq_lens_k") is not None and kwargs["cu_seq_lens_k"] is not cu:
            raise ValueError(f"{backend}: packed self-attention needs cu_seq_lens_k == cu_seq_lens_q")
        return cu, int(longest)
    cu = cu_seqlens(_position_ids(kwargs, backend).expand(batch, -1))
    return cu, int((cu[1:] - cu[:-1]).max())  # a device sync


def _flatten(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """[B, H, S, D] -> [B*S, H, D]."""
    return [t.transpose(1, 2).reshape(t.shape[0] * t.shape[2], t.shape[1], t.shape[3]) for t in tensors]


def _window(sliding_window: int | None, longest: int) -> int | None:
    """The window when it can bind (an example longer than it); None where it changes nothing."""
    return sliding_window if sliding_window is not None and longest > sliding_window else None


def _varlen_kwargs(call: VarlenCall, window: int | None, scaling: float | None, gqa: bool) -> dict:
    kw: dict[str, Any] = {}
    if call.causal == "window_size":
        kw["window_size"] = (window - 1 if window is not None else -1, 0)  # (left, right): W keys incl. itself
    elif window is not None:
        _refuse("torch_varlen", f"a sliding window ({window})",
                f": torch {torch.__version__}'s varlen_attn has no window_size (torch >= 2.11 has)")
    else:
        kw["is_causal"] = True
    if call.scale:
        kw["scale"] = scaling
    if gqa:
        kw["enable_gqa"] = True
    return kw


def torch_varlen_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                         value: torch.Tensor, attention_mask: Any, scaling: float | None = None,
                         dropout: float = 0.0, sliding_window: int | None = None, softcap: float | None = None,
                         **kwargs: Any) -> tuple[torch.Tensor, None]:
    """PyTorch's built-in varlen flash attention over the flattened packed batch."""
    from torch.nn.attention import varlen

    _check_sinks(kwargs, "torch_varlen")
    if softcap is not None:
        _refuse("torch_varlen", f"attention logit softcapping ({softcap})", ": varlen_attn has no softcap")
    if dropout:
        _refuse("torch_varlen", f"attention dropout ({dropout})", ": varlen_attn has no dropout")
    call = varlen_call(varlen.varlen_attn)
    if call.causal is None:
        raise UserError(f"torch_varlen: {varlen_signature_problem(call)}")
    b, heads, s, d = query.shape
    cu, longest = _boundaries(kwargs, b, "torch_varlen")
    gqa = key.shape[1] != heads
    if gqa and not call.gqa:
        key, value = _repeat_kv(query, key, value)
    q, k, v = _flatten(query, key, value)
    if not call.scale and scaling is not None and not math.isclose(scaling, d ** -0.5, rel_tol=1e-12):
        q = q * (scaling * d ** 0.5)  # the kernel applies 1/sqrt(d); this makes it `scaling`
    kw = _varlen_kwargs(call, _window(sliding_window, longest), scaling, gqa and call.gqa)
    out = varlen.varlen_attn(q, k, v, cu, cu, longest, longest, **kw)
    CALLS["torch_varlen"] += 1
    return out.reshape(b, s, heads, -1), None


def fa_varlen_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor, attention_mask: Any, scaling: float | None = None,
                      dropout: float = 0.0, sliding_window: int | None = None, softcap: float | None = None,
                      **kwargs: Any) -> tuple[torch.Tensor, None]:
    """flash-attn's varlen kernel over the flattened packed batch (grouped-query attention native)."""
    from flash_attn import flash_attn_varlen_func

    _check_sinks(kwargs, "fa_varlen")
    params = parameters(flash_attn_varlen_func)
    b, heads, s, _ = query.shape
    cu, longest = _boundaries(kwargs, b, "fa_varlen")
    kw: dict[str, Any] = {}
    window = _window(sliding_window, longest)
    if window is not None:
        if "window_size" not in params:
            _refuse("fa_varlen", f"a sliding window ({window})", ": this flash-attn has no window_size")
        kw["window_size"] = (window - 1, 0)
    if softcap is not None:
        if "softcap" not in params:
            _refuse("fa_varlen", f"attention logit softcapping ({softcap})", ": needs flash-attn >= 2.6")
        kw["softcap"] = softcap
    q, k, v = _flatten(query, key, value)
    out = flash_attn_varlen_func(q, k, v, cu, cu, longest, longest, dropout_p=dropout, softmax_scale=scaling,
                                 causal=True, **kw)
    CALLS["fa_varlen"] += 1
    return out.reshape(b, s, heads, -1), None


def _no_mask(*args: Any, **kwargs: Any) -> None:
    """Masks are built inside the attention functions from position_ids."""
    return None


_FORWARDS = {"sdpa_block": sdpa_block_attention, "flex": flex_attention_forward,
             "torch_varlen": torch_varlen_forward, "fa_varlen": fa_varlen_forward}
# The names Keel loads models with. transformers checks a name containing "sdpa" against the model's
# SDPA support and refuses it where there is none (Gemma 2: ``_supports_sdpa = False``, for its
# softcapping), though sdpa_block applies softcapping itself; so sdpa_block is registered a second time
# under a name transformers leaves alone. (A name containing "flash" is worse: a hub kernel request.)
_LOAD_AS = {"sdpa_block": "keel_block_mask"}


def implementation(name: str) -> str:
    """The ``attn_implementation`` to load a model with for backend ``name``."""
    return _LOAD_AS.get(name, name)


for _name, _fn in _FORWARDS.items():
    for _registered in {_name, implementation(_name)}:
        AttentionInterface.register(_registered, _fn)
        AttentionMaskInterface.register(_registered, _no_mask)


