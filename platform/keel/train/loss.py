"""Token-level loss with global normalisation.

Each micro-step contributes ``sum of token losses``; the optimizer step divides by the
global number of supervised tokens across all micro-steps and data-parallel ranks, so
the gradient does not depend on how a global batch is split (torchtitan's convention).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def token_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of cross-entropy over tokens whose target is not -100 (targets pre-shifted)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1).long(),
                           ignore_index=IGNORE, reduction="sum")


def backward_scale(global_tokens: int, world_size: int) -> float:
    """Factor turning a micro-step loss sum into its share of the global token mean.

    DeepSpeed averages gradients over data-parallel ranks; multiplying by the world size
    undoes that, so the result is sum(all token losses) / global_tokens.
    """
    return world_size / max(global_tokens, 1)
