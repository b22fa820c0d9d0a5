"""Same global batch, different split: 2 workers x 1 micro-batch == 1 worker x 2 accumulation
(the 2-worker run also evaluates in training, which must not change what it trains)."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from .conftest import keel_train

pytestmark = pytest.mark.integration

COMMON = ("trainer.max_steps=1", "trainer.micro_batch_size=1", "logger=none", "trainer.warmup_steps=0",
          "trainer.max_grad_norm=0")


def test_data_parallel_equals_accumulation(tmp_path):
    two = keel_train(tmp_path / "dp2", *COMMON, "cluster.num_workers=2", "trainer.grad_accum=1",
                     "eval.every_n_steps=1", "eval.passk.prompts=3", "eval.passk.n=2", "eval.passk.k=[1]")
    one = keel_train(tmp_path / "dp1", *COMMON, "cluster.num_workers=1", "trainer.grad_accum=2")
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert [e["step"] for e in map(json.loads, (tmp_path / "dp2" / "eval.jsonl").read_text().splitlines())] == [0, 1]
    assert abs(two["loss_first"] - one["loss_first"]) < 1e-4
    w2 = load_file(f"{two['hf_dir']}/model.safetensors")
    w1 = load_file(f"{one['hf_dir']}/model.safetensors")
    assert w2.keys() == w1.keys()
    worst = max((w2[k].float() - w1[k].float()).abs().max().item() for k in w2)
    assert worst < 1e-4, worst
    base = load_file(f"{two['model_path']}/model.safetensors")
    assert max((w2[k] - base[k]).abs().max().item() for k in w2) > 1e-4  # the step did change the weights
