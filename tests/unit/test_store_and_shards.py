"""Out-of-memory pieces of the data path: token columns, reject sinks, Parquet row shards, and the
checks of training from a preprocessed directory."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
from keel.config import to_plain
from keel.data import pipeline
from keel.data import preprocessed_dir as preprocessed
from keel.data.disk_columns import Column, RejectSink
from keel.data.parquet_rows import read_rows, write_shard

from tests.conftest import compose


def test_column_appends_and_reads_back_exactly(tmp_path):
    rng = np.random.default_rng(0)
    arrays = [rng.integers(-100, 50_000, size=n).astype(np.int32) for n in (3, 0, 17, 1, 512)]
    col = Column(tmp_path / "c")
    for a in arrays:
        col.append(a)
    assert np.array_equal(col[2], arrays[2])  # readable while still being written
    col.close()
    for c in (Column.open(tmp_path / "c"), pickle.loads(pickle.dumps(col))):
        assert len(c) == 5 and c.lengths().tolist() == [3, 0, 17, 1, 512]
        assert all(np.array_equal(x, a) for x, a in zip(c, arrays))
        assert np.array_equal(c[-1], arrays[-1])
        with pytest.raises(IndexError):
            c[5]
        with pytest.raises(TypeError):
            c[0] = arrays[0]


def test_reject_sink_streams_rows_and_counts_reasons(tmp_path):
    sink = RejectSink(tmp_path / "rejects.jsonl")
    for n in (700, 900):
        sink.append({"source": "a", "row": n, "reason": f"over-length: {n} tokens", "data": {"x": n}})
    sink.append({"source": "b", "row": 1, "reason": "no assistant turn", "data": None})
    sink.close()
    rows = [json.loads(line) for line in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert [r["row"] for r in rows] == [700, 900, 1] and len(sink) == 3
    assert sink.by_source == {"a": {"over-length: N tokens": 2}, "b": {"no assistant turn": 1}}


@pytest.fixture(scope="module")
def built(tokenizer):
    cfg = compose("trainer.max_steps=3")
    plan, _ = pipeline.build(cfg, tokenizer)
    return cfg, plan


def test_shards_round_trip_the_rows(built, tmp_path):
    cfg, plan = built
    rows = plan.input_ids.shape[0]
    fields = ("input_ids", "targets", "position_ids", "seq_lens", "source_ids")
    for i, lo in enumerate(range(0, rows, 5)):  # uneven shards
        write_shard(tmp_path, i, {k: getattr(plan, k)[lo:lo + 5] for k in fields})
    shards = len(range(0, rows, 5))
    back = read_rows(tmp_path, shards, rows, cfg.packing.max_len)
    for k in ("input_ids", "targets", "position_ids", "source_ids"):
        assert np.array_equal(back[k], getattr(plan, k)), k
    width = back["seq_lens"].shape[1]
    assert np.array_equal(back["seq_lens"], plan.seq_lens[:, :width]) and not plan.seq_lens[:, width:].any()
    prefix = read_rows(tmp_path, shards, 7, cfg.packing.max_len)
    assert np.array_equal(prefix["input_ids"], plan.input_ids[:7])
    with pytest.raises(ValueError, match="holds 12 rows, this run needs 13"):
        read_rows(tmp_path, shards, rows + 1, cfg.packing.max_len)
    (tmp_path / "rows-00001.parquet").unlink()
    with pytest.raises(ValueError, match="rows-00001.parquet is missing"):
        read_rows(tmp_path, shards, rows, cfg.packing.max_len)


def _directory(tmp_path, cfg, plan, tokenizer) -> None:
    fields = ("input_ids", "targets", "position_ids", "seq_lens", "source_ids")
    write_shard(tmp_path, 0, {k: getattr(plan, k) for k in fields})
    report = {"rows": plan.input_ids.shape[0], "shards": 1, "source_names": plan.source_names,
              "compat": preprocessed.compat(cfg, tokenizer), "data_report": plan.report, "config": to_plain(cfg)}
    (tmp_path / "report.json").write_text(json.dumps(report))


def test_training_from_a_directory_checks_what_the_rows_depend_on(built, tokenizer, tmp_path):
    cfg, plan = built
    _directory(tmp_path, cfg, plan, tokenizer)
    same = compose("trainer.max_steps=3", f"data.preprocessed={tmp_path}")
    rows, notes = preprocessed.load(same, tokenizer, to_plain(same))
    assert np.array_equal(rows.input_ids, plan.input_ids) and rows.report == plan.report
    assert notes == [f"data.preprocessed: training on 12 of the 12 packed rows of {tmp_path}"]
    for override, field in (("template=chatml", "template"), ("masking.train_eot=false", "train_eot"),
                            ("packing.max_len=256", "max_len"), ("masking=last_turn", "masking")):
        other = compose("trainer.max_steps=3", f"data.preprocessed={tmp_path}", override)
        with pytest.raises(ValueError, match=f"preprocessed with {field}="):
            preprocessed.load(other, tokenizer, to_plain(other))
    longer = compose("trainer.max_steps=4", f"data.preprocessed={tmp_path}")
    with pytest.raises(ValueError, match="holds 12 packed rows; this run needs 16"):
        preprocessed.load(longer, tokenizer, to_plain(longer))
    with pytest.raises(ValueError, match="no report.json"):
        preprocessed.load(compose(f"data.preprocessed={tmp_path / 'nothing'}"), tokenizer, {})


def test_a_shorter_run_takes_the_first_rows_and_is_told_what_does_not_apply(built, tokenizer, tmp_path):
    cfg, plan = built
    _directory(tmp_path, cfg, plan, tokenizer)
    short = compose("trainer.max_steps=1", f"data.preprocessed={tmp_path}", "mix.T=1.5", "mitigation=replay")
    rows, notes = preprocessed.load(short, tokenizer, to_plain(short))
    assert np.array_equal(rows.targets, plan.targets[:4])
    report = rows.report
    assert report["rows"] == 4 and 0 < report["packing_efficiency"] <= 1
    assert sum(s["tokens"] for s in report["sources"].values()) == report["real_tokens"] == (rows.source_ids >= 0).sum()
    starts = int(((rows.position_ids == 0) & (rows.source_ids >= 0)).sum())
    assert sum(s["examples"] for s in report["sources"].values()) == starts
    assert notes[0].startswith("data.preprocessed: training on 4 of the 12 packed rows")
    assert "mix.T" in notes[1] and "mitigation.replay.ratio" in notes[1] and "trainer" not in notes[1]


@pytest.mark.parametrize("mitigation", ["replay", "progressive"])
def test_row_shaping_plugins_do_not_check_preprocessed_rows(built, tokenizer, tmp_path, capsys, mitigation):
    """Replay and progressive mixing act when rows are planned: on a directory preprocessed without them they
    are reported as not applying, and their row checks (which look for their source or schedule) are skipped."""
    from keel.launch import prepare
    from keel.mitigation import configured

    cfg, plan = built
    _directory(tmp_path, cfg, plan, tokenizer)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (tmp_path / "rejects.jsonl").write_text("")
    train = compose("trainer.max_steps=1", f"data.preprocessed={tmp_path}", f"mitigation={mitigation}")
    _, _, rows = prepare.prepare_data(train, run_dir, configured(train))
    assert np.array_equal(rows.input_ids, plan.input_ids[:4])
    assert f"do not apply: mitigation.{mitigation}" in capsys.readouterr().out
