"""`keel preprocess` (Ray Data, out of memory) gives exactly the rows, report and rejects of the in-memory
data path, and `keel train data.preprocessed=DIR` trains on exactly those rows; inspect and preprocess work
on every shared SFT file with format=auto."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from keel.data.parquet_rows import VAL_SHARD, read_rows
from keel.launch import prepare
from keel.mitigation import configured
from keel.train import checkpoint as ckpt
from keel.train import resume

from tests.conftest import compose

from .conftest import KEEL, keel_env, keel_train

pytestmark = pytest.mark.integration

SHARED = Path(__file__).resolve().parents[2].parent / "shared/data/sft"


def _preprocess(out: Path, overrides: list[str]) -> dict:
    env = keel_env()
    cmd = [KEEL, "preprocess", "--out", str(out), "--procs", "2", *overrides]
    done = subprocess.run(cmd, cwd=out.parent, env=env, capture_output=True, text=True, timeout=600)
    out.with_name(out.name + ".console").write_text(done.stdout + done.stderr)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return json.loads((out / "report.json").read_text())


def _messy_file(path: Path) -> None:
    """Good chats, a long multi-turn chat (split at turns), and rows that must be rejected with a reason."""
    good = [{"messages": [{"role": "user", "content": f"what is {i} + {i}?"},
                          {"role": "assistant", "content": f"{2 * i}"}]} for i in range(40)]
    long_chat = {"messages": [m for i in range(30) for m in (
        {"role": "user", "content": f"turn {i}: " + "tell me more " * 6},
        {"role": "assistant", "content": "here is more " * 6})]}
    lines = [json.dumps(r) for r in good[:20]] + ['{"messages": [{"role": "user", "content": "cut off']
    lines += [json.dumps({"messages": [{"role": "user", "content": 3}]}), json.dumps(long_chat)]
    lines += [json.dumps({"messages": [{"role": "user", "content": "no answer"}]}), "[1, 2]"]
    lines += [json.dumps(r) for r in good[20:]]
    path.write_text("\n".join(lines) + "\n")


def test_preprocess_equals_the_in_memory_path_and_trains_the_same_rows(tmp_path):
    messy = tmp_path / "messy.jsonl"
    _messy_file(messy)
    held = tmp_path / "held.jsonl"  # the strings source's own validation rows, one of them rejected
    held.write_text('{"messages": [{"role": "user", "content": "reverse abc"}, {"role": "assistant", '
                    '"content": "cba"}]}\n[1]\n')
    overrides = ["trainer.max_steps=null", "trainer.epochs=0.1", "cluster.num_workers=1", "packing.max_len=256",
                 "data.overlength=split", "mitigation=replay", "mitigation.replay.source.num_examples=50",
                 "data.val_fraction=0.2",
                 f"data.sources=[{{name: arith, kind: demo, task: arithmetic, num_examples: 300}}, "
                 f"{{name: messy, kind: file, path: '{messy}', num_examples: -1}}, "
                 f"{{name: strings, kind: demo, task: strings, num_examples: 200, cap: 120, val_path: '{held}'}}]"]
    out = tmp_path / "pre"
    report = _preprocess(out, overrides)

    cfg = compose(*overrides)
    plugins = configured(cfg)
    direct = tmp_path / "direct"
    direct.mkdir()
    _, tokenizer, plan = prepare.prepare_data(cfg, direct, plugins)
    rows = read_rows(out, report["shards"], report["rows"], cfg.packing.max_len)
    for k in ("input_ids", "targets", "position_ids", "source_ids"):
        assert np.array_equal(rows[k], getattr(plan, k)), k
    val = read_rows(out, report["val_shards"], plan.val.input_ids.shape[0], cfg.packing.max_len, name=VAL_SHARD)
    for k in ("input_ids", "targets", "position_ids", "source_ids", "seq_lens"):
        assert np.array_equal(val[k], getattr(plan.val, k)), k
    assert report["sources"]["arith"]["val_examples"] > 0 and report["sources"]["strings"]["val_examples"] == 1
    direct_report = {k: v for k, v in plan.report.items() if k != "replay_token_share"}  # added by the train checks
    assert report["data_report"] == json.loads(json.dumps(direct_report))
    assert report["source_names"] == ["arith", "messy", "strings", "replay"]
    assert (out / "rejects.jsonl").read_text() == (direct / "rejects.jsonl").read_text()
    messy_stats = report["sources"]["messy"]
    assert messy_stats["rows_read"] == 45 and messy_stats["rejected"] == 4 and report["data_report"]["sources"][
        "messy"]["split"] == 1
    assert sum(report["rejects_by_reason"]["messy"].values()) == 4
    assert report["val_rejects_by_reason"]["strings"] and report["data_report"]["validation"]["sources"]["strings"][
        "rejected"] == 1
    assert report["sources"]["strings"]["examples"] == 120  # the cap: unread rows are neither kept nor rejected

    run = tmp_path / "run"
    steps = report["data_report"]["length"]["steps"]  # trainer.epochs: planned alike in both paths
    assert steps == cfg.trainer.max_steps and 2 <= steps <= 8 and abs(report["data_report"]["length"]["epochs"]
                                                                     - 0.1) < 0.05
    s = keel_train(run, *overrides, f"data.preprocessed={out}", "logger=none", "trainer.save_hf=false")
    assert s["steps"] == steps and s["tokens_per_source"] == {k: v["tokens"] for k, v in plan.report["sources"].items()}
    assert s["best_step"] == steps and s["best_val_loss"] > 0  # validated at the end, on the directory's rows
    saved = ckpt.state(ckpt.complete(run)[-1])
    assert saved["data_fingerprint"] == resume.run_meta(cfg, plan, tokenizer)["data_fingerprint"]
    assert (run / "rejects.jsonl").read_text() == (out / "rejects.jsonl").read_text()


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data/sft is not here")
def test_inspect_and_preprocess_every_shared_sft_file(tmp_path, capsys):
    from keel.cli import inspect

    files = sorted(SHARED.glob("*.json*"))
    assert files
    for f in files:
        inspect.main(["--n", "1", "--no-color", "--file", str(f), "--out", str(tmp_path / f.stem)])
        stats = json.loads((tmp_path / f.stem / "inspect.json").read_text())["sources"][0]
        assert stats["examples"] > 0 and stats["format"] != "auto (no known format found)", (f, stats["format"])
        assert stats["examples"] + stats["rejected"] == stats["rows_read"]  # nothing lost
    capsys.readouterr()
    sources = ", ".join(f"{{name: s{i}, kind: file, path: '{f}', num_examples: -1}}" for i, f in enumerate(files))
    report = _preprocess(tmp_path / "pre", ["trainer.max_steps=2", "cluster.num_workers=1", "template=chatml",
                                            f"data.sources=[{sources}]"])
    for i, f in enumerate(files):
        s = report["sources"][f"s{i}"]
        assert s["examples"] > 0 and s["rejected"] == sum(report["rejects_by_reason"][f"s{i}"].values()), f
        assert s["examples"] + s["rejected"] == s["rows_read"], f  # nothing lost
        assert s["format"] == json.loads((tmp_path / f.stem / "inspect.json").read_text())["sources"][0]["format"]
    lines = (tmp_path / "pre" / "rejects.jsonl").read_text().splitlines()
    assert len(lines) == sum(s["rejected"] for s in report["sources"].values())
    assert report["rows"] == 2 * 2 and 0.9 < report["packing_efficiency"] <= 1
