"""Every GPU preset's architecture, at reduced width and depth but with its real vocabulary, trains two
steps through Keel's worker (DeepSpeed ZeRO-3, bf16, gradient checkpointing, overlap_comm) on CPU.

Each checkpoint is built from the preset's ``model.arch`` (random init) and saved with a tokenizer
carrying the family's special tokens, then trained as ``model=PRESET model.path=DIR
cluster.use_gpu=false``: the preset's settings, the local checkpoint's weights. One spawned process
runs all presets (one DeepSpeed engine each) to keep the cost down.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.conftest import compose

pytestmark = pytest.mark.integration

PRESETS = ("llama3", "qwen2.5", "qwen3", "mistral", "gemma2", "phi3")
MAX_LEN = 64
# The family's tokens as its tokenizer declares them (the tiny tokenizer already holds the chat markup).
FAMILY_TOKENS = {
    "llama3": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": "<|end_of_text|>"},
    "qwen2.5": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
    "qwen3": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "additional": ["<think>", "</think>"]},
    "mistral": {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>"},
    "gemma2": {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"},
    "phi3": {"bos_token": "<s>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"},
}


def reduced_overrides(arch) -> dict:
    """2 layers, hidden 64: the family's structure (GQA ratio, head_dim rule, softcaps) kept, widths cut."""
    heads = 4
    kv = heads if arch.num_kv_heads == arch.num_heads else 2
    out = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": heads,
           "num_key_value_heads": kv, "head_dim": 16}
    if arch.query_pre_attn_scalar is not None:
        out["query_pre_attn_scalar"] = 16
    return out


def build_checkpoint(preset: str, out: Path, tiny_path: str) -> int:
    """The preset's architecture at reduced width with its real vocabulary, random init, saved with a
    tokenizer carrying the family's special tokens; returns the vocabulary size."""
    import torch
    from keel.model.arch import hf_config
    from keel.model.build import load_tokenizer
    from transformers import AutoModelForCausalLM

    arch = compose(f"model={preset}", "cluster.use_gpu=false").model.arch
    tokens = dict(FAMILY_TOKENS[preset])
    tokenizer = load_tokenizer(tiny_path)
    tokenizer.add_special_tokens({k: v for k, v in tokens.items() if k != "additional"})
    tokenizer.add_tokens(tokens.get("additional", []))
    ids = {k.replace("_token", "_token_id"): tokenizer.convert_tokens_to_ids(v)
           for k, v in tokens.items() if k != "additional"}
    config = hf_config(arch, **reduced_overrides(arch), **ids)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    assert model.get_input_embeddings().num_embeddings == arch.vocab_size
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return arch.vocab_size


def _rows(vocab: int, seed: int) -> dict:
    """One packed row of two examples, token ids over the whole real vocabulary, second halves trained."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lens = [40, MAX_LEN - 40]
    ids = rng.integers(0, vocab, MAX_LEN)
    targets = np.full(MAX_LEN, -100)
    start = 0
    for n in lens:
        targets[start + n // 2: start + n - 1] = ids[start + n // 2 + 1: start + n]
        start += n
    pos = np.concatenate([np.arange(n) for n in lens])
    return {"input_ids": ids[None], "targets": targets[None], "position_ids": pos[None], "seq_lens": np.array([lens])}


def _train_two_steps(preset: str, ckpt: Path, run_dir: Path) -> dict:
    """``model=PRESET model.path=ckpt``: two steps through keel.train.engine's engine and train_step."""
    from deepspeed.utils import safe_get_full_fp32_param
    from keel.core.worker import WorkerInfo
    from keel.train.engine import build_engine
    from keel.train.step import train_step

    cfg = compose(f"model={preset}", f"model.path={ckpt}", "cluster.use_gpu=false", "cluster.num_workers=1",
                  f"packing.max_len={MAX_LEN}", "trainer.max_steps=2", "trainer.warmup_steps=0",
                  "trainer.lr=1e-3", "logger=none")
    info = WorkerInfo(0, 1, run_dir, str(ckpt), "sdpa_block", [], [], {})
    engine, _ = build_engine(cfg, info, [])
    engine.train()
    embed = engine.module.get_input_embeddings().weight
    before = safe_get_full_fp32_param(embed).clone()
    vocab = embed.ds_shape[0] if hasattr(embed, "ds_shape") else embed.shape[0]
    steps = [train_step(engine, _rows(vocab, s), cfg, 1) for s in range(2)]
    moved = float((safe_get_full_fp32_param(embed) - before).abs().max())
    result = {"losses": [m["loss"] for m in steps], "grad_norms": [m["grad_norm"] for m in steps],
              "vocab": int(vocab), "moved": moved, "bf16": engine.bfloat16_enabled(),
              "stage": engine.zero_optimization_stage(), "overlap_comm": engine.zero_overlap_comm(),
              "checkpointing": bool(engine.module.is_gradient_checkpointing),
              "max_len": cfg.packing.max_len, "micro": cfg.trainer.micro_batch_size}
    engine.destroy()
    return result


def _worker(rank: int, out_dir: str, tiny_path: str, port: int) -> None:
    import os
    import time
    import traceback

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                      DS_ACCELERATOR="cpu")
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=0, world_size=1)
    results = {}
    for preset in PRESETS:
        t0 = time.perf_counter()
        ckpt = Path(out_dir) / preset
        try:
            vocab = build_checkpoint(preset, ckpt, tiny_path)
            results[preset] = {"arch_vocab": vocab, **_train_two_steps(preset, ckpt, Path(out_dir) / f"run-{preset}")}
        except Exception:  # recorded per preset, so one failure does not hide the others
            results[preset] = {"error": traceback.format_exc()[-3000:]}
        results[preset]["seconds"] = round(time.perf_counter() - t0, 1)
    (Path(out_dir) / "results.json").write_text(json.dumps(results, indent=2))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_path) -> dict:
    import torch.multiprocessing as mp

    from .test_ewc import _free_port

    out = tmp_path_factory.mktemp("presets")
    mp.spawn(_worker, args=(str(out), tiny_path, _free_port()), nprocs=1)
    return json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_trains_two_cpu_steps(trained, preset):
    r = trained[preset]
    assert "error" not in r, r.get("error")
    assert r["vocab"] == r["arch_vocab"]  # the real vocabulary, whole
    # The preset's settings reached the engine: bf16, ZeRO-3, overlap_comm, gradient checkpointing.
    assert (r["bf16"], r["stage"], r["overlap_comm"], r["checkpointing"], r["micro"]) == (True, 3, True, True, 1)
    assert all(math.isfinite(x) for x in r["losses"] + r["grad_norms"]) and min(r["grad_norms"]) > 0
    # Random init over the real vocabulary: the first loss is near ln(V) (logits span all V entries).
    assert abs(r["losses"][0] - math.log(r["vocab"])) < 1.0, (r["losses"], r["vocab"])
    assert r["moved"] > 0  # the optimizer steps changed the (partitioned) weights
