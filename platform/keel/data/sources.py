"""Sources: where canonical examples come from (built-in demo tasks, local JSON/JSONL)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from keel.data import demo


class Reject(Exception):
    """A row that cannot be read; carries the reason for the rejects file."""


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open("rb") as fh:
        for i, raw in enumerate(fh):
            if not raw.strip():
                continue
            try:
                yield i, json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                yield i, Reject(f"malformed JSON line: {err}")


def _json_rows(path: Path) -> Iterator[tuple[int, Any]]:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of rows")
    yield from enumerate(data)


def read_file(path: str) -> Iterator[tuple[int, Any]]:
    """Yield (row number, row or Reject) from a .json or .jsonl file."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"data source file not found: {p}")
    if p.suffix == ".jsonl":
        yield from _jsonl_rows(p)
    elif p.suffix == ".json":
        yield from _json_rows(p)
    else:
        raise ValueError(f"{p}: unsupported file type {p.suffix!r} (use .json or .jsonl)")


def iter_source(src: Any, seed: int) -> Iterator[tuple[int, Any]]:
    """(row number, example) pairs of one configured source."""
    if src.kind == "demo":
        yield from enumerate(demo.generate(src.task, src.num_examples, seed))
        return
    for n, (i, row) in enumerate(read_file(src.path)):
        if src.num_examples != -1 and n >= src.num_examples:
            break
        yield i, row
