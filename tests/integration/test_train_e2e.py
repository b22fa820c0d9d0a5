"""`keel train` end to end: Ray Train + Ray Data + DeepSpeed ZeRO-3 on 2 CPU workers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .conftest import keel_train

pytestmark = pytest.mark.integration

# Fake, distinctive secrets set for the run: any occurrence in an output is a leak.
SECRETS = {"WANDB_API_KEY": "keelfakewandbkey" + "0123456789abcdef0123456789abcdef",
           "HF_TOKEN": "hf_keelFakeToken0123456789abcdefXYZ"}


def leaks(run_dir: Path) -> list[str]:
    """Every file under the run directory (W&B offline files included) that holds a secret, binary-safe."""
    needles = [s.encode() for s in SECRETS.values()]
    found = []
    for path in sorted(p for p in run_dir.rglob("*") if p.is_file() and not p.is_symlink()):
        data = path.read_bytes()
        found += [f"{path.relative_to(run_dir)}: {n.decode()[:8]}..." for n in needles if n in data]
    return found


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("e2e") / "run"
    # Fake secrets in the environment: none may reach the run dir or the console (test_no_secret_leaks).
    summary = keel_train(run_dir, "mix.T=2", "trainer.max_steps=12", "logger=wandb", "eval.every_n_steps=5",
                         "eval.passk.n=2", "eval.passk.k=[1,2]", "eval.passk.prompts=4", "eval.generations=2",
                         "data.val_fraction=0.05", "trainer.save_best=true", env=SECRETS)
    return run_dir, summary


def test_no_secret_leaks(run):
    run_dir, _ = run
    assert list((run_dir / "wandb").glob("offline-run-*")), "the W&B offline run was not written"
    assert leaks(run_dir) == []
    console = run_dir.with_name(run_dir.name + ".console").read_text()
    assert not [name for name, value in SECRETS.items() if value in console], "a secret was printed"


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


def test_in_training_eval(run):
    """eval.every_n_steps=5 on 2 ZeRO-3 workers: evaluations at 0, 5, 10 and the last step, in W&B too."""
    run_dir, s = run
    rows = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 5, 10, 12] and s["eval"] == rows[-1]
    for r in rows:
        assert 0 <= r["eval/pass@1"] <= r["eval/pass@2"] <= 1 and 0 <= r["eval/diversity/distinct_2"] <= 1
        assert r["forgetting/tokens"] == rows[0]["forgetting/tokens"] > 1000  # 32 held-out paragraphs, all ranks
    assert rows[0]["forgetting/ppl_rise"] == 0 and rows[-1]["forgetting/ppl"] < rows[0]["forgetting/ppl"]
    gens = [json.loads(line) for line in (run_dir / "generations.jsonl").read_text().splitlines()]
    assert [g["step"] for g in gens] == [0, 0, 5, 5, 10, 10, 12, 12]
    wandb_file = next((run_dir / "wandb").glob("offline-run-*/run-*.wandb")).read_bytes()
    assert b"forgetting/ppl_rise" in wandb_file and b"eval/generations" in wandb_file


def test_hf_dir_loads_and_generates(run):
    _, s = run
    tok = AutoTokenizer.from_pretrained(s["hf_dir"])
    model = AutoModelForCausalLM.from_pretrained(s["hf_dir"], dtype=torch.float32).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 3 + 4?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]


def test_validation_loss_and_the_best_checkpoint(run):
    """data.val_fraction=0.05: val/loss overall and per source at every evaluation (eval.jsonl and W&B, all
    ranks together), best_step and best_val_loss in summary.json, and checkpoints/best holding that step."""
    from keel.train import checkpoint as ckpt

    run_dir, s = run
    rows = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    names = ("arithmetic", "strings", "text")
    for r in rows:
        assert r["val/tokens"] > 0 and all(r[f"val/loss/{n}"] > 0 for n in names)
        assert min(r[f"val/loss/{n}"] for n in names) <= r["val/loss"] <= max(r[f"val/loss/{n}"] for n in names)
    assert rows[-1]["val/loss"] < rows[0]["val/loss"] - 1.0
    best = min(rows[1:], key=lambda r: r["val/loss"])  # step 0 is the baseline, not a checkpoint
    assert (s["best_step"], s["best_val_loss"], s["early_stopped"]) == (best["step"], best["val/loss"], False)
    kept = ckpt.best(run_dir)
    assert kept in ckpt.complete(run_dir) and ckpt.state(kept)["step"] == s["best_step"]
    report = json.loads((run_dir / "data_report.json").read_text())
    assert all(report["sources"][n]["val_examples"] == report["validation"]["sources"][n]["examples"] > 0
               for n in names)
    wandb_file = next((run_dir / "wandb").glob("offline-run-*/run-*.wandb")).read_bytes()
    assert b"val/loss/arithmetic" in wandb_file
