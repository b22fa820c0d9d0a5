"""``keel plan``: offline per-GPU sizing of the configured run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from keel.cli.plan import main as plan_main
from keel.launch.plan import GPU_ORDER, predict_attention
from keel.train import memory

from tests.conftest import compose

LLAMA_PARAMS = 8_030_261_248
LLAMA_LARGEST = 128_256 * 4096  # the embedding (and the untied LM head)
GIB = 2**30
HEADLINE = ["model=llama3", "cluster=slurm", "cluster.num_nodes=2", "cluster.gpus_per_node=8"]


@pytest.fixture(autouse=True)
def _no_slurm_job(monkeypatch):
    for key in ("SLURM_JOB_NUM_NODES", "SLURM_GPUS_ON_NODE"):
        monkeypatch.delenv(key, raising=False)


def _json(capsys, *argv: str) -> dict:
    plan_main([*argv, "--json"])
    return json.loads(capsys.readouterr().out)


def test_headline_run_fits_on_two_nodes_of_eight(capsys):
    p = _json(capsys, *HEADLINE)
    assert p["params"] == p["trainable_params"] == LLAMA_PARAMS
    assert (p["world_size"], p["zero_stage"], p["template"], p["max_len"], p["micro_batch_size"]) == \
        (16, 3, "llama3.1", 4096, 1)
    gib = p["per_gpu_gib"]
    # ZeRO-3 model states: 18 B/param over 16 GPUs (mixed-precision Adam's 2 + 2 + 12, the gradient fp32 in
    # DeepSpeed's estimate); the largest layer's gathered weights and gradients are a ZeRO buffer.
    per_param = 18 * LLAMA_PARAMS / 16 / GIB
    assert gib["model_states"] == pytest.approx(per_param, abs=0.01)
    assert 16 * LLAMA_PARAMS / 16 / GIB <= gib["model_states"] < 1.15 * 16 * LLAMA_PARAMS / 16 / GIB
    assert gib["zero_buffers"] >= 4 * LLAMA_LARGEST / GIB
    assert set(gib) >= {"model_states", "activations", "logits", "total"}
    assert gib["total"] == pytest.approx(sum(v for k, v in gib.items() if k != "total"), abs=0.05)
    assert p["fits"] is True and gib["total"] < 80


def test_same_model_on_one_80gb_gpu_does_not_fit(capsys):
    p = _json(capsys, "model=llama3", "cluster=slurm", "cluster.num_nodes=1", "cluster.gpus_per_node=1",
              "--gpu-memory-gib", "80")
    assert p["world_size"] == 1 and p["fits"] is False and p["per_gpu_gib"]["model_states"] > 80
    local = _json(capsys, "model=llama3", "cluster.num_workers=1", "cluster.use_gpu=true")
    assert local["world_size"] == 1 and local["fits"] is False


@pytest.mark.parametrize(("gpus", "nodes"), [(1, 1), (8, 1), (8, 2), (4, 8)])
@pytest.mark.parametrize(("offload_optimizer", "offload_param"), [(False, False), (True, False), (True, True)])
def test_model_states_equal_deepspeeds_zero3_estimate(gpus, nodes, offload_optimizer, offload_param):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    _, ds_gpu, _ = estimate_zero3_model_states_mem_needs(
        LLAMA_PARAMS, LLAMA_LARGEST, num_gpus_per_node=gpus, num_nodes=nodes, cpu_offload=offload_optimizer,
        cpu_offload_params=offload_param, zero_init=True)
    ours = memory.model_states(LLAMA_PARAMS, LLAMA_PARAMS, LLAMA_LARGEST, gpus * nodes, 3, 2,
                               offload_optimizer, offload_param) + memory.gathered_layer(3, 2, LLAMA_LARGEST)
    assert abs(ours - ds_gpu) <= 1  # DeepSpeed truncates the per-GPU share to an int


@pytest.mark.parametrize("offload", [False, True])
def test_model_states_equal_deepspeeds_zero2_estimate(offload):
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    _, ds_gpu = estimate_zero2_model_states_mem_needs(LLAMA_PARAMS, num_gpus_per_node=8, num_nodes=2,
                                                      cpu_offload=offload)
    assert abs(memory.model_states(LLAMA_PARAMS, LLAMA_PARAMS, LLAMA_LARGEST, 16, 2, 2, offload) - ds_gpu) <= 1


def test_plan_model_states_follow_offload_settings(capsys):
    base = _json(capsys, *HEADLINE)["per_gpu_gib"]["model_states"]
    opt = _json(capsys, *HEADLINE, "deepspeed.offload_optimizer=true")
    both = _json(capsys, *HEADLINE, "deepspeed.offload_optimizer=true", "deepspeed.offload_param=true")
    assert opt["per_gpu_gib"]["model_states"] == pytest.approx(2 * LLAMA_PARAMS / 16 / GIB, abs=0.01)
    assert both["per_gpu_gib"]["model_states"] == 0
    assert base > opt["per_gpu_gib"]["model_states"] and "host memory" in " ".join(both["notes"])


def test_lora_counts_the_adapters_as_trainable(capsys):
    p = _json(capsys, *HEADLINE, "mitigation=lora")
    r, layers, h, kv, inter = 16, 32, 4096, 1024, 14336
    adapters = layers * r * ((h + h) * 2 + (h + kv) * 2 + (h + inter) * 3)  # q,o; k,v; gate,up,down
    assert p["trainable_params"] == adapters == 41_943_040
    assert p["params"] == LLAMA_PARAMS + adapters
    # Frozen base: its bf16 weights only; the adapters carry the 16 B/param optimizer side.
    expected = (2 * p["params"] + 16 * adapters) // 16
    assert p["per_gpu_gib"]["model_states"] == pytest.approx(expected / GIB, abs=0.01)


def test_local_checkpoint_is_sized_from_its_config_json(tmp_path, capsys):
    """`model=PRESET model.path=DIR`: the architecture of DIR's config.json, the preset's settings."""
    from keel.model.arch import hf_config, meta_model, param_counts

    arch = compose("model=qwen3").model.arch
    hf_config(arch, hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=64).save_pretrained(tmp_path)
    p = _json(capsys, "model=qwen3", f"model.path={tmp_path}", "cluster.num_workers=1")
    total = param_counts(meta_model(hf_config(arch, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                                              num_attention_heads=4, num_key_value_heads=2, head_dim=64)))[0]
    assert p["params"] == total and p["arch_source"] == f"{tmp_path}/config.json"
    assert (p["model_type"], p["template"], p["max_len"], p["micro_batch_size"]) == ("qwen3", "qwen3", 4096, 1)


def test_gradient_checkpointing_and_sdpa_block_change_activations(capsys):
    ckpt = _json(capsys, *HEADLINE)
    full = _json(capsys, *HEADLINE, "model.gradient_checkpointing=false")
    dense = _json(capsys, *HEADLINE, "model.attention=sdpa_block")
    assert full["per_gpu_gib"]["activations"] > 5 * ckpt["per_gpu_gib"]["activations"]
    assert dense["attention"] == "sdpa_block" and dense["attention_note"] == "model.attention as configured"
    assert dense["per_gpu_gib"]["activations"] > ckpt["per_gpu_gib"]["activations"]
    assert any("S×S" in n for n in dense["notes"]) and not any("S×S" in n for n in ckpt["notes"])


def test_plan_ignores_this_machine_and_the_gpu_refusal(capsys):
    """On a host without GPUs, `keel plan model=llama3` (cluster=local) still sizes the run, saying that the
    workers would be CPU workers; keel train would refuse it."""
    p = _json(capsys, "model=llama3")
    assert p["use_gpu"] is False and p["attention"] == "sdpa_block" and p["params"] == LLAMA_PARAMS
    assert any("CPU" in n for n in p["notes"])


def test_attention_prediction():
    from keel.model.attention import BACKENDS

    assert set(GPU_ORDER) <= set(BACKENDS)  # the names auto picks from are the backends' own
    assert predict_attention("auto", use_gpu=False)[0] == "sdpa_block"
    backend, note = predict_attention("auto", use_gpu=True)
    assert backend in BACKENDS and note.startswith("predicted")
    assert predict_attention("flex", use_gpu=True) == ("flex", "model.attention as configured")


def test_same_overrides_and_errors_as_keel_train(capsys):
    with pytest.raises(SystemExit, match=r"mix\.T"):
        plan_main(["mix.T=-1"])
    with pytest.raises(SystemExit, match=r"model\.arch is not set"):
        plan_main(["model.path=some-org/some-model"])
    assert _json(capsys, "model=mistral", "packing.max_len=8192", "trainer.micro_batch_size=2")["max_len"] == 8192


def test_tiny_default_plan(capsys):
    p = _json(capsys)
    assert p["params"] == 4_999_424 and p["world_size"] == 2 and p["fits"] is True


def test_plan_is_a_keel_command(tmp_path):
    keel = Path(sys.executable).with_name("keel")
    out = subprocess.run([str(keel), "--help"], capture_output=True, text=True, timeout=60, check=True)
    assert "plan " in out.stdout
    report = subprocess.run([str(keel), "plan", *HEADLINE], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120, check=True).stdout
    assert "8.03B total" in report and "fits in 80 GiB" in report and "llama3.1" in report


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "phi3"])
def test_activation_formula_matches_the_saved_tensors(model_type):
    """Per decoder layer, the bytes autograd saves for backward (bf16, sdpa_block on CPU) equal the formula
    within 5%, measured with saved-tensor hooks on a 2-layer model."""
    import keel.model.attention  # noqa: F401  (registers sdpa_block)
    import torch
    from keel.launch.plan import layer_layout
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, vocab_size=512, hidden_size=256, intermediate_size=688,
                                  num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, head_dim=32,
                                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa_block", dtype=torch.bfloat16)
    tokens = 256
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    layer = model.model.layers[0]
    weights = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    layer.register_forward_pre_hook(lambda *a: (saved.clear(), hooks.__enter__()) and None)
    layer.register_forward_hook(lambda *a: hooks.__exit__(None, None, None))
    model(input_ids=torch.randint(0, 512, (1, tokens)), position_ids=torch.arange(tokens)[None])
    measured = sum(v for k, v in saved.items() if k not in weights)
    lo = layer_layout(model, config)
    predicted = memory.layer_bytes_per_token(lo, 2, dense_kv=True) * tokens + memory.dense_mask_bytes(1, tokens, 2)
    assert measured == pytest.approx(predicted, rel=0.05), (measured, predicted)
