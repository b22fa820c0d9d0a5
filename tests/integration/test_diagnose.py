"""`keel diagnose` on the tiny model: a model against itself is healthy; a strongly perturbed copy forgets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
