"""`keel train` end to end: Ray Train + Ray Data + DeepSpeed ZeRO-3 on 2 CPU workers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from keel.cli.export import main as keel_export
from safetensors.torch import load_file
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
    # A checkpoint and an export at step 6 (test_exports_along_the_way_and_keel_export); progress lines on, as in
    # a default run (test_console_shows_keel_lines_only); a validation split with the best checkpoint kept
    # (test_validation_loss_and_the_best_checkpoint), so 4 checkpoints are kept for the export test's step 6.
    summary = keel_train(run_dir, "mix.T=2", "trainer.max_steps=12", "logger=wandb", "eval.every_n_steps=5",
                         "eval.passk.n=2", "eval.passk.k=[1,2]", "eval.passk.prompts=4", "eval.generations=2",
                         "trainer.checkpoint_every=6", "trainer.export_every=6", "trainer.progress=true",
                         "data.val_fraction=0.05", "trainer.save_best=true", "trainer.keep_checkpoints=4",
                         env=SECRETS, shared_ray=False)  # the quick start's path: Ray started by keel train
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


def _generates(model_dir) -> None:
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 3 + 4?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]


def test_hf_dir_loads_and_generates(run):
    _generates(run[1]["hf_dir"])


def _same_model(a: Path, b: Path) -> bool:
    """Same tensors, bit for bit, and the same config (bar use_cache, which training switches off)."""
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    ca, cb = (json.loads((d / "config.json").read_text()) for d in (a, b))
    ca.pop("use_cache"), cb.pop("use_cache")
    return ca == cb and wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_exports_along_the_way_and_keel_export(run, tmp_path):
    """trainer.export_every=6 wrote exports/step_000006/hf during the run; `keel export` (in this process, on
    the CPU, no Ray) turns the mid-run checkpoint of the 2 ZeRO-3 ranks into the same model, and the final
    checkpoint into the run's hf/; the export loads and generates."""
    run_dir, s = run
    along = run_dir / "exports" / "step_000006" / "hf"
    assert sorted(p.name for p in (run_dir / "exports").iterdir()) == ["step_000006"]  # step 12's model is hf/
    mid, final = tmp_path / "mid", tmp_path / "final"
    assert keel_export([str(run_dir / "checkpoints" / "step_000006"), "--out", str(mid)])["step"] == 6
    keel_export([str(run_dir / "checkpoints" / "step_000012"), "--out", str(final)])
    assert _same_model(mid, along) and _same_model(final, Path(s["hf_dir"]))
    assert not _same_model(mid, final)
    assert (mid / "generation_config.json").is_file() and (mid / "tokenizer.json").is_file()
    _generates(mid)


def test_console_shows_keel_lines_only(run):
    """The console: Keel's own lines (what runs where, data, a progress line per step, the summary) and each
    library warning once; the workers' output is in logs/. A default run (60 steps: 48 progress lines more than
    these 12) prints at most 20 KB."""
    run_dir, _ = run
    console = run_dir.with_name(run_dir.name + ".console").read_text()
    lines = console.splitlines()
    progress = [line for line in lines if line.startswith("step ")]
    assert [line.split()[1] for line in progress] == [f"{i}/12" for i in range(1, 13)]
    assert len(console.encode()) + 48 * max(len(line) + 1 for line in progress) <= 20_000, len(console.encode())
    for keel_line in ("launch: 2 Ray Train workers", "lr: warmup 5 steps, then cosine", "workers: ",
                      "export: step 6 -> ", "wandb: offline run in ", "Keel run summary"):
        assert keel_line in console, keel_line
    for noise in ("Running Dataset", "Failed to query Ray Train Controller", "(RayTrainWorker", "(TrainController",
                  "wandb: Tracking run"):
        assert noise not in console, noise
    library_warnings = [line for line in lines if line.startswith("warning: ") and "Warning: " in line]
    assert len(library_warnings) == len(set(library_warnings))
    logs = run_dir / "logs"
    assert "wandb: Tracking run" in (logs / "rank0.log").read_text() and (logs / "rank1.log").stat().st_size


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
