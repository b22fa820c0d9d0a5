"""GPU attention backends against the exact block-diagonal oracle (bf16). Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _packed_batch(vocab: int):
    g = torch.Generator().manual_seed(0)
    lengths = [[300, 17, 700, 1], [512, 512]]
    ids = torch.randint(10, vocab, (2, 1024), generator=g)
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
    return ids.cuda(), pos.cuda()


def _run(tiny_path, backend):
    import keel.model.attention  # noqa: F401
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_path, attn_implementation=backend,
                                                 dtype=torch.bfloat16).cuda()
    ids, pos = _packed_batch(model.config.vocab_size)
    logits = model(input_ids=ids, position_ids=pos).logits.float()
    logits.square().mean().backward()
    grads = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
    return logits.detach(), grads


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("backend", ["torch_varlen", "fa_varlen", "flex"])
def test_backend_matches_sdpa_block(tiny_path, backend):
    from keel.model.attention import CALLS
    from keel.model.backends import unavailable_reason

    reason = unavailable_reason(backend, use_gpu=True)
    if reason:
        pytest.skip(reason)
    ref_logits, ref_grads = _run(tiny_path, "sdpa_block")
    before = CALLS[backend]
    logits, grads = _run(tiny_path, backend)
    assert CALLS[backend] > before
    assert _rel(logits, ref_logits) < 2e-2
    assert _rel(grads, ref_grads) < 2e-2


def test_auto_picks_a_varlen_kernel_on_gpu():
    from keel.model.backends import resolve

    assert resolve("auto", use_gpu=True) in ("fa_varlen", "torch_varlen", "flex")


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
@pytest.mark.parametrize("backend", ["torch_varlen", "fa_varlen", "flex"])
def test_sliding_window_and_softcap_match_sdpa_block(family, backend):
    """The kernels' window_size=(W - 1, 0) and softcap against the exact mask (unverified on CPU: stand-ins)."""
    from keel.model.attention import CALLS, implementation
    from keel.model.backends import model_features, unavailable_reason
    from transformers import AutoModelForCausalLM

    from ..unit.test_attention import tiny_config

    config = tiny_config(family, vocab=512, max_position_embeddings=2048)
    reason = unavailable_reason(backend, use_gpu=True, features=model_features(config))
    if reason:
        pytest.skip(reason)
    ids, pos = _packed_batch(512)
    out = {}
    for name in ("sdpa_block", backend):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=implementation(name),
                                                 dtype=torch.bfloat16).cuda()
        before = CALLS[name]
        with torch.no_grad():
            out[name] = model(input_ids=ids, position_ids=pos).logits.float()
        assert CALLS[name] > before
    assert _rel(out[backend], out["sdpa_block"]) < 2e-2
