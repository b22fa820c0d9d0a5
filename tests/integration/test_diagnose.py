"""`keel diagnose` on the tiny model: a model against itself is healthy; a strongly perturbed copy forgets;
a hard high-LR fine-tune on a narrow task is catastrophic forgetting and the same run with replay is healthy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import keel_train

pytestmark = pytest.mark.integration

KEEL = str(Path(sys.executable).with_name("keel"))
FAST = ["--limit", "4", "--shots", "2", "--max-new-tokens", "8", "--diversity-prompts", "2", "--samples", "2",
        "--device", "cpu"]


def test_same_model_is_healthy(tiny_path, tmp_path):
    out = tmp_path / "diag"
    cmd = [KEEL, "diagnose", "--base", tiny_path, "--tuned", tiny_path, *FAST, "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.startswith("verdict: healthy:")

    report = json.loads((out / "diagnosis.json").read_text())
    assert report["verdict"]["verdict"] == "healthy" and report["verdict"]["mitigations"] == []
    assert abs(report["verdict"]["signals"]["ppl_rise"]) < 1e-9  # same weights, same data: the same perplexity
    assert report["base"]["perplexity"] == report["tuned"]["perplexity"]
    assert report["base"]["perplexity"]["examples"] == 4 and report["base"]["probe"]["items"] == 4
    assert report["base"]["probe"]["zero_shot_correct"] == report["tuned"]["probe"]["zero_shot_correct"]
    assert report["base"]["diversity"]["distinct_2"] == report["tuned"]["diversity"]["distinct_2"]
    assert report["base"]["diversity"]["n_texts"] == 4 and not report["verdict"]["mode_collapse"]["flag"]
    assert report["thresholds"]["ppl_rise"] == 0.1 and report["config"]["shots"] == 2
    assert "## Verdict: healthy" in (out / "diagnosis.md").read_text()


def _perturbed_copy(src: str, dst: Path, scale: float = 0.1) -> str:
    """Save the tiny model with N(0, scale^2) noise added to every weight (seeded), and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return str(dst)


def test_perturbed_model_is_on_the_forgetting_side(tiny_path, tmp_path, capsys):
    from keel.cli.diagnose import main

    tuned = _perturbed_copy(tiny_path, tmp_path / "perturbed")
    out = tmp_path / "diag"
    main(["--base", tiny_path, "--tuned", tuned, *FAST, "--out", str(out)])
    printed = capsys.readouterr().out

    report = json.loads((out / "diagnosis.json").read_text())
    verdict = report["verdict"]
    assert verdict["side"] == "forgetting"
    assert verdict["signals"]["ppl_spike"] and verdict["signals"]["ppl_rise"] > 1.0  # the noise more than doubles it
    assert report["tuned"]["perplexity"]["ppl"] > 2 * report["base"]["perplexity"]["ppl"]
    # the random-init base solves none of the probe, so the probe cannot confirm: perplexity alone decides
    assert verdict["verdict"] == "forgetting_risk"
    assert any("cannot show a capability loss" in n for n in verdict["notes"])
    assert "keel train mitigation=replay mitigation.replay.ratio=0.1" in printed
    assert printed.startswith("verdict: forgetting_risk (forgetting side):")


GREETINGS = ["Hi", "Hello", "Hey", "Good morning", "Good evening", "Greetings"]
INTROS = ["I am", "this is", "my name is", "it is me,"]
REPLY = "Hello! How can I help you today?"


def _greetings(path: Path, seed: int, n: int) -> str:
    """A 'pretraining' world for the base: varied greetings, each answered with the same reply (its capability)."""
    import random

    from keel.data.demo import _WORDS

    rng = random.Random(seed)
    rows = [{"messages": [{"role": "user", "content": f"{rng.choice(GREETINGS)}, {rng.choice(INTROS)} "
                                                      f"{rng.choice(_WORDS)}."},
                          {"role": "assistant", "content": REPLY}]} for _ in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _diagnose(tmp_path: Path, base: str, tuned: str, probe: str, name: str) -> dict:
    from keel.cli.diagnose import main

    out = tmp_path / name
    main(["--base", base, "--tuned", tuned, "--pretrain-data", probe, "--probe-data", probe, "--checker", "exact",
          "--limit", "32", "--shots", "2", "--max-new-tokens", "24", "--diversity-prompts", "2", "--samples", "2",
          "--device", "cpu", "--out", str(out)])
    return json.loads((out / "diagnosis.json").read_text())


def test_hard_fine_tune_is_catastrophic_forgetting_and_replay_is_healthy(tmp_path):
    """The seed's decision rules on real training: base = the tiny model trained on a greetings world (it answers
    every greeting with the reply); then a narrow arithmetic fine-tune at lr 1e-3 (100x the conservative range)
    with and without replaying the world. The held-out world set is both the pretraining-perplexity set and the
    probe."""
    world = _greetings(tmp_path / "world.jsonl", 0, 1000)
    heldout = _greetings(tmp_path / "heldout.jsonl", 1, 64)
    small = ("cluster.num_workers=1", "logger=none", "packing.max_len=256")
    base = keel_train(tmp_path / "base", *small, "trainer.max_steps=45", "trainer.lr=3e-3",
                      f"data.sources=[{{name:world,kind:file,path:{world},masking:all_tokens,num_examples:-1}}]")
    sft = (*small, f"model.path={base['hf_dir']}", "trainer.max_steps=30", "trainer.lr=1e-3",
           "data.sources=[{name:arithmetic,kind:demo,task:arithmetic,num_examples:1000}]")
    hard = keel_train(tmp_path / "hard", *sft)
    replay = keel_train(tmp_path / "replay", *sft, "mitigation=replay", "mitigation.replay.ratio=0.5",
                        f"mitigation.replay.source={{name:replay,kind:file,path:{world},masking:all_tokens,"
                        "num_examples:-1}")
    assert replay["tokens_per_source"]["replay"] > 0.4 * sum(replay["tokens_per_source"].values())

    forgot = _diagnose(tmp_path, base["hf_dir"], hard["hf_dir"], heldout, "hard")
    assert forgot["base"]["probe"]["zero_shot"] >= 0.9  # the base has the capability the probe measures
    assert forgot["verdict"]["verdict"] == "catastrophic_forgetting", forgot["verdict"]
    assert forgot["verdict"]["signals"]["ppl_rise"] > 1.0 and forgot["tuned"]["probe"]["zero_shot"] <= 0.1
    assert forgot["verdict"]["mitigations"][0]["name"] == "replay"

    kept = _diagnose(tmp_path, base["hf_dir"], replay["hf_dir"], heldout, "replay")
    assert kept["verdict"]["verdict"] == "healthy", kept["verdict"]
    assert abs(kept["verdict"]["signals"]["ppl_rise"]) < 0.05 and kept["tuned"]["probe"]["zero_shot"] >= 0.9
