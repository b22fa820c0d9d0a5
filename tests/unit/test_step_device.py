"""The training step hands the model its inputs on the engine's device (DeepSpeed does not move them)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from keel.data.masking import IGNORE
from keel.train.forward import to_device
from keel.train.head import LossHead, find
from keel.train.step import train_step

from tests.conftest import compose


class _Reached(Exception):
    """The forward got everything on the right device."""


class _FakeDeviceEngine:
    """A DeepSpeed engine whose device is ``meta``: every tensor the step feeds the model (and the loss head's
    request, where the model has one) must already be there, as a GPU engine's model needs them on the GPU."""

    device = torch.device("meta")

    def __init__(self, module: torch.nn.Module | None = None) -> None:
        self.module = module
        self.lr_scheduler = SimpleNamespace(get_last_lr=lambda: [0.1])
        self.seen: dict[str, str] = {}

    def __call__(self, **inputs):
        tensors = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        head = find(self.module)
        if head is not None and head._request is not None:
            req = head._request
            tensors.update(head_index=req.index, head_targets=req.targets, head_weights=req.weights)
        self.seen = {k: str(v.device) for k, v in tensors.items()}
        wrong = {k: d for k, d in self.seen.items() if d != str(self.device)}
        assert not wrong, f"inputs not on the engine's device {self.device}: {wrong}"
        raise _Reached


def _bundle() -> dict:
    ids = np.array([[5, 6, 7, 8, 9, 3]] * 2)
    return {"input_ids": ids, "targets": np.array([[6, 7, IGNORE, 9, 3, IGNORE]] * 2),
            "position_ids": np.array([[0, 1, 2, 0, 1, 2]] * 2), "seq_lens": [[3, 3]] * 2}


def _with_head() -> torch.nn.Module:
    module = torch.nn.Module()
    module.lm_head = LossHead(torch.nn.Linear(4, 10, bias=False), SimpleNamespace())
    return module


@pytest.mark.parametrize("module", [None, "head"])
def test_every_model_input_is_on_the_engine_device(module):
    engine = _FakeDeviceEngine(_with_head() if module else None)
    with pytest.raises(_Reached):
        train_step(engine, _bundle(), compose("trainer.micro_batch_size=2"), world=1)
    expected = {"input_ids", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k"}
    if module:
        expected |= {"head_index", "head_targets", "head_weights"}
    assert set(engine.seen) == expected and set(engine.seen.values()) == {"meta"}


def test_cuda_copies_go_through_pinned_memory_without_blocking(monkeypatch):
    copies = []

    class Pinned:
        def to(self, device, non_blocking=False):
            copies.append((str(device), non_blocking))
            return "on the gpu"

    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: Pinned())
    assert to_device(torch.zeros(3), torch.device("cuda", 0)) == "on the gpu"
    assert copies == [("cuda:0", True)]
    assert to_device(torch.zeros(3), torch.device("cpu")).device.type == "cpu" and len(copies) == 1
