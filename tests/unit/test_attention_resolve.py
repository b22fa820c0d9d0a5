"""Choosing the attention backend: strict where configured, ``auto`` resolved on the workers with what they
have (monkeypatched GPU and kernels), a fallback to the dense mask on a GPU said out loud."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from keel.model import backends
from keel.model.backends import Features, expected, resolve, unavailable_reason

from .test_attention import _fake_flash_attn, _Recorder, _stub_gqa, _stub_not_causal


@pytest.fixture
def gpu(monkeypatch):
    """This process sees a CUDA device."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


@pytest.fixture
def no_flash_attn(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # `import flash_attn` raises ModuleNotFoundError
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else real(name, *a))


def test_resolve_is_strict_on_cpu():
    assert resolve("auto", use_gpu=False) == "sdpa_block"
    with pytest.raises(ValueError, match="no backward pass on CPU"):
        resolve("flex", use_gpu=False)
    with pytest.raises(ValueError, match=r"keel-sft\[gpu\]|CUDA"):
        resolve("fa_varlen", use_gpu=False)
    with pytest.raises(ValueError, match="CUDA"):
        resolve("torch_varlen", use_gpu=False)
    with pytest.raises(ValueError, match="not a backend"):
        resolve("magic", use_gpu=False)


def test_flash_attn_whose_cuda_extension_fails_to_import_is_unavailable(tmp_path, monkeypatch, gpu):
    """find_spec finds an installed flash-attn whose compiled extension cannot load (built for another torch
    or CUDA); it must count as unavailable, so auto does not pick it and die in the first forward."""
    package = tmp_path / "flash_attn"
    package.mkdir()
    (package / "__init__.py").write_text(
        "raise OSError('libcudart.so.11.0: cannot open shared object file: No such file or directory')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
    reason = unavailable_reason("fa_varlen", use_gpu=True)
    assert reason and "OSError" in reason and "libcudart" in reason
    assert resolve("auto", use_gpu=True, log=None) != "fa_varlen"
    with pytest.raises(ValueError, match="model.attention=fa_varlen cannot be used: flash-attn does not import"):
        resolve("fa_varlen", use_gpu=True)


def test_auto_picks_the_best_kernel_the_worker_has(monkeypatch, gpu, no_flash_attn):
    from torch.nn.attention import varlen

    monkeypatch.setattr(varlen, "varlen_attn", _stub_gqa(_Recorder()))
    assert resolve("auto", use_gpu=True) == "torch_varlen"
    # Gemma 2 softcaps its attention logits: torch's varlen_attn cannot, flex can.
    assert resolve("auto", use_gpu=True, features=Features(softcap=50.0)) == "flex"
    with pytest.raises(ValueError, match="torch_varlen cannot be used: varlen_attn has no softcap"):
        resolve("torch_varlen", use_gpu=True, features=Features(softcap=50.0))
    _fake_flash_attn(monkeypatch, _Recorder())
    assert resolve("auto", use_gpu=True, features=Features(softcap=50.0)) == "fa_varlen"


def test_auto_falling_back_to_the_dense_mask_on_a_gpu_says_why(monkeypatch, gpu, no_flash_attn):
    from torch.nn.attention import varlen

    monkeypatch.setattr(varlen, "varlen_attn", _stub_not_causal(_Recorder()))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("flash_attn", "torch.nn.attention.flex_attention")
                        else real(name, *a))
    said: list[str] = []
    assert resolve("auto", use_gpu=True, log=said.append) == "sdpa_block"
    assert len(said) == 1 and "falls back to sdpa_block on a GPU" in said[0] and "S×S" in said[0]
    for why in ("flash-attn is not installed", "neither window_size nor is_causal", "no FlexAttention"):
        assert why in said[0]
    said.clear()
    assert resolve("auto", use_gpu=False, log=said.append) == "sdpa_block" and said == []  # CPU: nothing to say


def test_driver_leaves_gpu_backends_to_the_workers():
    """A head node without a GPU must not resolve (or refuse) what GPU workers will run; with CPU workers the
    driver knows the answer and fails early."""
    assert "resolved on each GPU worker" in expected("auto", use_gpu=True)
    assert expected("fa_varlen", use_gpu=True).startswith("fa_varlen")  # no GPU here, no error
    assert expected("auto", use_gpu=False).startswith("sdpa_block")
    with pytest.raises(ValueError, match="fa_varlen cannot be used"):
        expected("fa_varlen", use_gpu=False)
    with pytest.raises(ValueError, match="not a backend"):
        expected("flashy", use_gpu=True)
    assert expected("flash_attn", use_gpu=True).startswith("fa_varlen")  # the deprecated name


def test_worker_resolves_with_its_own_gpu_and_the_models_features(monkeypatch, tmp_path, gpu, no_flash_attn):
    from keel.core.worker import WorkerInfo
    from keel.train.engine import resolve_attention as _resolve_attention
    from torch.nn.attention import varlen
    from transformers import AutoModelForCausalLM

    from .test_attention import tiny_config

    monkeypatch.setattr(varlen, "varlen_attn", _stub_gqa(_Recorder()))
    cfg = SimpleNamespace(model=SimpleNamespace(trust_remote_code=False), cluster=SimpleNamespace(use_gpu=True))
    for family, want in (("llama", "torch_varlen"), ("gemma2", "flex")):
        path = tmp_path / family
        AutoModelForCausalLM.from_config(tiny_config(family)).save_pretrained(path)
        info = WorkerInfo(0, 1, Path(tmp_path), str(path), "auto", [], [], {})
        assert _resolve_attention(cfg, info) == want


def test_flash_attn_config_name_is_a_deprecated_alias():
    from keel.config import ModelConfig

    with pytest.warns(FutureWarning, match="fa_varlen"):
        model = ModelConfig(name="x", path="tiny", attention="flash_attn")
    assert model.attention == "fa_varlen"
    assert backends.check_name("flash_attn") == "fa_varlen"


def test_the_choice_imports_neither_transformers_nor_torch():
    """The driver says what the workers will run while Ray starts: deciding that must not import transformers'
    model code (about 2 s of the driver's critical path) or, for CPU workers, torch."""
    import subprocess
    import sys

    code = ("import sys; from keel.model.backends import expected, GPU_ORDER; "
            "print(expected('auto', use_gpu=False)); print(expected('sdpa_block', use_gpu=False)); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["sdpa_block (model.attention=auto, CPU workers)",
                                "sdpa_block (model.attention=sdpa_block, CPU workers)", "[]"]
