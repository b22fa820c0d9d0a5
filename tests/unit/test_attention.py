"""Packed forward equals unpacked forward per example (sdpa_block, fp32)."""

from __future__ import annotations

import torch
from keel.model.attention import block_causal_mask, cu_seqlens, document_ids
from transformers import AutoModelForCausalLM


def test_block_mask_is_block_diagonal_causal():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0]])
    m = block_causal_mask(pos)[0, 0].int()
    expected = torch.tensor([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                             [0, 0, 0, 1, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 1]])
    assert torch.equal(m, expected)
    assert document_ids(pos).tolist() == [[1, 1, 1, 2, 2, 3]]
    assert cu_seqlens(pos).tolist() == [0, 3, 5, 6]


def test_packed_equals_unpacked(tiny_path):
    import keel.model.attention  # noqa: F401

    model = AutoModelForCausalLM.from_pretrained(tiny_path, attn_implementation="sdpa_block",
                                                 dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    lengths = [5, 17, 1, 33, 8]
    docs = [torch.randint(10, 2000, (n,), generator=g) for n in lengths]
    ids = torch.cat(docs)[None]
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos).logits[0]
        start = 0
        for doc in docs:
            alone = model(input_ids=doc[None], position_ids=torch.arange(len(doc))[None]).logits[0]
            diff = (packed[start:start + len(doc)] - alone).abs().max().item()
            assert diff < 1e-5, diff
            start += len(doc)


def test_flex_matches_sdpa_block_on_cpu(tiny_path):
    import warnings

    from keel.model import attention

    g = torch.Generator().manual_seed(2)
    ids = torch.randint(10, 2000, (2, 40), generator=g)
    pos = torch.cat([torch.arange(15), torch.arange(20), torch.arange(5)])[None].expand(2, -1)
    logits = {}
    for backend in ("sdpa_block", "flex"):
        model = AutoModelForCausalLM.from_pretrained(tiny_path, attn_implementation=backend,
                                                     dtype=torch.float32).eval()
        before = attention.CALLS[backend]
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # flex warns that eager mode is unfused
            logits[backend] = model(input_ids=ids, position_ids=pos).logits
        assert attention.CALLS[backend] > before  # the backend really executed
    assert (logits["flex"] - logits["sdpa_block"]).abs().max().item() < 1e-5


def test_resolve_is_strict_on_cpu():
    import pytest
    from keel.model.attention import resolve

    assert resolve("auto", use_gpu=False) == "sdpa_block"
    with pytest.raises(ValueError, match="no backward pass on CPU"):
        resolve("flex", use_gpu=False)
    with pytest.raises(ValueError, match=r"keel-sft\[gpu\]"):
        resolve("flash_attn", use_gpu=False)
    with pytest.raises(ValueError, match="CUDA"):
        resolve("torch_varlen", use_gpu=False)
    with pytest.raises(ValueError, match="not a backend"):
        resolve("magic", use_gpu=False)
