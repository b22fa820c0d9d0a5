"""The training loss without full-vocabulary logits: the model's LM head computes it in chunks.

``install`` replaces a causal LM's linear output head by a ``LossHead`` holding the very same
``weight`` (and ``bias``) parameters, so state dicts, tied embeddings, checkpoints and exports are
unchanged. Outside a loss request the head is the plain linear layer (evaluation, generation, EWC).
Inside ``with head.request(...)`` its forward computes Σ w · CE over the supervised positions only,
in chunks (``keel.core.loss.chunked_loss_sum``), and returns that sum in place of the logits.

The loss is computed inside the head's own forward so that DeepSpeed ZeRO-3 gathers the partitioned
head weight with its module hooks, before the forward and again before the backward (where the
chunks' logits are recomputed); the returned sum is the module's output, which those backward hooks
attach to. A model whose forward transforms the head's output is detected on the first step:
Gemma 2's ``final_logit_softcapping`` is applied by the head itself (switched off in the config
during the request); any other change is an error, never a silently wrong loss.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from keel.core.loss import chunked_loss_sum

SOFTCAP = "final_logit_softcapping"
# Config fields with which a family's forward rescales the head's output (Cohere, Granite): no chunked loss.
RESCALES = ("logit_scale", "logits_scaling")


@dataclass
class Request:
    """One micro-batch's supervised positions and, after the forward, the loss the head returned."""

    index: torch.Tensor  # flat positions with a target
    targets: torch.Tensor
    weights: torch.Tensor  # float32
    softcap: float | None = None
    carrier: torch.Tensor | None = None

    def result(self, logits: torch.Tensor) -> torch.Tensor:
        """The loss from the model output's ``logits`` (which must be the head's untouched return)."""
        if self.carrier is None:
            raise RuntimeError("the LM head did not run during the forward of a loss request")
        if logits.shape != (1, 1, 1) or logits.data_ptr() != self.carrier.data_ptr():
            raise RuntimeError("the model's forward changed the LM head's output (logit scaling or softcapping "
                               "Keel does not know), so Keel's chunked loss cannot be used with this model")
        return logits.reshape(())


class LossHead(torch.nn.Module):
    """A linear LM head that computes the chunked training loss while a request is set."""

    def __init__(self, linear: torch.nn.Linear, config: Any) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        if linear.bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = linear.bias
        self._config = config
        self._request: Request | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        req = self._request
        if req is None:
            return F.linear(hidden, self.weight, self.bias)
        if req.carrier is not None:
            raise RuntimeError("the LM head ran twice in one loss request")
        loss = chunked_loss_sum(hidden, self.weight, self.bias, req.index, req.targets, req.weights, req.softcap)
        req.carrier = loss.reshape(1, 1, 1)
        return req.carrier

    @contextmanager
    def request(self, index: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> Iterator[Request]:
        """During the block, a forward of the model returns the loss at ``index`` as its logits."""
        softcap = getattr(self._config, SOFTCAP, None)
        req = Request(index, targets, weights, softcap)
        self._request = req
        if softcap is not None:
            setattr(self._config, SOFTCAP, None)  # the head applies it, chunk by chunk
        try:
            yield req
        finally:
            self._request = None
            if softcap is not None:
                setattr(self._config, SOFTCAP, softcap)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _base(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT wraps the model


def install(model: Any) -> tuple[LossHead | None, str | None]:
    """Put a LossHead in place of ``model``'s output head (PEFT-wrapped or not): (head, None), or
    (None, why not) where the model keeps its head and the loss uses full logits."""
    base = _base(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if isinstance(head, LossHead):
        return head, None
    if type(head) is not torch.nn.Linear:
        return None, f"its output head is a {type(head).__name__}, not a plain torch.nn.Linear"
    scaled = [k for k in RESCALES if getattr(base.config, k, None) not in (None, 1, 1.0)]
    if scaled:
        return None, f"its forward rescales the logits ({', '.join(scaled)})"
    name = next(n for n, m in base.named_modules() if m is head)
    parent, _, attr = name.rpartition(".")
    new = LossHead(head, base.config)
    setattr(base.get_submodule(parent) if parent else base, attr, new)
    return new, None


def find(module: Any) -> LossHead | None:
    """The LossHead inside ``module`` (a model or DeepSpeed's ``engine.module``), if one was installed."""
    if not isinstance(module, torch.nn.Module):
        return None
    return next((m for m in module.modules() if isinstance(m, LossHead)), None)
