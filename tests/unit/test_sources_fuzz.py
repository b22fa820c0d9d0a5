"""Fuzz the readers with malformed files: every row is used or rejected, none lost, no crash."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from keel.data.formats import FORMATS, Reject, validate
from keel.data.sources import iter_rows

FUZZ = settings(derandomize=True, max_examples=100, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=8))
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3)
                       | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
_keys = st.sampled_from(["messages", "conversations", "role", "content", "from", "value", "instruction",
                         "input", "output", "history", "system", "tools", "prompt", "completion",
                         "question", "answer", "text", "other"])
_roles = st.sampled_from(["user", "assistant", "system", "tool", "human", "gpt", "function_call",
                          "observation", "bot", ""])
_message = st.fixed_dictionaries({}, optional={"role": _roles, "from": _roles, "content": _values,
                                               "value": st.one_of(_values, st.just('{"name": "f"}'))})
_rows = st.one_of(
    st.dictionaries(_keys, _values, max_size=4),
    st.fixed_dictionaries({"messages": st.lists(_message, max_size=4)}),
    st.fixed_dictionaries({"conversations": st.lists(_message, max_size=4)},
                          optional={"tools": st.one_of(st.just("[{"), st.just("[]"), _values)}),
    st.fixed_dictionaries({"instruction": _values}, optional={"input": _values, "output": _values}),
    _values,
)


def _line(row, cut: int | None) -> bytes:
    """One JSON line, possibly truncated (malformed)."""
    data = json.dumps(row).encode()
    return data if cut is None else data[: cut % max(1, len(data))]


_lines = st.one_of(
    st.tuples(_rows, st.none()).map(lambda t: _line(*t)),
    st.tuples(_rows, st.integers(0, 200)).map(lambda t: _line(*t)),
    st.binary(max_size=30).map(lambda b: b.replace(b"\n", b"")),
    st.sampled_from([b"", b"   ", b"\t"]),
)


def _check_items(items: list) -> None:
    for _, _, item in items:
        assert isinstance(item, Reject) or validate(item) is None
        assert not isinstance(item, Reject) or str(item)


@FUZZ
@given(lines=st.lists(_lines, max_size=12), fmt=st.sampled_from(("auto",) + FORMATS))
def test_jsonl_every_nonblank_line_is_used_or_rejected(tmp_path, lines, fmt):
    data = b"\n".join(lines) + b"\n"
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(data)
    items = list(iter_rows(str(path), fmt))
    expected = [i for i, line in enumerate(data.split(b"\n")) if line.strip()]
    assert sorted(r for _, r, _ in items) == expected  # each non-blank line exactly once
    _check_items(items)


@FUZZ
@given(payload=st.one_of(st.lists(_rows, max_size=6).map(lambda r: json.dumps(r).encode()),
                         st.lists(_rows, max_size=6).map(lambda r: json.dumps({"data": r}).encode()),
                         st.binary(max_size=60)),
       cut=st.one_of(st.none(), st.integers(0, 400)))
def test_json_file_never_crashes_and_counts_every_row(tmp_path, payload, cut):
    data = payload if cut is None else payload[:cut]
    path = tmp_path / "fuzz.json"
    path.write_bytes(data)
    items = list(iter_rows(str(path), "auto"))
    try:
        parsed = json.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        parsed = None
    if isinstance(parsed, list):
        assert len(items) == len(parsed)
    elif isinstance(parsed, dict) and isinstance(parsed.get("data"), list):
        assert len(items) == len(parsed["data"])
    else:
        assert len(items) >= 1 or not data.strip()  # a broken file is a reject, not silence
    _check_items(items)


@FUZZ
@given(cells=st.lists(st.lists(st.one_of(st.text(max_size=6), st.binary(max_size=6)), min_size=1, max_size=3),
                      max_size=8))
def test_csv_rows_are_used_or_rejected(tmp_path, cells):
    body = [b",".join(c if isinstance(c, bytes) else c.encode() for c in row) for row in cells]
    path = tmp_path / "fuzz.csv"
    path.write_bytes(b"question,answer\n" + b"\n".join(body) + b"\n")
    items = list(iter_rows(str(path), "gsm8k"))
    assert [r for _, r, _ in items] == list(range(len(items)))
    _check_items(items)
