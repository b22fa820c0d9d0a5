"""Loss masking: the one place that decides which tokens are trained.

``labels`` follow the Hugging Face convention: ``labels[i]`` is the target for position
``i`` (the model shifts), ``-100`` where nothing is trained.
"""

from __future__ import annotations

from dataclasses import dataclass

from keel.choices import MASKINGS
from keel.data.encoding import TRAINABLE, Segment

IGNORE = -100  # the label of an untrained token (PyTorch cross-entropy's ignore_index); defined here only


@dataclass(frozen=True)
class Encoded:
    """A rendered example: token ids and per-token labels (-100 where not trained)."""

    input_ids: list[int]
    labels: list[int]

    @property
    def num_trained(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def _trained(seg: Segment, masking: str, train_eot: bool, last_assistant: int, train_reasoning: bool) -> bool:
    if masking == "all_tokens":
        return seg.kind != "bos"
    if seg.role != "assistant" or seg.kind not in TRAINABLE:
        return False
    if (seg.kind == "eot" and not train_eot) or (seg.kind == "reasoning" and not train_reasoning):
        return False
    return masking == "assistant_only" or seg.message == last_assistant


def apply_mask(segments: list[Segment], masking: str, train_eot: bool = True, train_reasoning: bool = True) -> Encoded:
    """Concatenate segments and label the trained ones (a reasoning trace, with its markup, only with
    ``train_reasoning``)."""
    if masking not in MASKINGS:
        raise ValueError(f"unknown masking {masking!r}; choose one of {list(MASKINGS)}")
    assistant_msgs = [s.message for s in segments if s.role == "assistant"]
    last = max(assistant_msgs) if assistant_msgs else -2
    ids: list[int] = []
    labels: list[int] = []
    for seg in segments:
        ids += seg.ids
        keep = _trained(seg, masking, train_eot, last, train_reasoning)
        labels += seg.ids if keep else [IGNORE] * len(seg.ids)
    return Encoded(ids, labels)
