"""README's "Fine-tune your model on your data", run as written (tiny model, a small local file), and
data=chat_mix on the shared local files of each of its formats."""

from __future__ import annotations

import json
import math
import re
import shlex
from pathlib import Path

import pytest
from keel.cli.train import argv

from tests.conftest import compose

from .conftest import keel_train

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "data"
SECTION = "## Fine-tune your model on your data"


def _readme_section() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index(SECTION)
    return text[start:text.index("\n## ", start + len(SECTION))]


def _blocks(section: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", section, re.S)


def test_the_readme_section_runs(tmp_path):
    """The experiment file and the command of the README, with model=tiny and 120 local chats: one epoch
    count sizes the run, every row is read, val/loss is logged, the best checkpoint is kept."""
    section = _readme_section()
    (experiment,) = _blocks(section, "yaml")
    assert experiment.startswith("# @package _global_\n") and "path: data/my_chats.jsonl" in experiment
    target = tmp_path / re.search(r"`(my_conf/experiment/\w+\.yaml)`", section).group(1)
    target.parent.mkdir(parents=True)
    target.write_text(experiment)
    (tmp_path / "data").mkdir()
    rows = [{"messages": [{"role": "user", "content": f"Name a number after {i}."},
                          {"role": "assistant", "content": f"{i + 1} comes after {i}."}]} for i in range(120)]
    (tmp_path / "data" / "my_chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    commands = [shlex.split(line) for block in _blocks(section, "bash") for line in block.splitlines()]
    train = next(c for c in commands if c[:2] == ["keel", "train"])
    sbatch = next(c for c in commands if c[0] == "sbatch")
    assert sbatch[:2] == ["sbatch", "slurm/sft.sh"] and sbatch[2:] == train[2:]
    # slurm/sft.sh runs `keel train cluster=slurm hydra.run.dir=... trainer.resume=auto "$@"`
    assert argv(["cluster=slurm", "hydra.run.dir=x", "trainer.resume=auto", *sbatch[2:]])[:2] == train[2:4]

    run = tmp_path / "run"
    s = keel_train(run, *train[2:], "model=tiny", "logger=none", "trainer.save_hf=false")
    report = json.loads((run / "data_report.json").read_text())
    mine = report["sources"]["my_chats"]
    assert mine["rows_read"] == 120 and mine["available"] + mine["val_examples"] == 120
    assert report["length"]["epochs_asked"] == 2 and abs(report["length"]["epochs"] - 2) <= 0.2
    assert s["steps"] == report["length"]["steps"]
    evals = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert evals[-1]["step"] == s["steps"] and math.isfinite(evals[-1]["val/loss"])
    assert s["best_step"] == s["steps"] and s["best_val_loss"] == evals[-1]["val/loss"]
    assert (run / "checkpoints" / "best").resolve().name == f"step_{s['steps']:06d}"


def test_chat_mix_on_local_files_of_each_format(tmp_path, capsys):
    """data=chat_mix as shipped, each hub path pointed at the shared file of its format (code: the alpaca
    rows under Magicoder's column names; chat: the ShareGPT chats as UltraChat's messages): every row is
    read and every source gives examples."""
    if not SHARED.is_dir():
        pytest.skip("../shared/data is not here")
    from keel.launch import prepare
    from keel.mitigation import configured

    alpaca = json.loads((SHARED / "sft" / "alpaca_en_demo.json").read_text())
    code = tmp_path / "magicoder.jsonl"
    code.write_text("".join(json.dumps({"problem": r["instruction"] + ("\n" + r["input"] if r["input"] else ""),
                                        "solution": r["output"], "lang": "text"}) + "\n" for r in alpaca))
    chats = json.loads((SHARED / "sft" / "sharegpt_dummy_conversation.json").read_text())
    roles = {"human": "user", "gpt": "assistant"}
    chat = tmp_path / "ultrachat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": roles[t["from"]], "content": t["value"]}
                                                     for t in c["conversations"]]}) + "\n" for c in chats))
    local = [chat, SHARED / "sft" / "gsm8k_train.jsonl", code, SHARED / "sft" / "glaive_toolcall_en_demo.json",
             SHARED / "pretrain" / "c4_demo.jsonl"]
    # the tiny model's tokenizer (trained on demo text) spends many tokens on real text: room for its longest
    # rows, and the first 1000 of GSM8K's 7473 (tokenizing all of them would take most of this test's time)
    overrides = ["data=chat_mix", "mix.T=2", "trainer.max_steps=2", "packing.max_len=2048", "data.sources.1.cap=1000",
                 *(f"data.sources.{i}.path={p}" for i, p in enumerate(local))]
    cfg = compose(*overrides)
    _, _, plan = prepare.prepare_data(cfg, tmp_path, configured(cfg))
    sources = plan.report["sources"]
    assert {k: s["rows_read"] for k, s in sources.items() if k != "math"} == {"chat": 500, "code": 999, "tools": 300,
                                                                             "replay": 300}
    assert sources["math"]["available"] == 1000
    for name, s in sources.items():
        assert s["available"] > 0.8 * s["rows_read"] and s["examples"] > 0, (name, s)
    rejects = [json.loads(line) for line in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert all(r["reason"].startswith("over-length") for r in rejects)  # every format is read, none misparsed
    assert sources["replay"]["trained_tokens"] >= sources["replay"]["tokens"] - sources["replay"]["examples"]
