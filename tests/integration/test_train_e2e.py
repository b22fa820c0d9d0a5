"""`keel train` end to end: Ray Train + Ray Data + DeepSpeed ZeRO-3 on 2 CPU workers."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .conftest import keel_train

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("e2e") / "run"
    summary = keel_train(run_dir, "mix.T=2", "trainer.max_steps=12", "logger=wandb")
    return run_dir, summary


def test_summary(run):
    _, s = run
    assert s["world_size"] == 2 and s["zero_stage"] == 3 and s["steps"] == 12
    assert s["loss_last"] < s["loss_first"] - 1.0
    assert s["tokens_trained"] > 0 and 0.9 < s["packing_efficiency"] <= 1.0
    assert set(s["tokens_per_source"]) == {"arithmetic", "strings", "text"}
    for key in ("checkpoint_dir", "hf_dir", "wall_s"):
        assert s[key]


def test_metrics_jsonl(run):
    run_dir, _ = run
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))
    for r in rows:
        assert {"loss", "lr", "tokens", "tokens_per_s", "grad_norm"} <= set(r)
    assert (run_dir / "config.yaml").is_file() and (run_dir / "rejects.jsonl").is_file()
    assert list((run_dir / "wandb").glob("offline-run-*"))


def test_hf_dir_loads_and_generates(run):
    _, s = run
    tok = AutoTokenizer.from_pretrained(s["hf_dir"])
    model = AutoModelForCausalLM.from_pretrained(s["hf_dir"], dtype=torch.float32).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 3 + 4?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]
