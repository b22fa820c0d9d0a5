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

IGNORE = -100
LOSS_NORMS = ("token", "sequence")


def token_weights(targets: torch.Tensor, position_ids: torch.Tensor, mode: str) -> tuple[torch.Tensor, float]:
    """Per-token loss weights [B, S] and this shard's share of the normaliser."""
    supervised = (targets != IGNORE).to(torch.float64)
    if mode == "token":
        return supervised, float(supervised.sum())
    if mode != "sequence":
        raise ValueError(f"trainer.loss_norm must be one of {list(LOSS_NORMS)}, got {mode!r}")
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


def micro_loss_sum(model: torch.nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor,
                   targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """One micro-batch's forward and Σ weight · cross-entropy: the loss training and validation share."""
    logits = model(input_ids=input_ids, position_ids=position_ids).logits
    return weighted_loss_sum(logits, targets, weights)
