"""Which packed-attention backend runs where: the names ``model.attention`` takes, why a kernel cannot run on
a host, and the choice ``auto`` makes (``resolve``); ``keel.model.attention`` holds the kernels themselves.

This module imports neither transformers nor, until a GPU kernel is asked about, torch, so the driver can
tell what the workers will run while Ray starts without either.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# The backends' names (model.attention), and deprecated names still accepted (keel.config maps them with a
# warning), are the config's vocabulary.
from keel.choices import ATTENTION_ALIASES as ALIASES
from keel.choices import ATTENTION_BACKENDS as BACKENDS
from keel.errors import ConfigError, UserError

# What ``auto`` tries on a GPU, best first; ``sdpa_block`` (a dense S×S mask) is the fallback.
GPU_ORDER = ("fa_varlen", "torch_varlen", "flex")


@dataclass(frozen=True)
class Features:
    """What a model's attention asks of a backend beyond causal packed attention."""

    softcap: float | None = None  # attention logit softcapping (Gemma 2)
    sliding_window: int | None = None  # some or all layers attend to the last N tokens only


def model_features(config: Any) -> Features:
    """The attention features a transformers config turns on."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if window is not None and layer_types is not None and "sliding_attention" not in layer_types:
        window = None  # e.g. Qwen2 with use_sliding_window=false: every layer is full attention
    return Features(softcap=getattr(config, "attn_logit_softcapping", None), sliding_window=window)


@dataclass(frozen=True)
class VarlenCall:
    """How the installed ``varlen_attn`` takes what Keel needs (read once from its signature)."""

    causal: str | None  # "window_size" (torch >= 2.11), "is_causal" (2.9/2.10) or None: cannot be causal
    scale: bool  # takes ``scale`` (else the scale is folded into the queries)
    gqa: bool  # takes ``enable_gqa`` (else K/V are repeated to the query heads)


@functools.lru_cache(maxsize=8)
def parameters(fn: Callable) -> frozenset[str]:
    """A kernel's keyword names, inspected once per function."""
    return frozenset(inspect.signature(fn).parameters)


def varlen_call(fn: Callable) -> VarlenCall:
    """How to call ``fn`` (torch's ``varlen_attn`` of the installed version)."""
    params = parameters(fn)
    causal = "window_size" if "window_size" in params else "is_causal" if "is_causal" in params else None
    return VarlenCall(causal=causal, scale="scale" in params, gqa="enable_gqa" in params)


def varlen_signature_problem(call: VarlenCall) -> str | None:
    """Why ``varlen_attn`` called as ``call`` cannot run Keel's causal attention, or None."""
    if call.causal is None:
        import torch


        return (f"torch {torch.__version__}'s varlen_attn takes neither window_size nor is_causal, "
                "so it cannot apply a causal mask")
    return None


def _flash_attn_problem() -> str | None:
    """Why flash-attn's varlen kernel cannot be imported here (its CUDA extension included)."""
    try:
        from flash_attn import flash_attn_varlen_func  # noqa: F401  (loads flash_attn_2_cuda)
    except ModuleNotFoundError as err:
        if err.name and err.name.split(".")[0] == "flash_attn":
            return "flash-attn is not installed: pip install 'keel-sft[gpu]' (needs CUDA)"
        return f"flash-attn does not import ({type(err).__name__}: {err})"
    except (ImportError, OSError) as err:  # e.g. a CUDA extension built for another torch or CUDA
        return f"flash-attn does not import ({type(err).__name__}: {err})"
    return None


def _torch_varlen_problem(features: Features) -> str | None:
    import torch

    try:
        from torch.nn.attention import varlen
    except ImportError:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen (needs torch>=2.10)"
    call = varlen_call(varlen.varlen_attn)
    if call.causal is None:
        return varlen_signature_problem(call)
    if features.softcap is not None:
        return f"varlen_attn has no softcap (the model uses attention logit softcapping {features.softcap})"
    if features.sliding_window is not None and call.causal != "window_size":
        return (f"torch {torch.__version__}'s varlen_attn has no window_size (the model uses a sliding window "
                f"of {features.sliding_window}; torch >= 2.11 has it)")
    return None


def unavailable_reason(name: str, use_gpu: bool, features: Features = Features()) -> str | None:
    """Why backend ``name`` cannot run here for a model with ``features``, or None when it can."""
    import importlib.util

    if name not in GPU_ORDER:
        return None
    import torch

    cuda = use_gpu and torch.cuda.is_available()
    if name == "fa_varlen":
        problem = _flash_attn_problem()
        return problem or (None if cuda else "fa_varlen needs a CUDA device (cluster.use_gpu=true)")
    if name == "torch_varlen":
        problem = _torch_varlen_problem(features)
        return problem or (None if cuda else "torch_varlen needs a CUDA device (cluster.use_gpu=true)")
    if name == "flex":
        if importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
            return f"torch {torch.__version__} has no FlexAttention"
        # Eager flex runs forward on CPU (the tests use it) but has no CPU backward to train with.
        return None if cuda else "flex has no backward pass on CPU; train with sdpa_block there"
    return None


def check_name(name: str) -> str:
    """The backend ``model.attention`` names (deprecated aliases mapped); an unknown name is an error."""
    name = ALIASES.get(name, name)
    if name != "auto" and name not in BACKENDS:
        raise ConfigError(f"model.attention={name!r} is not a backend; choose one of {['auto', *BACKENDS]}")
    return name


def resolve(name: str, use_gpu: bool, features: Features = Features(),
            log: Callable[[str], None] | None = print) -> str:
    """The backend to run here (where the worker runs: a head node may have no GPU).

    ``auto`` picks the best available kernel; falling back to ``sdpa_block`` on a GPU (a dense
    S×S mask per layer) is reported through ``log`` with each kernel's reason. A configured
    backend that cannot run is an error, never a silent fallback.
    """
    name = check_name(name)
    if name != "auto":
        reason = unavailable_reason(name, use_gpu, features)
        if reason:
            raise UserError(f"model.attention={name} cannot be used: {reason}")
        return name
    if not use_gpu:
        return "sdpa_block"
    reasons = {}
    for candidate in GPU_ORDER:
        reasons[candidate] = unavailable_reason(candidate, use_gpu, features)
        if reasons[candidate] is None:
            return candidate
    if log is not None:
        import torch

        where = "on a GPU" if torch.cuda.is_available() else "with cluster.use_gpu=true but no CUDA device here"
        why = "; ".join(f"{k}: {v}" for k, v in reasons.items())
        log(f"warning: model.attention=auto falls back to sdpa_block {where}: a dense S×S mask per layer, "
            f"memory and time grow with packing.max_len² ({why})")
    return "sdpa_block"


def expected(name: str, use_gpu: bool) -> str:
    """What the driver can tell before the workers resolve ``model.attention`` (a head node may have no
    GPU): with CPU workers the answer (or the error) is known here; with GPU workers each worker picks."""
    name = check_name(name)
    if not use_gpu:
        return f"{resolve(name, use_gpu=False)} (model.attention={name}, CPU workers)"
    if name == "auto":
        return (f"model.attention=auto, resolved on each GPU worker: the first of {', '.join(GPU_ORDER)} that "
                "can run there, else sdpa_block with a warning")
    return f"{name} (model.attention={name}; checked on each worker, an error where it cannot run)"
