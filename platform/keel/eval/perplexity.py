"""Token-weighted perplexity on held-out examples, masked exactly as training masks them.

Examples are rendered and labelled with :func:`keel.data.encode` (same template and masking
as ``keel train``), right-padded into batches with an attention mask, and run through the
model's standard (eager/sdpa) attention. The NLL is summed over every trained target token
and divided by their count, so long examples weigh in proportion to their tokens and the
result does not depend on batch size or padding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from keel.choices import MASKINGS
from keel.data import encode
from keel.data.masking import IGNORE
from keel.errors import UserError

Example = str | list[dict] | dict


def _as_input(example: Example) -> tuple[list[dict] | str, list | None]:
    """(messages or text, tools) from a plain string, a message list or a canonical example."""
    if isinstance(example, str):
        return example, None
    if isinstance(example, list):
        return example, None
    if isinstance(example, dict) and "messages" in example:
        return example["messages"], example.get("tools")
    if isinstance(example, dict) and "text" in example:
        return example["text"], None
    raise ValueError(f"perplexity: an example must be a string, a message list, or a dict with 'messages' "
                     f"or 'text', got {type(example).__name__}")


def encode_examples(examples: Sequence[Example], tokenizer: Any, template: str, masking: str,
                    max_len: int) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per example, truncated to ``max_len`` tokens."""
    out = []
    for example in examples:
        messages, tools = _as_input(example)
        enc = encode(messages, tokenizer, template=template, masking=masking, tools=tools)
        out.append((enc.input_ids[:max_len], enc.labels[:max_len]))
    return out


def _device(model: Any) -> Any:
    """The device of the model's first parameter (CPU for a parameterless stub)."""
    import torch

    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def _collate(batch: Sequence[tuple[list[int], list[int]]], device: Any) -> tuple[Any, Any, Any]:
    """Right-padded input_ids, attention_mask and labels (-100 on padding)."""
    import torch

    width = max(len(ids) for ids, _ in batch)
    ids = torch.zeros((len(batch), width), dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    for row, (x, y) in enumerate(batch):
        ids[row, : len(x)] = torch.tensor(x)
        mask[row, : len(x)] = 1
        labels[row, : len(y)] = torch.tensor(y)
    return ids.to(device), mask.to(device), labels.to(device)


def batch_nll(model: Any, batch: Sequence[tuple[list[int], list[int]]]) -> tuple[float, int]:
    """(sum of NLL over trained target tokens, their count) for one batch."""
    import torch
    import torch.nn.functional as F

    ids, mask, labels = _collate(batch, _device(model))
    logits = model(input_ids=ids, attention_mask=mask).logits
    # position i predicts token i+1: drop the last logit and the first label
    logits, targets = logits[:, :-1, :].float(), labels[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                          ignore_index=IGNORE, reduction="sum")
    return float(nll.to(torch.float64)), int((targets != IGNORE).sum())


def _check_args(masking: str, batch_size: int, max_len: int) -> None:
    """Raise ValueError on a bad masking, batch size or length."""
    if masking not in MASKINGS:
        raise ValueError(f"unknown masking {masking!r}; choose one of {list(MASKINGS)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2 (one input and one target), got {max_len}")


def perplexity(model: Any, tokenizer: Any, examples: Sequence[Example], template: str = "llama3",
               masking: str = "all_tokens", batch_size: int = 8, max_len: int = 1024) -> dict:
    """Token-weighted perplexity: exp(sum of NLL over trained tokens / their count)."""
    import torch

    _check_args(masking, batch_size, max_len)
    encoded = encode_examples(examples, tokenizer, template, masking, max_len)
    total, count = 0.0, 0
    was_training = getattr(model, "training", False)
    model.eval()
    with torch.no_grad():
        for start in range(0, len(encoded), batch_size):
            nll, n = batch_nll(model, encoded[start : start + batch_size])
            total, count = total + nll, count + n
    model.train(was_training)
    if count == 0:
        raise UserError(f"perplexity: no trained tokens in {len(encoded)} examples with masking={masking!r} "
                         "(assistant_only needs assistant turns; check max_len)")
    nll = total / count
    return {"ppl": math.exp(nll), "nll": nll, "tokens": count, "examples": len(encoded)}
