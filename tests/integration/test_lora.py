"""`keel train mitigation=lora`: PEFT adapters under ZeRO-3 on 2 workers, through a restart."""

from __future__ import annotations

import json
import math

import pytest
import torch
from keel.cli.export import main as keel_export
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from .conftest import keel_train

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Rank 1 is killed after step 3 (its checkpoint and export written); the worker group restarts from the
    step-3 checkpoint."""
    run_dir = tmp_path_factory.mktemp("lora") / "run"
    summary = keel_train(run_dir, "mitigation=lora", "trainer.max_steps=6", "trainer.checkpoint_every=3",
                         "trainer.export_every=3", "logger=none", "cluster.max_failures=1", "fault.kill_rank=1",
                         "fault.at_step=3")
    return run_dir, summary


def _logits(model) -> torch.Tensor:
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def test_summary(run):
    run_dir, s = run
    assert s["world_size"] == 2 and s["zero_stage"] == 3 and s["steps"] == 6
    assert s["restarts"] == 1 and s["resumed_from_step"] == 3  # the PEFT model's DeepSpeed checkpoint reloads
    assert 0 < s["trainable_params"] < s["total_params"] / 10
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert s["loss_last"] < s["loss_first"]


def test_adapter_is_whole_and_trained(run):
    _, s = run
    state = load_file(f"{s['adapter_dir']}/adapter_model.safetensors")
    # Ungathered ZeRO-3 partitions would be saved as empty tensors (or half-size slices).
    assert sum(v.numel() for v in state.values()) == s["trainable_params"]
    for k, v in state.items():
        assert v.shape[0 if "lora_A" in k else 1] == 16  # r
    assert all(v.abs().sum() > 0 for k, v in state.items() if "lora_B" in k)  # lora_B starts at 0


def test_adapter_loads_and_merged_export_matches(run):
    _, s = run
    base = AutoModelForCausalLM.from_pretrained(s["model_path"], dtype=torch.float32)
    base_logits = _logits(base)
    with_adapter = _logits(PeftModel.from_pretrained(base, s["adapter_dir"]))
    merged = AutoModelForCausalLM.from_pretrained(s["hf_dir"], dtype=torch.float32)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(merged), with_adapter, atol=1e-5, rtol=0)
    assert not torch.allclose(with_adapter, base_logits)


def _same_tensors(a, b) -> bool:
    wa, wb = load_file(a), load_file(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_exports_along_the_way_and_keel_export(run, tmp_path):
    """trainer.export_every=3 wrote the adapter and the merged model at step 3; `keel export` of the step-3 and
    step-6 checkpoints gives the same adapters (default) and merged models (--merge) as the run wrote."""
    run_dir, s = run
    along = run_dir / "exports" / "step_000003"
    for step, adapter, merged in ((3, along / "adapter", along / "hf"), (6, s["adapter_dir"], s["hf_dir"])):
        checkpoint = str(run_dir / "checkpoints" / f"step_{step:06d}")
        assert keel_export([checkpoint, "--out", str(tmp_path / f"adapter{step}")])["kind"] == "LoRA adapter"
        keel_export([checkpoint, "--out", str(tmp_path / f"merged{step}"), "--merge"])
        assert _same_tensors(tmp_path / f"adapter{step}" / "adapter_model.safetensors",
                             f"{adapter}/adapter_model.safetensors"), step
        assert _same_tensors(tmp_path / f"merged{step}" / "model.safetensors", f"{merged}/model.safetensors"), step
    config = json.loads((tmp_path / "adapter3" / "adapter_config.json").read_text())
    assert config["r"] == 16 and config["base_model_name_or_path"] == s["model_path"]
    base = AutoModelForCausalLM.from_pretrained(s["model_path"], dtype=torch.float32)
    step3 = _logits(PeftModel.from_pretrained(base, str(tmp_path / "adapter3")))
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged3")), step3,
                               atol=1e-5, rtol=0)
    assert not _same_tensors(tmp_path / "adapter3" / "adapter_model.safetensors",
                             tmp_path / "adapter6" / "adapter_model.safetensors")
