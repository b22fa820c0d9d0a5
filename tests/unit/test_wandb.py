"""W&B side of the run logger: namespaces, x-axes, grouping, tables, and the committed dashboard layout.

Most tests swap the ``wandb`` module for a recorder; one runs a real offline W&B run and reads its run file.
"""

from __future__ import annotations

import glob
import json
import re
import struct
import sys
import types
from pathlib import Path
from types import SimpleNamespace as NS

import pytest
from keel.tracking import dashboard
from keel.tracking.context import (
    GROUP_FILE,
    MIX_COLUMNS,
    REPORT_FILE,
    read_group,
    read_report,
    run_group,
    step_weights,
    write_run_context,
)
from keel.tracking.logger import GENERATIONS, RunLogger, mix_row, system_row
from keel.tracking.namespace import NAMESPACE, NAMESPACES, STEP, TOKENS_SEEN, wandb_key, wandb_row

ROOT = Path(__file__).resolve().parents[2]
SOURCES = {"arith": {"weight": 0.25, "example_share": 0.3, "examples": 3, "tokens": 120, "trained_tokens": 40,
                     "rejected": 1},
           "text": {"weight": 0.75, "example_share": 0.7, "examples": 7, "tokens": 880, "trained_tokens": 880,
                    "rejected": 0}}
SCHEDULE = {"segments": [
    {"steps": [0, 2], "weights": {"arith": 0.1, "text": 0.9}, "example_share": {"arith": 0.2, "text": 0.8},
     "token_share": {"arith": 0.1, "text": 0.9}},
    {"steps": [2, 4], "weights": {"arith": 0.6, "text": 0.4}, "example_share": {"arith": 0.5, "text": 0.5},
     "token_share": {"arith": 0.4, "text": 0.6}}]}


class FakeTable:
    def __init__(self, columns: list[str], data: list[list]) -> None:
        self.columns, self.data = columns, data


class FakeRun:
    """Records what the logger asks of a W&B run."""

    def __init__(self, **init: object) -> None:
        self.init, self.defines, self.rows, self.summary, self.finished = init, [], [], {}, False

    def define_metric(self, name: str, **kw: object) -> None:
        self.defines.append((name, kw))

    def log(self, row: dict) -> None:
        self.rows.append(row)

    def finish(self) -> None:
        self.finished = True


@pytest.fixture
def runs(monkeypatch) -> list[FakeRun]:
    """Every W&B run the code under test starts, through a fake ``wandb`` module."""
    started: list[FakeRun] = []

    def init(**kwargs: object) -> FakeRun:
        started.append(FakeRun(**kwargs))
        return started[-1]

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init, Table=FakeTable))
    for key in ("WANDB_RUN_GROUP", "SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "RAY_JOB_SUBMISSION_ID",
                "RAY_JOB_CONFIG_JSON_ENV_VAR", "RAY_ADDRESS"):
        monkeypatch.delenv(key, raising=False)
    return started


def cfg(logger: str = "wandb", mode: str = "offline", log_every: int = 1) -> NS:
    return NS(logger=NS(name=logger, project="keel", entity=None, mode=mode, log_every=log_every),
              trainer=NS(progress=False), model=NS(name="tiny"), mitigation=NS(enabled=["replay", "lora"]),
              mix=NS(name="temperature"), cluster=NS(address=None))


def loop_row(step: int, tokens: int = 100, split: tuple[int, int] = (25, 75)) -> dict:
    """A metrics row with exactly the keys ``keel.train.trainer`` logs (through ``keel.train.flops.step_metrics``)."""
    from keel.train.flops import step_metrics

    m = {"loss": 2.0 / step, "lr": 1e-3, "supervised_tokens": tokens // 2, "tokens": tokens,
         "packing_efficiency": 0.9, "grad_norm": 1.5}
    return {"step": step, **step_metrics(m, 0.5, 0.05, 1e12, None, 2),
            "data/tokens/arith": split[0], "data/tokens/text": split[1]}


def test_namespace_mapping():
    assert wandb_key("step") == STEP and wandb_key("loss") == "train/loss" and wandb_key("mfu") == "train/mfu"
    assert wandb_key("packing_efficiency") == "data/packing_efficiency"
    assert wandb_key("data_wait_share") == "data/wait_share"
    assert wandb_key("ewc_penalty") == "forgetting/ewc_penalty"
    assert wandb_key("data/tokens/text") == "data/tokens/text" and wandb_key("eval/acc") == "eval/acc"
    assert wandb_key("something_new") == "train/something_new"
    assert wandb_row({"step": 3, "mfu": None, "loss": 1.0}) == {STEP: 3, "train/loss": 1.0}
    assert {v.split("/")[0] for v in NAMESPACE.values()} <= set(NAMESPACES)


def test_every_flat_loop_key_has_a_namespace_entry():
    flat = [k for k in loop_row(1) if "/" not in k]
    assert sorted(k for k in flat if k not in NAMESPACE) == []


def test_metrics_jsonl_keeps_flat_keys_and_wandb_gets_namespaces(tmp_path, runs):
    logger = RunLogger(cfg(), tmp_path, {}, 2)
    row = loop_row(1)
    logger.log(dict(row))
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == row
    sent = runs[0].rows[-1]
    assert sent[STEP] == 1 and sent["train/loss"] == 2.0 and sent["data/packing_efficiency"] == 0.9
    assert sent["data/wait_s"] == 0.05 and "train/mfu" not in sent  # None on CPU: not sent
    assert not [k for k in sent if "/" not in k]
    assert sent["system/max_rss_gib"] > 0


def test_define_metric_step_axis_and_summaries(tmp_path, runs):
    RunLogger(cfg(), tmp_path, {}, 2)
    defines = dict(runs[0].defines)
    assert runs[0].defines[0] == (STEP, {}) and defines["*"] == {"step_metric": STEP}
    assert defines["train/loss"] == {"step_metric": STEP, "summary": "min,last"}
    assert defines["train/tokens_per_s"]["summary"].startswith("max")
    assert defines[TOKENS_SEEN] == {"step_metric": STEP, "summary": "max"}


def test_tokens_seen_accumulates_and_survives_resume(tmp_path, runs):
    first = RunLogger(cfg(), tmp_path, {}, 4)
    for step, tokens in ((1, 10), (2, 20), (3, 30)):
        first.log(loop_row(step, tokens))
    assert [r[TOKENS_SEEN] for r in runs[0].rows] == [10, 30, 60]
    # Restart from the checkpoint of step 2: step 3's line is dropped, the count goes on from steps 1-2.
    resumed = RunLogger(cfg(), tmp_path, {}, 4, start_step=2)
    assert resumed.tokens_seen == 30
    resumed.log(loop_row(3, 5))
    assert runs[1].rows[-1][TOKENS_SEEN] == 35
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_log_every_thins_wandb_rows_only(tmp_path, runs):
    logger = RunLogger(cfg(log_every=2), tmp_path, {}, 4)
    for step in range(1, 5):
        logger.log(loop_row(step, 10))
    assert [r[STEP] for r in runs[0].rows] == [2, 4] and runs[0].rows[0][TOKENS_SEEN] == 20
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 4


@pytest.mark.parametrize(("env", "ray_job", "group"), [
    ({"SLURM_JOB_ID": "4711", "RAY_JOB_SUBMISSION_ID": "raysubmit_x"}, None, "slurm-4711"),
    ({"SLURM_JOB_ID": "4712", "SLURM_ARRAY_JOB_ID": "4700"}, None, "slurm-4700"),
    ({"RAY_JOB_SUBMISSION_ID": "raysubmit_abc"}, "02000000", "ray-raysubmit_abc"),
    ({"RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps({"metadata": {"job_submission_id": "raysubmit_def"}})}, None,
     "ray-raysubmit_def"),
    ({}, "03000000", "ray-03000000"),
    ({"RAY_JOB_CONFIG_JSON_ENV_VAR": "not json"}, None, "2026-01-02_run"),
    ({}, None, "2026-01-02_run"),
    ({"WANDB_RUN_GROUP": "sweep-7", "SLURM_JOB_ID": "1"}, None, "sweep-7"),
])
def test_run_group(env, ray_job, group):
    assert run_group(Path("/x/2026-01-02_run"), env, ray_job) == group


def test_run_context_from_driver_to_logger(tmp_path, runs, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "99")
    report = {"sources": SOURCES, "packing_efficiency": 0.9}
    write_run_context(tmp_path, cfg(), report)
    assert read_report(tmp_path) == report and read_group(tmp_path) == "slurm-99"
    monkeypatch.setenv("SLURM_JOB_ID", "100")  # a later start of the same run keeps its group
    write_run_context(tmp_path, cfg(), report)
    assert (tmp_path / GROUP_FILE).read_text() == "slurm-99"
    RunLogger(cfg(), tmp_path, {"a": 1}, 2)
    init = runs[0].init
    assert init["group"] == "slurm-99" and init["job_type"] == "sft" and init["resume"] == "allow"
    assert init["tags"] == ["model:tiny", "mitigation:replay", "mitigation:lora", "mix:temperature"]
    assert init["id"] == (tmp_path / "wandb_id.txt").read_text() and init["name"] == tmp_path.name


def test_logger_without_driver_context_groups_by_environment(tmp_path, runs, monkeypatch):
    monkeypatch.setenv("RAY_JOB_SUBMISSION_ID", "raysubmit_q")
    RunLogger(cfg(), tmp_path, {}, 1)
    assert runs[0].init["group"] == "ray-raysubmit_q" and read_report(tmp_path) == {}


def test_mixture_table_logged_once_per_wandb_run(tmp_path, runs):
    (tmp_path / REPORT_FILE).write_text(json.dumps({"sources": SOURCES}))
    RunLogger(cfg(), tmp_path, {}, 4)
    (row,) = runs[0].rows
    table = row["mix/realised"]
    assert row[STEP] == 0 and table.columns == list(MIX_COLUMNS) and "mix/schedule" not in row
    assert table.data == [["arith", 0.25, 0.3, 3, 120, 40, 1], ["text", 0.75, 0.7, 7, 880, 880, 0]]
    RunLogger(cfg(), tmp_path, {}, 4, start_step=0)  # a restart resumes the same W&B run: no second table
    assert runs[1].init["id"] == runs[0].init["id"] and runs[1].rows == []


def test_schedule_table_and_scheduled_weights(tmp_path, runs):
    (tmp_path / REPORT_FILE).write_text(json.dumps({"sources": SOURCES, "schedule": SCHEDULE}))
    logger = RunLogger(cfg(), tmp_path, {}, 4)
    schedule = runs[0].rows[0]["mix/schedule"]
    assert schedule.data[:2] == [[0, 2, "arith", 0.1, 0.2, 0.1], [0, 2, "text", 0.9, 0.8, 0.9]]
    assert len(schedule.data) == 4
    logger.log(loop_row(2))  # step 2 = 0-based step 1: first segment
    logger.log(loop_row(3, split=(60, 40)))  # 0-based step 2: second segment
    first, second = runs[0].rows[1:]
    assert first["mix/weight/arith"] == 0.1 and second["mix/weight/arith"] == 0.6
    assert second["mix/share/arith"] == pytest.approx(0.6) and second["mix/share/text"] == pytest.approx(0.4)


def test_mix_row_fixed_mixture_and_empty_step():
    report = {"sources": SOURCES}
    assert step_weights(report, 7) == {"arith": 0.25, "text": 0.75}
    assert mix_row({"step": 1, "data/tokens/arith": 0, "data/tokens/text": 0}, report) == {
        "mix/weight/arith": 0.25, "mix/weight/text": 0.75}
    assert mix_row({"step": 1}, {}) == {}


def test_system_row_reports_gpu_memory_once_cuda_is_in_use(monkeypatch):
    gib = 2**30
    cuda = NS(is_available=lambda: True, is_initialized=lambda: True, memory_allocated=lambda: 2 * gib,
              max_memory_allocated=lambda: 3 * gib, memory_reserved=lambda: 4 * gib)
    monkeypatch.setitem(sys.modules, "torch", NS(cuda=cuda))
    row = system_row()
    assert row["system/gpu_mem_allocated_gib"] == 2 and row["system/gpu_max_mem_allocated_gib"] == 3
    assert row["system/gpu_mem_reserved_gib"] == 4 and row["system/max_rss_gib"] > 0
    cuda.is_initialized = lambda: False  # CPU training: host memory only
    assert list(system_row()) == ["system/max_rss_gib"]


def test_log_generations(tmp_path, runs):
    logger = RunLogger(cfg(), tmp_path, {}, 8)
    logger.log_generations(4, [{"prompt": "2+2?", "completion": "4", "score": 1.0},
                               {"prompt": "hi", "completion": "hello"}])
    logger.log_generations(8, [{"prompt": "3+3?", "completion": "7", "score": 0.0}])
    lines = [json.loads(line) for line in (tmp_path / GENERATIONS).read_text().splitlines()]
    assert lines[1] == {"step": 4, "prompt": "hi", "completion": "hello", "score": None} and len(lines) == 3
    row = runs[0].rows[0]
    assert row[STEP] == 4 and row["eval/generations"].columns == ["step", "prompt", "completion", "score"]
    assert row["eval/generations"].data == [[4, "2+2?", "4", 1.0], [4, "hi", "hello", None]]
    RunLogger(cfg(), tmp_path, {}, 8, start_step=4)  # work after the step-4 checkpoint is dropped
    assert [json.loads(line)["step"] for line in (tmp_path / GENERATIONS).read_text().splitlines()] == [4, 4]


EVAL_ROW = {"step": 2, "forgetting/ppl": 3.5, "forgetting/ppl_rise": 0.1, "eval/pass@1": 0.25,
            "eval/diversity/distinct_2": 0.9, "eval/seconds": 1.0}


def test_log_eval(tmp_path, runs):
    logger = RunLogger(cfg(), tmp_path, {}, 8)
    logger.log_eval({**EVAL_ROW, "step": 0}, [])
    logger.log_eval(EVAL_ROW, [{"prompt": "p", "completion": "c", "score": True}])
    rows = runs[0].rows
    assert rows[1] == {STEP: 2, **{k: v for k, v in EVAL_ROW.items() if k != "step"}}
    assert rows[2]["eval/generations"].data == [[2, "p", "c", True]]
    assert [json.loads(line)["step"] for line in (tmp_path / "eval.jsonl").read_text().splitlines()] == [0, 2]
    resumed = RunLogger(cfg(), tmp_path, {}, 8, start_step=1)  # evaluations after the checkpoint are dropped
    assert [r["step"] for r in resumed.eval_history] == [0]


def test_logger_none_writes_files_only(tmp_path, runs):
    logger = RunLogger(cfg(logger="none"), tmp_path, {}, 1)
    logger.log(loop_row(1))
    logger.log_generations(1, [{"prompt": "p", "completion": "c", "score": 0.5}])
    logger.finish(logger.totals())
    assert runs == [] and (tmp_path / GENERATIONS).is_file()


def emitted_keys(tmp_path: Path, runs: list[FakeRun]) -> set[str]:
    """Every W&B name a logger session sends (loop rows, tables, generations), plus each NAMESPACE target."""
    (tmp_path / REPORT_FILE).write_text(json.dumps({"sources": SOURCES, "schedule": SCHEDULE}))
    logger = RunLogger(cfg(), tmp_path, {}, 2)
    row = loop_row(1)
    row["mfu"] = 0.4  # set on GPU
    logger.log(row)
    logger.log_generations(1, [{"prompt": "p", "completion": "c", "score": 1.0}])
    logger.log_eval(EVAL_ROW, [])
    return {k for r in runs[0].rows for k in r} | set(NAMESPACE.values())


def test_dashboard_panels_show_metrics_the_logger_emits(tmp_path, runs):
    emitted = emitted_keys(tmp_path, runs)
    spec = dashboard.layout()
    assert spec["x_axis"] == STEP and TOKENS_SEEN in emitted
    panels = [p for s in spec["sections"] for p in s["panels"]]
    for p in panels:
        if p["kind"] == "table":
            assert p["key"] in emitted, p
            continue
        assert p["x"] in emitted, p
        if "regex" in p:
            assert p["regex"].split("/")[0] in NAMESPACES
            assert any(re.fullmatch(p["regex"], k) for k in emitted), p
        else:
            assert p["y"] and set(p["y"]) <= emitted, p
    assert [s["name"] for s in spec["sections"]] == ["Training", "Throughput", "Data", "Forgetting", "Eval", "System"]


def test_committed_dashboard_json_is_up_to_date():
    committed = (ROOT / "docs" / "wandb_dashboard.json").read_text()
    regenerate = "python -m keel.tracking.dashboard --json docs/wandb_dashboard.json"
    assert committed == dashboard.to_json(), f"stale: {regenerate}"


def test_dashboard_cli_json(tmp_path, capsys):
    assert dashboard.main(["--json", str(tmp_path / "d.json")]) == 0
    assert json.loads((tmp_path / "d.json").read_text()) == dashboard.layout()
    assert dashboard.main(["--json", "-"]) == 0 and json.loads(capsys.readouterr().out) == dashboard.layout()


def test_dashboard_cli_explains_missing_package(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb_workspaces", None)
    assert dashboard.main(["--entity", "e", "--project", "p"]) == 2
    assert "pip install 'keel-sft[wandb]'" in capsys.readouterr().err


def test_dashboard_cli_explains_missing_api_key(tmp_path, monkeypatch, capsys):
    pytest.importorskip("wandb_workspaces")
    for key in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    assert dashboard.main(["--entity", "e", "--project", "p"]) == 2
    assert "no W&B API key" in capsys.readouterr().err


def test_dashboard_builds_a_workspace_view():
    pytest.importorskip("wandb_workspaces")
    view = dashboard.workspace("ent", "proj")._to_model()  # what save() sends, built without the network
    sections = view.spec.section.panel_bank_config.sections
    spec = dashboard.layout()
    assert [s.name for s in sections] == [s["name"] for s in spec["sections"]]
    assert [len(s.panels) for s in sections] == [len(s["panels"]) for s in spec["sections"]]
    assert view.spec.section.settings.x_axis == STEP
    data = next(s for s in sections if s.name == "Data")
    assert data.panels[0].config.metric_regex == "mix/share/.*" and data.panels[0].config.use_metric_regex
    assert dashboard.report("ent", "proj").title == dashboard.TITLE


def _wandb_records(path: Path) -> list:
    """The protobuf records of an offline ``run-<id>.wandb`` file (a LevelDB-style log of 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw, pos, parts, records = path.read_bytes(), 7, b"", []
    while pos + 7 <= len(raw):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if length == 0 and kind == 0:  # block padding
            pos += left
            continue
        parts = raw[pos + 7:pos + 7 + length] if kind in (1, 2) else parts + raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            records.append(pb.Record.FromString(parts))
    return records


def test_real_offline_wandb_run(tmp_path, monkeypatch):
    """One real offline run: group, job type, tags, x-axis, summaries, namespaced history, tables on disk."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("SLURM_JOB_ID", "5150")
    for key in ("WANDB_RUN_GROUP", "SLURM_ARRAY_JOB_ID"):
        monkeypatch.delenv(key, raising=False)
    write_run_context(tmp_path, cfg(), {"sources": SOURCES})
    logger = RunLogger(cfg(mode="offline"), tmp_path, {"trainer": {"lr": 1e-3}}, 2)
    logger.log(loop_row(1, 100))
    logger.log(loop_row(2, 50))
    logger.log_generations(2, [{"prompt": "p", "completion": "c", "score": 1.0}])
    logger.finish(logger.totals())
    (offline,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    records = _wandb_records(next(Path(offline).glob("run-*.wandb")))
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.run_group == "slurm-5150" and run.job_type == "sft" and "model:tiny" in run.tags
    metrics = {r.metric.name or r.metric.glob_name: r.metric for r in records
               if r.WhichOneof("record_type") == "metric"}
    assert metrics["*"].step_metric == STEP and metrics["train/loss"].summary.min
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item} for r in records
               if r.WhichOneof("record_type") == "history"]
    steps = [h for h in history if "train/loss" in h]
    assert [h[TOKENS_SEEN] for h in steps] == [100, 150] and steps[0]["mix/share/arith"] == 0.25
    media = Path(offline) / "files" / "media" / "table"
    assert list(media.glob("mix/realised_*.table.json")) and list(media.glob("eval/generations_*.table.json"))
