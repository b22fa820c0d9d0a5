"""The chunked LM-head loss equals the full-logits loss (value and every gradient), with tied embeddings,
LoRA and Gemma 2's final softcapping, and leaves every other use of the model's logits as it was."""

from __future__ import annotations

import copy

import pytest
import torch
from keel.core import loss as loss_mod
from keel.core.loss import supervised_positions, token_weights, weighted_loss_sum
from keel.data.masking import IGNORE
from keel.train import head as head_mod
from keel.train.head import LossHead, install

from .test_attention import _model, tiny_config


def _batch(vocab: int, lengths=(7, 12, 5, 8), rows: int = 2, seed: int = 0):
    """Packed rows with a prompt (untrained) and an answer (trained) per example."""
    g = torch.Generator().manual_seed(seed)
    s = sum(lengths)
    ids = torch.randint(2, vocab, (rows, s), generator=g)
    pos = torch.cat([torch.arange(n) for n in lengths])[None].expand(rows, -1).contiguous()
    targets = torch.full((rows, s), IGNORE)
    start = 0
    for n in lengths:
        targets[:, start + n // 3 : start + n - 1] = ids[:, start + n // 3 + 1 : start + n]
        start += n
    return ids, pos, targets


def _full(model, ids, pos, targets, weights):
    return weighted_loss_sum(model(input_ids=ids, position_ids=pos).logits, targets, weights)


def _chunked(model, head, ids, pos, targets, weights):
    with head.request(*supervised_positions(targets, weights)) as req:
        out = model(input_ids=ids, position_ids=pos)
    return req.result(out.logits)


def _grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _compare(old_model, new_model, head, mode: str, monkeypatch, chunk: int = 5) -> None:
    """Loss and every gradient of the chunked path equal the full-logits path's (fp32, summation order only)."""
    monkeypatch.setattr(loss_mod, "CHUNK_LOGITS", chunk * head.out_features)  # several chunks per micro-batch
    ids, pos, targets = _batch(head.out_features)
    weights, _ = token_weights(targets, pos, mode)
    old = _full(old_model, ids, pos, targets, weights)
    old.backward()
    new = _chunked(new_model, head, ids, pos, targets, weights)
    new.backward()
    torch.testing.assert_close(new, old, rtol=1e-6, atol=0)
    want, got = _grads(old_model), _grads(new_model)
    assert set(got) == set(want) and want
    for name in want:  # fp32 sums in another order: rounding only, relative to the gradient's scale
        scale = want[name].abs().max().item()
        assert (got[name] - want[name]).abs().max().item() <= 1e-5 * scale, (name, scale)


@pytest.mark.parametrize("mode", ["token", "sequence"])
@pytest.mark.parametrize(("family", "tied"), [("llama", False), ("llama", True), ("qwen3", True), ("gemma2", True)])
def test_chunked_loss_and_gradients_equal_the_full_logits_path(monkeypatch, mode, family, tied):
    """Tied embeddings (Gemma, small Qwen, Llama 3.2) get the head's and the embedding's gradient in one
    parameter; Gemma 2's final_logit_softcapping is applied per chunk by the head."""
    old_model = _model(tiny_config(family, tie_word_embeddings=tied), "sdpa_block")
    new_model = copy.deepcopy(old_model)
    head, why = install(new_model)
    assert why is None and isinstance(new_model.lm_head, LossHead)
    assert (new_model.lm_head.weight is new_model.get_input_embeddings().weight) == tied
    if family == "gemma2":
        assert new_model.config.final_logit_softcapping == 3.0
    _compare(old_model, new_model, head, mode, monkeypatch)
    cap = "final_logit_softcapping"
    assert getattr(new_model.config, cap, None) == getattr(old_model.config, cap, None)  # restored after the request


def test_chunked_loss_under_lora_equals_the_full_logits_path(monkeypatch):
    from keel.config import LoraConfig
    from keel.mitigation import lora

    base = _model(tiny_config("llama", tie_word_embeddings=True), "sdpa_block")
    old_model = lora.wrap(base, LoraConfig(r=4, alpha=8, dropout=0.0), seed=0)
    for name, p in old_model.named_parameters():  # non-zero B, so the adapters' gradients are not trivially 0
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(hash(name) % 1000))
    new_model = copy.deepcopy(old_model)
    head, why = install(new_model)  # after PEFT, as build_engine does
    assert why is None and type(new_model.get_base_model().lm_head) is LossHead
    _compare(old_model, new_model, head, "token", monkeypatch)
    assert all("lora" in n for n in _grads(new_model))


def test_head_is_the_plain_linear_outside_a_request_and_state_dict_keys_stay():
    """Evaluation, EWC's Fisher and generation run the model with its full logits as before."""
    model = _model(tiny_config("llama"), "sdpa_block")
    before = copy.deepcopy(model)
    install(model)
    assert list(model.state_dict()) == list(before.state_dict())
    ids, pos, _ = _batch(128)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, position_ids=pos).logits,
                           before(input_ids=ids, position_ids=pos).logits)
    model.set_attn_implementation("sdpa")
    before.set_attn_implementation("sdpa")
    prompt = ids[:1, :6]
    assert torch.equal(model.generate(prompt, max_new_tokens=5, do_sample=False),
                       before.generate(prompt, max_new_tokens=5, do_sample=False))


def test_micro_batch_without_supervised_tokens_gives_zero_loss_and_zero_gradients():
    model = _model(tiny_config("llama"), "sdpa_block")
    head, _ = install(model)
    ids, pos, targets = _batch(128)
    targets[:] = IGNORE
    weights, _ = token_weights(targets, pos, "token")
    loss = _chunked(model, head, ids, pos, targets, weights)
    loss.backward()
    assert loss.item() == 0.0 and model.lm_head.weight.grad is not None
    assert all(p.grad.abs().max().item() == 0.0 for p in model.parameters() if p.grad is not None)


def test_models_that_rescale_the_logits_keep_their_head_or_fail_loudly():
    cohere = _model(tiny_config("llama"), "sdpa_block")
    cohere.config.logit_scale = 0.0625
    head, why = install(cohere)
    assert head is None and "logit_scale" in why and type(cohere.lm_head) is torch.nn.Linear
    model = _model(tiny_config("llama"), "sdpa_block")
    head, _ = install(model)
    ids, pos, targets = _batch(128)
    weights, _ = token_weights(targets, pos, "token")
    with head.request(*supervised_positions(targets, weights)) as req:
        out = model(input_ids=ids, position_ids=pos)
    with pytest.raises(RuntimeError, match="changed the LM head's output"):
        req.result(out.logits * 2.0)  # what a forward rescaling the head's output would hand back


def test_chunks_hold_at_most_chunk_logits_at_once(monkeypatch):
    """Only supervised positions get logits, at most CHUNK_LOGITS // vocab of them at a time."""
    seen: list[int] = []
    real = loss_mod._chunk_loss

    def spy(hidden, *args):
        seen.append(hidden.shape[0])
        return real(hidden, *args)

    monkeypatch.setattr(loss_mod, "_chunk_loss", spy)
    monkeypatch.setattr(loss_mod, "CHUNK_LOGITS", 4 * 128)
    model = _model(tiny_config("llama"), "sdpa_block")
    head, _ = install(model)
    ids, pos, targets = _batch(128)
    weights, _ = token_weights(targets, pos, "token")
    _chunked(model, head, ids, pos, targets, weights).backward()
    supervised = int((targets != IGNORE).sum())
    assert max(seen) == 4 and sum(seen) == 2 * supervised  # forward + recomputation in the backward
    assert head_mod.find(model) is head
