"""`keel eval passk` end to end on the tiny model: a subprocess, a JSON report, sane numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

KEEL = str(Path(sys.executable).with_name("keel"))

ROWS = [
    {"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"},
    {"question": "What is 4 * 2?", "answer": "4 * 2 = 8\n#### 8"},
    {"question": "What is 9 - 1?", "answer": "9 - 1 = 8\n#### 8"},
    {"question": "What is 10 / 2?", "answer": "10 / 2 = 5\n#### 5"},
]


def test_passk_cli_writes_report(tiny_path, tmp_path):
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = tmp_path / "tmp" / "report.json"
    cmd = [KEEL, "eval", "passk", "--model", tiny_path, "--data", str(data), "--n", "4", "--k", "1,2,4",
           "--max-new-tokens", "16", "--out", str(out)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert elapsed < 60, f"keel eval passk took {elapsed:.1f}s"
    assert "VIABLE" in proc.stdout  # the verdict is printed (VIABLE or NOT VIABLE)

    report = json.loads(out.read_text())  # strict JSON: json.loads would accept NaN, so check below
    assert "NaN" not in out.read_text()
    assert set(report) >= {"config", "pass_at_k", "per_prompt", "examples", "diversity", "verdict", "pass1"}
    assert report["config"]["n"] == 4 and report["config"]["k"] == [1, 2, 4]
    assert report["per_prompt"] == [{"n": 4, "c": p["c"], "could_not_run": 0} for p in report["per_prompt"]]
    assert report["could_not_run"] == {"total": 0, "by_reason": {}}  # the math checker runs no code
    assert all(0 <= p["c"] <= 4 for p in report["per_prompt"]) and len(report["per_prompt"]) == 4

    means = [report["pass_at_k"][k]["mean"] for k in ("1", "2", "4")]
    assert all(0.0 <= m <= 1.0 for m in means)
    assert means == sorted(means), f"pass@k must not fall as k grows: {means}"
    for v in report["pass_at_k"].values():
        assert 0.0 <= v["ci_low"] <= v["mean"] <= v["ci_high"] <= 1.0

    assert len(report["examples"]) == 3
    assert all(len(e["completions"]) == 4 for e in report["examples"])
    assert report["examples"][0]["reference"] == ROWS[0]["answer"]
    div = report["diversity"]
    assert div["n_texts"] == 16 and 0.0 <= div["distinct_2"] <= 1.0
    assert div["mean_entropy"] is not None and div["mean_entropy"] > 0.0


def test_passk_cli_user_error_is_one_line(tiny_path, tmp_path):
    data = tmp_path / "plain.jsonl"
    data.write_text(json.dumps({"text": "no prompts here"}) + "\n")
    cmd = [KEEL, "eval", "passk", "--model", tiny_path, "--data", str(data), "--n", "2", "--k", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode != 0
    assert "no usable prompts" in proc.stderr and "Traceback" not in proc.stderr
