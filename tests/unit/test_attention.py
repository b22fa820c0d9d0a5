"""Packed attention backends: packed forward equals unpacked forward per example (fp32), for every
model family's attention features (sliding windows, softcapping), loading through transformers, the
varlen kernels' signatures (stubbed) and the example boundaries handed down once per micro-batch."""

from __future__ import annotations

import sys
import types
import warnings

import numpy as np
import pytest
import torch
from keel.model import attention, backends
from keel.model.attention import BACKENDS, block_causal_mask, cu_seqlens, document_ids, implementation
from transformers import AutoConfig, AutoModelForCausalLM

# Tiny members of the families Keel has presets for, each with the attention features its real model has.
FAMILIES = {
    "llama": {},
    "mistral": {"sliding_window": 4},
    "phi3": {"sliding_window": 5, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 1},
    "gemma2": {"sliding_window": 4, "attn_logit_softcapping": 0.5, "final_logit_softcapping": 3.0,
               "query_pre_attn_scalar": 16},
    "qwen2": {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1},
    "qwen3": {},
}
LENGTHS = [5, 13, 1, 9, 12]  # every sliding window above binds inside the longer examples


def tiny_config(model_type: str, vocab: int = 128, **extra) -> object:
    """A 2-layer, 32-wide config of ``model_type`` (grouped-query attention: 4 query, 2 key/value heads)."""
    shape = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=8, max_position_embeddings=128)
    return AutoConfig.for_model(model_type, **shape, **{**FAMILIES[model_type], **extra})


def _model(config, backend: str):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=implementation(backend),
                                            dtype=torch.float32).eval()


def _packed(lengths=LENGTHS, vocab: int = 128, rows: int = 1):
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(2, vocab, (n,), generator=g) for n in lengths]
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    return docs, torch.cat(docs)[None].expand(rows, -1), pos.expand(rows, -1)


def _eager_per_example(model, docs) -> torch.Tensor:
    """Each example alone through transformers' own eager attention (its masks, windows, softcapping)."""
    model.set_attn_implementation("eager")
    with torch.no_grad():
        return torch.cat([model(input_ids=d[None], position_ids=torch.arange(len(d))[None]).logits[0] for d in docs])


def test_block_mask_is_block_diagonal_causal():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0]])
    m = block_causal_mask(pos)[0, 0].int()
    expected = torch.tensor([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                             [0, 0, 0, 1, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 1]])
    assert torch.equal(m, expected)
    assert document_ids(pos).tolist() == [[1, 1, 1, 2, 2, 3]]
    assert cu_seqlens(pos).tolist() == [0, 3, 5, 6]
    window = block_causal_mask(torch.arange(4)[None], sliding_window=2)[0, 0].int()  # itself and one back
    assert window.tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]


def test_packed_equals_unpacked(tiny_path):
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


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_sdpa_block_packed_equals_eager_unpacked_per_family(family):
    """Sliding windows (Mistral, Phi-3, Qwen2, Gemma 2) and attention/final softcapping (Gemma 2) are applied
    exactly in packed rows: the same logits as transformers' eager attention on each example alone."""
    model = _model(tiny_config(family), "sdpa_block")
    docs, ids, pos = _packed()
    before = attention.CALLS["sdpa_block"]
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos).logits[0]
    assert attention.CALLS["sdpa_block"] > before
    torch.testing.assert_close(packed, _eager_per_example(model, docs), rtol=0, atol=1e-5)


def test_flex_honours_window_and_softcap_on_cpu():
    model = _model(tiny_config("gemma2"), "flex")
    docs, ids, pos = _packed()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex warns that eager mode is unfused
        packed = model(input_ids=ids, position_ids=pos).logits[0]
    torch.testing.assert_close(packed, _eager_per_example(model, docs), rtol=0, atol=1e-5)


def test_flex_matches_sdpa_block_on_cpu(tiny_path):
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


# ---- stand-ins for the CUDA kernels: the documented flash-attention semantics, computed densely ----

def _reference_varlen(q, k, v, cu, scale, window=(-1, -1), softcap=None):
    """[T, H, D] attention per segment of ``cu``; key j is visible to query i iff i - left <= j <= i + right."""
    out = torch.empty(q.shape[0], q.shape[1], v.shape[2], dtype=q.dtype)
    assert q.shape[1] == k.shape[1] or q.shape[1] % k.shape[1] == 0
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))
        ks, vs = (t.repeat_interleave(qs.shape[0] // t.shape[0], dim=0) for t in (ks, vs))
        scores = qs @ ks.transpose(-1, -2) * (scale if scale is not None else q.shape[-1] ** -0.5)
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        i, j = torch.arange(b - a)[:, None], torch.arange(b - a)[None, :]
        left, right = window
        keep = (j >= i - left if left >= 0 else True) & (j <= i + right if right >= 0 else True)
        scores = scores.masked_fill(~torch.as_tensor(keep), float("-inf"))
        out[a:b] = (scores.softmax(-1) @ vs).transpose(0, 1)
    return out


class _Recorder:
    def __init__(self):
        self.calls: list[dict] = []


def _fake_flash_attn(monkeypatch, rec: _Recorder) -> None:
    """A ``flash_attn`` package whose varlen function has flash-attn 2.6's keywords."""
    def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, causal=False,
                               window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False):
        rec.calls.append({"kv_heads": k.shape[1], "window_size": window_size, "softcap": softcap, "causal": causal,
                          "max_q": max_q})
        right = 0 if causal else window_size[1]
        return _reference_varlen(q, k, v, cu_q, softmax_scale, (window_size[0], right), softcap or None)

    module = types.ModuleType("flash_attn")
    module.flash_attn_varlen_func = flash_attn_varlen_func
    monkeypatch.setitem(sys.modules, "flash_attn", module)


def _stub_is_causal(rec):  # torch 2.9 / 2.10
    def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
        rec.calls.append({"is_causal": is_causal, "kv_heads": key.shape[1]})
        assert key.shape[1] == query.shape[1], "no enable_gqa: K/V must come with the query heads"
        return _reference_varlen(query, key, value, cu_seq_q, None, (-1, 0 if is_causal else -1))
    return varlen_attn


def _stub_window(rec):  # torch 2.11: scale and window_size, no enable_gqa
    def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                    window_size=(-1, -1), k_cache=None, v_cache=None):
        rec.calls.append({"scale": scale, "window_size": window_size, "kv_heads": key.shape[1]})
        assert key.shape[1] == query.shape[1], "no enable_gqa: K/V must come with the query heads"
        return _reference_varlen(query, key, value, cu_seq_q, scale, window_size)
    return varlen_attn


def _stub_gqa(rec):  # torch >= 2.12
    def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                    window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
        rec.calls.append({"scale": scale, "window_size": window_size, "enable_gqa": enable_gqa,
                          "kv_heads": key.shape[1]})
        assert enable_gqa or key.shape[1] == query.shape[1]
        return _reference_varlen(query, key, value, cu_seq_q, scale, window_size)
    return varlen_attn


def _stub_not_causal(rec):  # a signature that cannot mask causally
    def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None):
        raise AssertionError("must not be called")
    return varlen_attn


STUBS = {"is_causal": _stub_is_causal, "window": _stub_window, "gqa": _stub_gqa}


@pytest.mark.parametrize("variant", sorted(STUBS))
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen3"])
def test_torch_varlen_calls_each_signature_by_its_keywords(monkeypatch, variant, family):
    """torch 2.9/2.10 (is_causal), 2.11 (window_size, no enable_gqa), 2.12+ (enable_gqa): each gets only the
    keywords it has, grouped-query attention by repeated K/V where enable_gqa is absent, and the packed
    output equals eager attention per example (Mistral's window where the signature has window_size)."""
    from torch.nn.attention import varlen

    rec = _Recorder()
    monkeypatch.setattr(varlen, "varlen_attn", STUBS[variant](rec))
    config = tiny_config(family)
    model = _model(config, "torch_varlen")
    docs, ids, pos = _packed()
    windowed = getattr(config, "sliding_window", None) is not None
    if windowed and variant == "is_causal":
        with pytest.raises(ValueError, match="no window_size"):
            model(input_ids=ids, position_ids=pos)
        return
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos).logits[0]
    torch.testing.assert_close(packed, _eager_per_example(model, docs), rtol=0, atol=1e-5)
    call = rec.calls[0]
    if variant == "is_causal":
        assert call == {"is_causal": True, "kv_heads": 4}
    elif variant == "window":
        assert call["kv_heads"] == 4 and call["window_size"] == ((3, 0) if windowed else (-1, 0))
        assert call["scale"] == pytest.approx(8 ** -0.5)
    else:
        assert call["kv_heads"] == 2 and call["enable_gqa"] is True
        assert call["window_size"] == ((3, 0) if windowed else (-1, 0))


def test_torch_varlen_folds_a_custom_scale_into_the_queries_where_it_has_no_scale(monkeypatch):
    from torch.nn.attention import varlen

    monkeypatch.setattr(varlen, "varlen_attn", _stub_is_causal(_Recorder()))
    q, k, v = (torch.randn(1, 4, 6, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    pos = torch.arange(6)[None]
    got, _ = attention.torch_varlen_forward(None, q, k, v, None, scaling=0.2, position_ids=pos)
    want, _ = attention.sdpa_block_attention(None, q, k, v, None, scaling=0.2, position_ids=pos)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_torch_varlen_unavailable_where_its_signature_cannot_be_causal(monkeypatch):
    from torch.nn.attention import varlen

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(varlen, "varlen_attn", _stub_not_causal(_Recorder()))
    reason = backends.unavailable_reason("torch_varlen", use_gpu=True)
    assert reason and "neither window_size nor is_causal" in reason
    monkeypatch.setattr(varlen, "varlen_attn", _stub_gqa(_Recorder()))
    assert backends.unavailable_reason("torch_varlen", use_gpu=True) is None
    gemma = backends.model_features(tiny_config("gemma2"))
    assert "softcap" in backends.unavailable_reason("torch_varlen", use_gpu=True, features=gemma)
    monkeypatch.setattr(varlen, "varlen_attn", _stub_is_causal(_Recorder()))
    mistral = backends.model_features(tiny_config("mistral"))
    assert "window_size" in backends.unavailable_reason("torch_varlen", use_gpu=True, features=mistral)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fa_varlen_passes_window_softcap_and_native_gqa(monkeypatch, family):
    rec = _Recorder()
    _fake_flash_attn(monkeypatch, rec)
    config = tiny_config(family)
    model = _model(config, "fa_varlen")
    docs, ids, pos = _packed()
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos).logits[0]
    torch.testing.assert_close(packed, _eager_per_example(model, docs), rtol=0, atol=1e-5)
    assert {c["kv_heads"] for c in rec.calls} == {2} and all(c["causal"] for c in rec.calls)
    windows = {c["window_size"] for c in rec.calls}
    sliding = {"mistral": {(3, 0)}, "phi3": {(4, 0)}, "gemma2": {(3, 0), (-1, -1)}, "qwen2": {(3, 0), (-1, -1)}}
    assert windows == sliding.get(family, {(-1, -1)})  # (W - 1, 0): W keys including its own; no window: default
    assert {c["softcap"] for c in rec.calls} == ({0.5} if family == "gemma2" else {0.0})


def test_backends_refuse_what_they_cannot_apply(monkeypatch):
    from torch.nn.attention import varlen

    monkeypatch.setattr(varlen, "varlen_attn", _stub_gqa(_Recorder()))
    q = k = v = torch.randn(1, 2, 4, 8)
    pos = torch.arange(4)[None]
    with pytest.raises(ValueError, match="torch_varlen cannot apply attention logit softcapping"):
        attention.torch_varlen_forward(None, q, k, v, None, softcap=50.0, position_ids=pos)
    with pytest.raises(ValueError, match="torch_varlen cannot apply attention dropout"):
        attention.torch_varlen_forward(None, q, k, v, None, dropout=0.1, position_ids=pos)
    with pytest.raises(ValueError, match="flex cannot apply attention dropout"):
        attention.flex_attention_forward(None, q, k, v, None, dropout=0.1, position_ids=pos)
    for fn in (attention.sdpa_block_attention, attention.flex_attention_forward, attention.torch_varlen_forward):
        with pytest.raises(ValueError, match="attention sinks"):
            fn(None, q, k, v, None, s_aux=torch.zeros(2), position_ids=pos)


# ---- loading through transformers ----

@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_loads_through_from_config_and_from_pretrained(tmp_path, backend, monkeypatch):
    """transformers refuses any attn_implementation containing "flash" (a hub kernel request): the old
    ``flash_attn`` name could not load a model at all. Every backend name loads, and a forward runs where the
    backend can run on CPU (the CUDA kernels through their stand-ins)."""
    from torch.nn.attention import varlen

    monkeypatch.setattr(varlen, "varlen_attn", _stub_gqa(_Recorder()))
    _fake_flash_attn(monkeypatch, _Recorder())
    config = tiny_config("llama")
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    models = [AutoModelForCausalLM.from_config(config, attn_implementation=backend),
              AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=backend)]
    docs, ids, pos = _packed()
    for model in models:
        before = attention.CALLS[backend]
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model(input_ids=ids, position_ids=pos)
        assert attention.CALLS[backend] == before + config.num_hidden_layers


@pytest.mark.parametrize("backend", BACKENDS)
def test_gemma2_loads_with_every_backend_through_keels_loader(tmp_path, backend):
    """transformers refuses names containing "sdpa" for Gemma 2 (no SDPA support): keel loads sdpa_block
    under another registered name."""
    from types import SimpleNamespace

    from keel.model.build import load_model

    AutoModelForCausalLM.from_config(tiny_config("gemma2")).save_pretrained(tmp_path)
    cfg = SimpleNamespace(model=SimpleNamespace(dtype="float32", trust_remote_code=False,
                                                gradient_checkpointing=False))
    model = load_model(str(tmp_path), cfg, backend)
    assert model.config._attn_implementation == implementation(backend)


# ---- example boundaries computed once per micro-batch ----

def _counting_cu_seqlens(monkeypatch) -> list:
    calls: list = []
    real = attention.cu_seqlens

    def counted(position_ids):
        calls.append(1)
        return real(position_ids)

    monkeypatch.setattr(attention, "cu_seqlens", counted)
    return calls


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_boundaries_given_once_reach_every_attention_layer(monkeypatch, family):
    """With cu_seq_lens_q/k and max_length_q/k passed to the model (as the training step does, from the
    bundle's seq_lens), no attention layer derives them from position_ids (torch.nonzero + a host sync per
    layer); without them each layer does; the logits are the same either way."""
    from keel.train.forward import packed_boundaries

    _fake_flash_attn(monkeypatch, _Recorder())
    model = _model(tiny_config(family), "fa_varlen")
    docs, ids, pos = _packed(rows=2)
    cu, longest = packed_boundaries(np.array([LENGTHS, LENGTHS]), ids.shape[1])
    assert cu.tolist() == cu_seqlens(pos).tolist() and longest == max(LENGTHS)
    derived = _counting_cu_seqlens(monkeypatch)
    with torch.no_grad():
        given = model(input_ids=ids, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest,
                      max_length_k=longest).logits
        assert derived == []
        own = model(input_ids=ids, position_ids=pos).logits
    assert len(derived) == model.config.num_hidden_layers
    assert torch.equal(given, own)


def test_packed_boundaries_count_tail_padding_as_a_segment():
    from keel.train.forward import packed_boundaries

    seq_lens = np.array([[3, 2, 0], [4, 0, 0]])
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1], [0, 1, 2, 3, 0, 1, 2]])  # rows of 7: tails of 2 and 3
    cu, longest = packed_boundaries(seq_lens, 7)
    assert cu.dtype == torch.int32 and cu.tolist() == cu_seqlens(pos).tolist() == [0, 3, 5, 7, 11, 14]
    assert longest == 4
