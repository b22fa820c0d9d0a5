"""GPU presets (conf/model/*.yaml): settings, template pairing, composition order, published architectures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import compose

# preset -> (hub id, template, parameters of the published checkpoint)
PRESETS = {
    "llama3": ("meta-llama/Llama-3.1-8B-Instruct", "llama3.1", 8_030_261_248),
    "qwen2.5": ("Qwen/Qwen2.5-7B-Instruct", "qwen2.5", 7_615_616_512),
    "qwen3": ("Qwen/Qwen3-8B", "qwen3", 8_190_735_360),
    "mistral": ("mistralai/Mistral-7B-Instruct-v0.3", "mistral", 7_248_023_552),
    "gemma2": ("google/gemma-2-9b-it", "gemma", 9_241_705_984),
    "phi3": ("microsoft/Phi-3-mini-4k-instruct", "phi3", 3_821_079_552),
}


def test_every_preset_has_a_file():
    import keel.conf

    files = {p.stem for p in (Path(keel.conf.__file__).parent / "model").glob("*.yaml")}
    assert files == {"tiny", *PRESETS}


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_composes_with_gpu_grade_settings(preset):
    hub, template, _ = PRESETS[preset]
    cfg = compose(f"model={preset}")
    m = cfg.model
    assert (m.name, m.path, m.dtype, m.gradient_checkpointing, m.attention) == (preset, hub, "bfloat16", True, "auto")
    assert cfg.template.name == template
    assert cfg.packing.max_len >= 4096 and cfg.trainer.micro_batch_size == 1
    assert 5e-6 <= cfg.trainer.lr <= 2e-5
    assert cfg.deepspeed.overlap_comm is True and cfg.deepspeed.stage == 3
    assert m.arch is not None and m.arch.max_position_embeddings >= cfg.packing.max_len


@pytest.mark.parametrize("preset", PRESETS)
def test_template_given_wins_over_the_preset(preset):
    assert compose(f"model={preset}", "template=chatml").template.name == "chatml"
    assert compose("template=chatml", f"model={preset}").template.name == "chatml"  # order-free


def test_the_default_template_option_given_wins_too():
    assert compose("model=qwen3", "template=llama3").template.name == "llama3"


def test_later_groups_and_the_command_line_keep_their_precedence():
    """The model group is composed last: the preset's keys win over the group defaults (also when another
    option of those groups is picked), and the command line wins over the preset."""
    cfg = compose("model=llama3", "packing=ffd", "deepspeed=zero2", "trainer=default")
    assert (cfg.packing.strategy, cfg.packing.max_len) == ("ffd", 4096)
    assert (cfg.deepspeed.stage, cfg.deepspeed.overlap_comm) == (2, True)
    assert (cfg.trainer.lr, cfg.trainer.micro_batch_size) == (1e-5, 1)
    cfg = compose("model=llama3", "packing.max_len=8192", "trainer.lr=2e-5", "deepspeed.overlap_comm=false")
    assert (cfg.packing.max_len, cfg.trainer.lr, cfg.deepspeed.overlap_comm) == (8192, 2e-5, False)


def test_tiny_default_is_unchanged():
    cfg = compose()
    assert (cfg.model.name, cfg.template.name, cfg.packing.max_len, cfg.trainer.micro_batch_size) == \
        ("tiny", "llama3", 512, 2)
    assert (cfg.trainer.lr, cfg.deepspeed.overlap_comm, cfg.model.arch) == (1e-3, False, None)


def test_local_path_keeps_the_preset_settings(tmp_path):
    cfg = compose("model=qwen3", f"model.path={tmp_path}", "cluster.use_gpu=false")
    assert (cfg.model.path, cfg.model.name, cfg.template.name, cfg.packing.max_len) == \
        (str(tmp_path), "qwen3", "qwen3", 4096)


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_arch_is_the_published_architecture(preset):
    """Built on the meta device, each model.arch has exactly its published checkpoint's parameter count."""
    from keel.model.arch import meta_model, model_hf_config, param_counts

    cfg = compose(f"model={preset}")
    config, source = model_hf_config(cfg.model)
    assert config.model_type == cfg.model.arch.model_type and "model.arch" in source
    total, trainable, _ = param_counts(meta_model(config))
    assert total == trainable == PRESETS[preset][2]


def test_family_specific_arch_keys_are_checked():
    with pytest.raises(ValueError, match=r"model\.arch\.sliding_window has no effect with model_type=llama"):
        compose("model=llama3", "model.arch.sliding_window=4096")
    with pytest.raises(ValueError, match=r"model\.arch\.attn_logit_softcapping"):
        compose("model=qwen3", "model.arch.attn_logit_softcapping=50")
    with pytest.raises(ValueError, match=r"model\.arch\.num_kv_heads must divide"):
        compose("model=mistral", "model.arch.num_kv_heads=5")
    with pytest.raises(ValueError, match=r"model\.arch has no effect with model\.path=tiny"):
        compose("model=phi3", "model.path=tiny")


def test_cfg_job_shows_the_preset(tmp_path):
    keel = Path(sys.executable).with_name("keel")
    out = subprocess.run([str(keel), "train", "--cfg", "job", "model=gemma2"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120, check=True)
    printed = OmegaConf.create(out.stdout)
    assert (printed.template.name, printed.packing.max_len, printed.trainer.lr) == ("gemma", 4096, 1e-5)
    assert printed.model.arch.final_logit_softcapping == 30.0
