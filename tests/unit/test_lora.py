"""LoRA plugin: adapters on the tiny model, save/load and merge round trips, config and warnings."""

from __future__ import annotations

import pytest
import torch
from keel.config import LoraConfig
from keel.mitigation import build, warnings_for
from keel.mitigation.lora import (
    ALL_LINEAR,
    LLAMA_STYLE,
    check_targets,
    export_merged,
    merged_model,
    save_adapter,
    target_modules,
    wrap,
)
from keel.model.build import param_counts
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.conftest import compose

ONE_EPOCH = {"sources": {"a": {"epochs": 1.0}}}


def _base(path: str):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=_ids()).logits


def _trained_lora(path: str):
    """A LoRA-wrapped tiny model whose adapters are not the identity (lora_B is 0 at init)."""
    model = wrap(_base(path), LoraConfig(), seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


@pytest.fixture(scope="module")
def adapter(tiny_path, tmp_path_factory):
    """The trained model's logits and its adapter saved the way the loop saves it."""
    model = _trained_lora(tiny_path)
    out = tmp_path_factory.mktemp("lora") / "adapter"
    save_adapter(model, out, rank=0)
    return _logits(model), out


def test_only_adapters_train_and_counts_add_up(tiny_path):
    base = _base(tiny_path)
    base_total = sum(p.numel() for p in base.parameters())
    expected = sum(16 * (m.in_features + m.out_features) for n, m in base.named_modules()
                   if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in LLAMA_STYLE)
    model = wrap(base, LoraConfig(), seed=0)
    trainable, total = param_counts(model)
    assert trainable == expected and total == base_total + expected and trainable < total
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_A" in n or "lora_B" in n for n in names)
    assert {n.split(".")[-4] for n in names} == set(LLAMA_STYLE)


def test_adapter_init_is_seeded_and_leaves_the_rng_alone(tiny_path):
    torch.manual_seed(123)
    a = wrap(_base(tiny_path), LoraConfig(), seed=7)
    after_wrap = torch.rand(4)
    torch.manual_seed(123)
    b = wrap(_base(tiny_path), LoraConfig(), seed=7)
    torch.manual_seed(123)
    assert torch.equal(after_wrap, torch.rand(4))  # the training RNG stream is untouched
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa if "lora_A" in k)


def test_adapter_files_are_non_empty_and_reload_to_identical_logits(tiny_path, adapter):
    logits, out = adapter
    config, weights = out / "adapter_config.json", out / "adapter_model.safetensors"
    assert config.stat().st_size > 0 and weights.stat().st_size > 0
    state = load_file(weights)
    assert state and all(v.numel() > 0 for v in state.values())
    assert any(v.abs().sum() > 0 for k, v in state.items() if "lora_B" in k)
    reloaded = PeftModel.from_pretrained(_base(tiny_path), str(out))
    assert torch.equal(_logits(reloaded), logits)
    assert not torch.allclose(_logits(_base(tiny_path)), logits)  # the adapter changes the model


def test_merged_export_matches_the_adapter_model(tiny_path, adapter, tmp_path):
    logits, out = adapter
    hf = tmp_path / "hf"
    export_merged(tiny_path, out, hf, compose())
    merged = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(merged), logits, atol=1e-5, rtol=0)  # fp32 rounding only
    assert (hf / "tokenizer.json").is_file()
    assert torch.equal(_logits(merged_model(tiny_path, out, torch.float32)), _logits(merged))


def test_target_modules_defaults_and_overrides():
    assert target_modules(LoraConfig(), "llama") == LLAMA_STYLE
    assert target_modules(LoraConfig(), "some_new_family") == ALL_LINEAR
    assert target_modules(LoraConfig(target_modules=["q_proj", "v_proj"]), "llama") == ["q_proj", "v_proj"]
    assert target_modules(LoraConfig(target_modules=[ALL_LINEAR]), "llama") == ALL_LINEAR
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj"]
    check_targets(["q_proj", "up_proj"], names)
    check_targets(ALL_LINEAR, names)
    with pytest.raises(ValueError, match=r"config error: mitigation.lora.target_modules \['qkv_proj'\]"):
        check_targets(["q_proj", "qkv_proj"], names)


def test_configure_resolves_targets_into_the_config():
    cfg = compose("mitigation=lora")
    (plugin,) = build(cfg)
    plugin.configure(cfg)
    assert cfg.mitigation.lora.target_modules == LLAMA_STYLE
    bad = compose("mitigation=lora", "mitigation.lora.target_modules=[c_attn]")
    with pytest.raises(ValueError, match="mitigation.lora.target_modules"):
        build(bad)[0].configure(bad)


@pytest.mark.parametrize(("override", "key"), [
    ("mitigation.lora.r=0", "mitigation.lora.r"),
    ("mitigation.lora.alpha=0", "mitigation.lora.alpha"),
    ("mitigation.lora.dropout=1.0", "mitigation.lora.dropout"),
    ("mitigation.lora.bias=some", "mitigation.lora.bias"),
    ("mitigation.lora.target_modules=[]", "mitigation.lora.target_modules"),
])
def test_bad_options_name_the_key(override, key):
    with pytest.raises(ValueError, match=f"config error: {key}"):
        compose("mitigation=lora", override)


def test_composes_with_other_plugins():
    cfg = compose("mitigation=[replay,lora]")
    assert cfg.mitigation.enabled == ["replay", "lora"] and cfg.mitigation.lora.r == 16
    assert [p.name for p in build(cfg)] == ["replay", "lora"]


def test_warnings_lora_wants_a_higher_lr_and_skips_the_full_ft_one():
    cfg = compose("mitigation=lora")  # default lr 1e-3: above the full-fine-tune limit, fine for LoRA
    assert warnings_for(cfg, build(cfg), ONE_EPOCH) == []
    low = compose("mitigation=lora", "trainer.lr=5e-6")
    (warning,) = warnings_for(low, build(low), ONE_EPOCH)
    assert "LoRA usually wants ~1e-4" in warning
    both = compose("mitigation=[conservative_lr,lora]")
    plugins = build(both)
    for p in plugins:
        p.configure(both)
    assert any("LoRA usually wants" in w for w in warnings_for(both, plugins, ONE_EPOCH))
    many = {"sources": {"a": {"epochs": 5.0}}}
    assert any("epochs" in w for w in warnings_for(cfg, build(cfg), many))  # overfitting still warned


def test_flops_count_frozen_weights_without_their_weight_gradients(tiny_path):
    """A full fine-tune is 6·N·T; with LoRA the frozen base weights cost 4·N·T and the adapters 6·N·T."""
    from keel.train.flops import matmul_params, step_flops

    full = _base(tiny_path)
    trainable, frozen = matmul_params(full)
    assert frozen == 0 and trainable == sum(p.numel() for p in full.parameters()) - full.get_input_embeddings(
    ).weight.numel()
    assert step_flops((trainable, 0), 2, 8, tokens=10, sum_sq_lengths=0) == 6.0 * trainable * 10
    wrapped = wrap(_base(tiny_path), LoraConfig(), seed=0)
    t, f = matmul_params(wrapped)
    assert t == sum(p.numel() for p in wrapped.parameters() if p.requires_grad) and f == trainable
    assert step_flops((t, f), 2, 8, tokens=10, sum_sq_lengths=3) == (6.0 * t + 4.0 * f) * 10 + 6.0 * 2 * 8 * 3
