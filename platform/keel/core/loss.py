"""Loss with global normalisation (``trainer.loss_norm``).

Each micro-step contributes a weighted sum of token losses; the optimizer step divides by a
global normaliser summed over all micro-steps and data-parallel ranks, so the gradient does
not depend on how a global batch is split (torchtitan's convention):

- ``token``: every supervised token weighs 1; normaliser = global supervised tokens.
- ``sequence``: each token weighs 1 / (supervised tokens of its example), so every example
  counts once; normaliser = global number of examples with a supervised token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from keel.choices import LOSS_NORMS
from keel.data.masking import IGNORE
from keel.errors import ConfigError


def token_weights(targets: torch.Tensor, position_ids: torch.Tensor, mode: str) -> tuple[torch.Tensor, float]:
    """Per-token loss weights [B, S] and this shard's share of the normaliser."""
    supervised = (targets != IGNORE).to(torch.float64)
    if mode == "token":
        return supervised, float(supervised.sum())
    if mode != "sequence":
        raise ConfigError(f"trainer.loss_norm must be one of {list(LOSS_NORMS)}, got {mode!r}")
    starts = (position_ids == 0).to(torch.int64)
    starts[:, 0] = 1
    doc = torch.cumsum(starts.reshape(-1), 0) - 1  # example index of every token (flattened)
    per_doc = torch.zeros(int(doc[-1]) + 1, dtype=torch.float64).index_add_(0, doc, supervised.reshape(-1))
    inv = torch.where(per_doc > 0, 1.0 / per_doc.clamp(min=1), torch.zeros_like(per_doc))
    return (inv[doc].reshape(supervised.shape) * supervised), float((per_doc > 0).sum())


def weighted_loss_sum(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ weight · cross-entropy over tokens (targets are pre-shifted, -100 ignored)."""
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1).long(),
                         ignore_index=IGNORE, reduction="none")
    return (ce * weights.reshape(-1).to(ce.dtype)).sum()


def token_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of cross-entropy over tokens whose target is not -100."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1).long(),
                           ignore_index=IGNORE, reduction="sum")


def backward_scale(normaliser: float, world_size: int) -> float:
    """Factor turning a micro-step weighted loss sum into its share of the global mean.

    DeepSpeed averages gradients over data-parallel ranks; multiplying by the world size
    undoes that, so the result is Σ(weighted token losses) / global normaliser.
    """
    return world_size / max(normaliser, 1.0)


# Logits materialised at once by the chunked loss (128 MiB in fp32): 261 tokens at a 128,256 vocabulary.
CHUNK_LOGITS = 1 << 25


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                weights: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Σ weight · cross-entropy of one chunk of positions, in the ops and dtypes of the full-logits path."""
    logits = F.linear(hidden, weight, bias)
    if softcap is not None:  # Gemma 2's final_logit_softcapping, as its forward applies it
        logits = torch.tanh(logits / softcap) * softcap
    ce = F.cross_entropy(logits.float(), targets, reduction="none")
    return (ce * weights).sum()


def chunked_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, index: torch.Tensor,
                     targets: torch.Tensor, weights: torch.Tensor, softcap: float | None = None,
                     chunk: int | None = None) -> torch.Tensor:
    """Σ w · CE at the flat positions ``index`` of ``hidden`` [B, S, H] (their ``targets`` and float32
    ``weights``), equal to ``weighted_loss_sum`` over the full logits of ``F.linear(hidden, weight, bias)``.

    Only the supervised positions get logits, ``chunk`` positions at a time; each chunk's logits are
    freed after its loss and recomputed in the backward (non-reentrant activation checkpointing), so
    at most one chunk of [chunk, vocab] logits is alive in either pass.
    """
    from torch.utils.checkpoint import checkpoint

    chunk = chunk or max(1, CHUNK_LOGITS // weight.shape[0])
    picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)
    parts = [checkpoint(_chunk_loss, h, weight, bias, t, w, softcap, use_reentrant=False)
             for h, t, w in zip(picked.split(chunk), targets.split(chunk), weights.split(chunk))]
    return torch.stack(parts).sum()


def supervised_positions(targets: torch.Tensor, weights: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(flat positions, targets, float32 weights) of the supervised tokens of [B, S] host tensors.

    Without any, position 0 with weight 0 stands in, so the LM head still takes part in the
    backward (with a zero gradient, as in the full-logits path).
    """
    flat = targets.reshape(-1)
    index = torch.nonzero(flat != IGNORE).flatten()
    if index.numel() == 0:
        return torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long), torch.zeros(1)
    return index, flat[index].long(), weights.reshape(-1)[index].to(torch.float32)
