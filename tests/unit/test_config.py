"""Every option of every config group composes and validates; bad overrides fail fast."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import keel.conf
import pytest
from keel.config import KeelConfig
from omegaconf import OmegaConf

from tests.conftest import compose

CONF = Path(keel.conf.__file__).parent
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and not p.name.startswith("_"))
OPTIONS = [(g, y.stem) for g in GROUPS for y in sorted((CONF / g).glob("*.yaml"))]
JINJA = Path(__file__).parent / "fixtures" / "chat_templates" / "qwen3.jinja"


def test_groups_are_the_documented_ones():
    assert GROUPS == sorted(["model", "data", "template", "masking", "mix", "packing", "mitigation",
                             "deepspeed", "cluster", "logger", "trainer", "eval"])


@pytest.mark.parametrize(("group", "option"), OPTIONS)
def test_every_option_composes(group, option):
    extra = [f"template.path={JINJA}"] if (group, option) == ("template", "jinja") else []  # jinja needs its file
    cfg = compose(f"{group}={option}", *extra)
    assert isinstance(cfg, KeelConfig)
    if group == "mitigation":  # plugins compose as a list: mitigation=[replay,conservative_lr]
        assert cfg.mitigation.enabled == ([] if option == "none" else [option])
    else:
        assert getattr(cfg, group).name == option


def test_mitigations_compose_as_a_list():
    cfg = compose("mitigation=[replay,conservative_lr]")
    assert cfg.mitigation.enabled == ["replay", "conservative_lr"]


def test_defaults():
    cfg = compose()
    assert (cfg.model.name, cfg.data.name, cfg.deepspeed.stage, cfg.cluster.num_workers) == ("tiny", "demo", 3, 2)
    assert cfg.model.trust_remote_code is False and cfg.trainer.resume == "auto"


@pytest.mark.parametrize(("override", "needle"), [
    ("mix.T=-1", "mix.T"),
    ("mix.T=0", "mix.T"),
    ("trainer.max_steps=0", "trainer.max_steps"),
    ("cluster.num_workers=0", "cluster.num_workers"),
    ("packing.strategy=zigzag", "packing.strategy"),
])
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(ValueError, match=needle.replace(".", r"\.")):
        compose(override)


@pytest.mark.parametrize(("override", "needle"), [
    ("trainer.max_stepz=3", "max_stepz"),
    ("masking=nope", "masking"),
    ("trainer.lr=fast", "lr"),
])
def test_unknown_keys_and_options_fail(override, needle):
    with pytest.raises(Exception, match=needle):
        compose(override)


@pytest.mark.parametrize(("override", "needle"), [
    ("mix.T=-1", "mix.T"), ("masking=nope", "masking"), ("trainer.max_stepz=3", "max_stepz"),
    ("model.attention=fa_varlen", "keel-sft[gpu]")])
def test_cli_fails_fast_naming_the_key(tmp_path, override, needle):
    keel = Path(sys.executable).with_name("keel")
    out = subprocess.run([str(keel), "train", override], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode != 0
    assert needle in out.stdout + out.stderr
    assert not (tmp_path / "outputs").exists() or not list((tmp_path / "outputs").rglob("summary.json"))


def test_cli_prints_composed_config(tmp_path):
    keel = Path(sys.executable).with_name("keel")
    out = subprocess.run([str(keel), "train", "--cfg", "job", "mix.T=3"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120, check=True)
    printed = OmegaConf.create(out.stdout)
    assert printed.mix.T == 3.0 and printed.model.name == "tiny"


def test_template_names_with_a_dot_and_jinja_need_their_file():
    assert compose("template=llama3.1").template.name == "llama3.1"
    assert compose("template=qwen2.5").template.name == "qwen2.5"
    assert compose("template=jinja", f"template.path={JINJA}").template.path == str(JINJA)
    with pytest.raises(Exception, match="template.path"):
        compose("template=jinja")
    with pytest.raises(ValueError, match="template.path"):
        compose("template=llama3", f"template.path={JINJA}")
    assert compose().masking.train_reasoning is True
