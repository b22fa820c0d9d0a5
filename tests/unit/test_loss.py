"""Loss normalisation: split-invariant gradients, packed == padded, both loss_norm modes."""

from __future__ import annotations

import pytest
import torch
from keel.core.loss import backward_scale, token_weights, weighted_loss_sum
from keel.data.masking import IGNORE
from transformers import AutoModelForCausalLM

LENGTHS = [9, 4, 13, 6, 11, 7, 5, 8]


@pytest.fixture(scope="module")
def model(tiny_path):
    import keel.model.attention  # noqa: F401

    return AutoModelForCausalLM.from_pretrained(tiny_path, attn_implementation="sdpa_block",
                                                dtype=torch.float32)


def _examples():
    g = torch.Generator().manual_seed(1)
    out = []
    for n in LENGTHS:
        ids = torch.randint(10, 2000, (n,), generator=g)
        labels = ids.clone()
        labels[: n // 3] = IGNORE  # an unsupervised "prompt" prefix
        tgt = torch.full_like(ids, IGNORE)
        tgt[:-1] = labels[1:]
        out.append((ids, tgt))
    return out


def _rows(examples, per_row, width):
    """Pack consecutive groups of examples into rows of ``width`` (padding = its own example)."""
    rows = []
    for i in range(0, len(examples), per_row):
        ids, tgt, pos = [], [], []
        for e_ids, e_tgt in examples[i:i + per_row]:
            ids.append(e_ids)
            tgt.append(e_tgt)
            pos.append(torch.arange(len(e_ids)))
        pad = width - sum(len(x) for x in ids)
        ids.append(torch.zeros(pad, dtype=torch.long))
        tgt.append(torch.full((pad,), IGNORE))
        pos.append(torch.arange(pad))
        rows.append((torch.cat(ids), torch.cat(tgt), torch.cat(pos)))
    return [torch.stack(t) for t in zip(*rows)]


def _grads(model, ids, tgt, pos, mode, splits):
    """Gradient of one optimizer step, the rows split into ``splits`` micro-batches."""
    model.zero_grad()
    weights, norm = token_weights(tgt, pos, mode)
    total = 0.0
    for chunk in torch.arange(ids.shape[0]).chunk(splits):
        logits = model(input_ids=ids[chunk], position_ids=pos[chunk]).logits
        part = weighted_loss_sum(logits, tgt[chunk], weights[chunk])
        (part * backward_scale(norm, 1)).backward()
        total += float(part.detach())
    return total / norm, {n: p.grad.clone() for n, p in model.named_parameters()}


def _max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_sequence_weights_sum_to_one_per_example():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1]])
    tgt = torch.tensor([[5, 6, IGNORE, 7, IGNORE, IGNORE, IGNORE]])
    w, norm = token_weights(tgt, pos, "sequence")
    assert norm == 2.0
    assert torch.allclose(w, torch.tensor([[0.5, 0.5, 0, 1, 0, 0, 0]], dtype=torch.float64))
    w_tok, n_tok = token_weights(tgt, pos, "token")
    assert n_tok == 3.0 and w_tok.sum() == 3


@pytest.mark.parametrize("mode", ["token", "sequence"])
def test_micro_batch_times_accumulation_invariance(model, mode):
    ids, tgt, pos = _rows(_examples(), per_row=2, width=32)
    loss_a, g_a = _grads(model, ids, tgt, pos, mode, splits=1)
    for splits in (2, 4):
        loss_b, g_b = _grads(model, ids, tgt, pos, mode, splits=splits)
        assert abs(loss_a - loss_b) < 1e-6
        assert _max_diff(g_a, g_b) < 1e-6


@pytest.mark.parametrize("mode", ["token", "sequence"])
def test_packed_equals_padded(model, mode):
    examples = _examples()
    packed = _rows(examples, per_row=4, width=48)
    padded = _rows(examples, per_row=1, width=max(LENGTHS))
    loss_p, g_p = _grads(model, *packed, mode, splits=1)
    loss_q, g_q = _grads(model, *padded, mode, splits=1)
    assert abs(loss_p - loss_q) < 1e-5
    assert _max_diff(g_p, g_q) < 1e-5
