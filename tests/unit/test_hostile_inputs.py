"""Hostile inputs (issue 19 item 7): lone surrogates, symbolic link loops, globs through link loops and
huge lines each get a clear reason naming file, row and field, at little cost."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import threading
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import pytest
from keel.data.formats import Reject, validate
from keel.data.sources import DEFAULT_MAX_ROW_BYTES, iter_rows, iter_source, resolve_files

from tests.conftest import compose

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}


def _jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------- lone surrogates


def test_lone_surrogates_anywhere_are_rejected_naming_the_field():
    call = {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": {"q": "a\ud800b"}}}]}
    row = {"messages": [CHAT["messages"][0], call, {"role": "tool", "content": "r"},
                        {"role": "assistant", "content": "done"}]}
    assert validate(row) == "messages[1].tool_calls[0].function.arguments.q: invalid Unicode (lone surrogate)"
    assert validate({**CHAT, "tools": [{"name": "t\udfff"}]}) == "tools[0].name: invalid Unicode (lone surrogate)"
    assert validate({"text": "ok", "meta\ud800": 1}) == "row (a key): invalid Unicode (lone surrogate)"
    assert validate(CHAT) is None


def test_keel_inspect_reports_a_lone_surrogate_instead_of_crashing(tmp_path, capsys):
    from keel.cli import inspect as cli

    bad = json.dumps({"messages": [{"role": "user", "content": "hi \ud800 there"},
                                   {"role": "assistant", "content": "ok"}]})  # JSON keeps it as \ud800
    data = _jsonl(tmp_path / "sur.jsonl", [bad, json.dumps(CHAT)])
    out = tmp_path / "report"
    cli.main(["--no-color", "--file", str(data), "--out", str(out)])
    stdout = capsys.readouterr().out
    assert "rejected 1x: messages[N].content: invalid Unicode (lone surrogate)" in stdout
    assert f"(e.g. {data} row 0)" in stdout
    page = (out / "inspect.html").read_text(encoding="utf-8")
    assert page.rstrip().endswith("</html>") and "\\ud800" in page  # shown escaped, the page complete
    report = json.loads((out / "inspect.json").read_text(encoding="utf-8"))
    (group,) = report["sources"][0]["rejects_by_reason"]
    assert group["examples"][0]["file"] == str(data) and group["examples"][0]["row"] == 0


# ------------------------------------------------------------------------------- links


def test_link_problems_are_named_not_file_not_found(tmp_path):
    loop = tmp_path / "self.jsonl"
    loop.symlink_to(loop.name)  # points at itself
    dangling = tmp_path / "gone.jsonl"
    dangling.symlink_to(tmp_path / "missing.jsonl")
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)  # reading it would block forever
    for path, reason in ((loop, "a symbolic link loop"), (dangling, "a broken symbolic link"),
                         (fifo, "not a regular file")):
        with pytest.raises(ValueError, match=f"{path}: {reason}"):
            list(iter_rows(str(path)))
    with pytest.raises(ValueError, match="data source file not found"):
        list(iter_rows(str(tmp_path / "nothing.jsonl")))


def test_glob_through_a_directory_link_loop_reads_each_file_once(tmp_path, caplog):
    data = tmp_path / "d"
    (data / "sub").mkdir(parents=True)
    _jsonl(data / "x.jsonl", [json.dumps(CHAT)])
    _jsonl(data / "sub" / "y.jsonl", [json.dumps(CHAT)])
    (data / "loop").symlink_to(".")  # d/loop/loop/... is d again: glob read x.jsonl 41 times
    (data / "alias.jsonl").symlink_to("x.jsonl")  # a second name for one file
    pattern = str(data / "**" / "*.jsonl")
    files = resolve_files(pattern)
    assert files == [str(data / "alias.jsonl"), str(data / "sub" / "y.jsonl")]
    assert "same files through symbolic links; each is read once" in caplog.text
    assert len(list(iter_rows(pattern))) == 2
    assert resolve_files(str(data / "*.jsonl")) == [str(data / "alias.jsonl")]  # no ** : one level, deduplicated


def test_glob_through_two_link_loops_ends(tmp_path):
    """Two loops made glob's walk exponential (2^40 paths); each real directory is now walked once."""
    data = tmp_path / "d"
    (data / "sub").mkdir(parents=True)
    _jsonl(data / "sub" / "y.jsonl", [json.dumps(CHAT)])
    (data / "loop").symlink_to(".")
    (data / "sub" / "up").symlink_to("..")
    found: list = []
    walker = threading.Thread(target=lambda: found.append(resolve_files(str(data / "**" / "*.jsonl"))), daemon=True)
    walker.start()
    walker.join(20)
    assert found == [[str(data / "sub" / "y.jsonl")]]


# ------------------------------------------------------------------------------- huge rows


def test_a_huge_jsonl_line_is_rejected_before_it_is_read_whole(tmp_path):
    limit = 2**20
    huge = json.dumps({"text": "x" * (20 * 2**20)})  # 20 MB on one line
    path = _jsonl(tmp_path / "big.jsonl", [json.dumps(CHAT), huge, json.dumps(CHAT)])
    tracemalloc.start()
    try:
        rows = list(iter_rows(str(path), max_row_bytes=limit))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [r for _, r, _ in rows] == [0, 1, 2]
    assert not isinstance(rows[0][2], Reject) and not isinstance(rows[2][2], Reject)
    assert str(rows[1][2]) == (f"row too large: {len(huge)} bytes > data.max_row_bytes={limit} "
                               "(rejected before parsing)")
    assert peak < 8 * limit, f"reading held {peak / 2**20:.0f} MiB"  # a few limit-sized buffers, never the line


def test_the_default_limit_rejects_a_multi_megabyte_line(tmp_path):
    path = _jsonl(tmp_path / "big.jsonl", [json.dumps({"text": "y" * (DEFAULT_MAX_ROW_BYTES + 10)})])
    ((_, _, item),) = list(iter_rows(str(path)))
    assert isinstance(item, Reject) and "data.max_row_bytes=4194304" in str(item)


def test_huge_rows_of_parsed_formats_are_rejected_before_tokenising(tmp_path):
    limit = 2**20
    rows = [{"text": "fine"}, {"text": "z" * (3 * 2**20)}]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    with (tmp_path / "a.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text"])
        w.writerows([[r["text"]] for r in rows])
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    for name in ("a.json", "a.csv", "a.parquet"):
        items = [x for _, _, x in iter_rows(str(tmp_path / name), "text", max_row_bytes=limit)]
        assert items[0] == {"text": "fine"}, name
        assert isinstance(items[1], Reject) and "row too large" in str(items[1]), (name, str(items[1]))
        assert f"data.max_row_bytes={limit}" in str(items[1])


def test_the_pipeline_applies_data_max_row_bytes_and_names_the_file(tmp_path, tokenizer):
    from keel.data.examples import load_source
    from keel.data.template import TextEncoder

    for name in ("a", "b"):
        _jsonl(tmp_path / f"{name}.jsonl", [json.dumps({"text": "w" * 5000}), json.dumps({"text": "short"})])
    cfg = compose("data.max_row_bytes=4096")
    src = dataclasses.replace(cfg.data.sources[0], name="files", kind="file", path=str(tmp_path / "*.jsonl"),
                              format="text", num_examples=-1, masking="all_tokens")
    data = load_source(src, cfg, TextEncoder(tokenizer))
    assert len(data.input_ids) == 2
    assert [(r["file"], r["row"]) for r in data.rejects] == [(str(tmp_path / "a.jsonl"), 0),
                                                             (str(tmp_path / "b.jsonl"), 0)]
    assert all("data.max_row_bytes=4096" in r["reason"] for r in data.rejects)
    with pytest.raises(ValueError, match=r"data\.max_row_bytes"):
        compose("data.max_row_bytes=0")


def test_iter_source_marks_rejects_with_their_file(tmp_path):
    path = _jsonl(tmp_path / "s.jsonl", ["{not json", json.dumps(CHAT)])
    out = list(iter_source(SimpleNamespace(kind="file", path=str(path), num_examples=-1), seed=0))
    assert isinstance(out[0][1], Reject) and out[0][1].file == str(path)
