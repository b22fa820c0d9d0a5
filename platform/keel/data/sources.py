"""Sources: where canonical examples come from.

Readers for local JSON (a list of rows, or an object holding one under a key such as
``data``), JSONL, Parquet and CSV files, sorted globs of them, and Hugging Face datasets
(``hf:owner/name`` or a local dataset folder, through ``datasets.load_dataset``). Rows are
numbered per file from 0 (for JSONL: the line number, blank lines skipped but counted).
Every row comes out either as a canonical example (see ``keel.data.formats``) or as a
``Reject`` carrying the reason: malformed lines and undecodable bytes never raise.

Hostile inputs: a row larger than ``max_row_bytes`` (``data.max_row_bytes``, default 4 MiB) is
rejected before it is parsed (a JSONL line is never read whole) or, for formats parsed by a
library (JSON, Parquet, CSV, Hugging Face), before it is converted or tokenised; a glob matches
each real file once (``**`` follows directory links but never loops); a missing file, a broken
or looping symbolic link and a file that is not a regular file are errors naming the path.
"""

from __future__ import annotations

import csv
import fnmatch
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from keel.choices import DATA_FILE_SUFFIXES, FORMATS, HF_PREFIX, check_fields, check_format
from keel.data import demo
from keel.data.formats import Reject, detect_format, to_canonical, validate
from keel.errors import UserError

if TYPE_CHECKING:
    from keel.config import SourceConfig


__all__ = ["Reject", "detect_source_format", "iter_raw", "iter_rows", "iter_source", "load_conversations",
           "read_file", "resolve_files", "source_format", "validation_source"]

log = logging.getLogger(__name__)

DEFAULT_MAX_ROW_BYTES = 4 * 2**20  # data.max_row_bytes: a 128k-token row in any script fits; 50 MB lines do not
_SKIP_CHUNK = 2**20  # the rest of an over-long line is skipped in pieces this size
CONTAINER_KEYS = ("data", "rows", "examples", "train", "instances", "records", "items")
Row = tuple[int, Any]

# ---------------------------------------------------------------- file readers


def _jsonl_line(raw: bytes, first: bool) -> Any:
    try:
        text = raw.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as err:
        return Reject(f"undecodable bytes: {err}")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as err:  # JSONDecodeError, or e.g. an int over the digit limit
        return Reject(f"malformed JSON line: {err}")


def _too_large(size: int | str, limit: int) -> Reject:
    return Reject(f"row too large: {size} bytes > data.max_row_bytes={limit} (rejected before parsing)")


def _skip_line(fh: Any, read: int) -> int:
    """Read past the rest of the current line without holding it; the line's length (without its end)."""
    while True:
        chunk = fh.readline(_SKIP_CHUNK)
        read += len(chunk.rstrip(b"\r\n"))
        if not chunk or chunk.endswith(b"\n"):
            return read


def _jsonl_rows(path: Path, max_row_bytes: int = DEFAULT_MAX_ROW_BYTES) -> Iterator[Row]:
    with path.open("rb") as fh:
        i = 0
        while raw := fh.readline(max_row_bytes + 2):  # never more than the limit (+ "\r\n") in memory
            if len(raw) == max_row_bytes + 2 and not raw.endswith(b"\n"):
                yield i, _too_large(_skip_line(fh, len(raw)), max_row_bytes)
            elif len(raw.rstrip(b"\r\n")) > max_row_bytes:
                yield i, _too_large(len(raw.rstrip(b"\r\n")), max_row_bytes)
            elif raw.strip():
                yield i, _jsonl_line(raw, i == 0)
            i += 1


def _json_container(data: Any) -> list | None:
    """The row list of a parsed JSON file, or None when ``data`` is one row."""
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        for key in CONTAINER_KEYS:
            if isinstance(data.get(key), list):
                return data[key]
    return None


def _json_rows(path: Path, max_row_bytes: int = DEFAULT_MAX_ROW_BYTES) -> Iterator[Row]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as err:
        yield 0, Reject(f"undecodable bytes: {err}")
        return
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # one JSON value per line in a .json file
            yield from _jsonl_rows(path, max_row_bytes)
        else:
            yield 0, Reject(f"malformed JSON file: {err}")
        return
    except (ValueError, RecursionError) as err:
        yield 0, Reject(f"malformed JSON file: {err}")
        return
    rows = _json_container(data)
    yield from enumerate(rows if rows is not None else [data])


def _parquet_rows(path: Path, max_row_bytes: int = DEFAULT_MAX_ROW_BYTES) -> Iterator[Row]:
    import pyarrow.parquet as pq

    i = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                yield i, row
                i += 1
    except (OSError, ValueError) as err:  # pyarrow.ArrowInvalid is a ValueError
        yield i, Reject(f"unreadable Parquet data: {err}")


def _has_surrogates(values: list[str]) -> bool:
    return any(any("\udc80" <= ch <= "\udcff" for ch in v) for v in values)


def _csv_row(header: list[str], values: list[str]) -> Any:
    if _has_surrogates(values):
        return Reject("undecodable bytes: CSV row is not valid UTF-8")
    if len(values) != len(header):
        return Reject(f"malformed CSV row: {len(values)} fields, the header has {len(header)}")
    return dict(zip(header, values))


def _csv_rows(path: Path, max_row_bytes: int = DEFAULT_MAX_ROW_BYTES) -> Iterator[Row]:
    # The csv module's field limit is process-wide; make it the row limit so a huge field stops
    # the parser (it is then a reject below) instead of its default 128 KiB.
    csv.field_size_limit(max_row_bytes)
    with path.open(newline="", encoding="utf-8-sig", errors="surrogateescape") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            return
        if _has_surrogates(header):
            yield 0, Reject("undecodable bytes: CSV header is not valid UTF-8")
            return
        i = 0
        while True:
            try:
                values = next(reader)
            except StopIteration:
                return
            except csv.Error as err:
                too_big = "field larger than field limit" in str(err)
                yield i, _too_large(f"over {max_row_bytes}", max_row_bytes) if too_big else Reject(
                    f"malformed CSV row: {err}")
                i += 1
                continue
            if values:
                yield i, _csv_row(header, values)
                i += 1


READERS: dict[str, Callable[[Path, int], Iterator[Row]]] = {
    ".json": _json_rows, ".jsonl": _jsonl_rows, ".ndjson": _jsonl_rows, ".parquet": _parquet_rows,
    ".csv": _csv_rows,
}
assert tuple(READERS) == DATA_FILE_SUFFIXES  # keel.config.names_dataset tells files from datasets by these


def _reader(path: Path) -> Callable[[Path, int], Iterator[Row]]:
    suffix = path.suffix.lower()
    if suffix not in READERS:
        raise UserError(f"{path}: unsupported file type {path.suffix!r} (use {', '.join(READERS)})")
    return READERS[suffix]


def check_file(path: str | os.PathLike) -> Path:
    """``path`` as a readable regular file; UserError saying what it is instead (missing, a broken or
    looping symbolic link, a directory, a FIFO or device, unreadable)."""
    p = Path(path).expanduser()
    if os.path.islink(p):
        try:
            os.path.realpath(p, strict=True)
        except OSError as err:
            kind = "a symbolic link loop" if "loop" in str(err).lower() or err.errno == 40 else \
                f"a broken symbolic link (to {os.readlink(p)!r})"
            raise UserError(f"data source file {p}: {kind}") from None
    if not p.exists():
        raise UserError(f"data source file not found: {p} (for a Hugging Face Hub dataset write "
                         f"'{HF_PREFIX}owner/name')")
    if not p.is_file():
        raise UserError(f"data source file {p}: not a regular file (a directory, FIFO or device)")
    if not os.access(p, os.R_OK):
        raise UserError(f"data source file {p}: permission denied")
    return p


def read_file(path: str | os.PathLike, max_row_bytes: int = DEFAULT_MAX_ROW_BYTES) -> Iterator[Row]:
    """Yield (row number, raw row or Reject) from one .json/.jsonl/.ndjson/.parquet/.csv file."""
    p = check_file(path)
    yield from _reader(p)(p, max_row_bytes)


def _is_glob(path: str) -> bool:
    return any(ch in path for ch in "*?[")


def _hidden(name: str, pattern: str) -> bool:
    """Whether a wildcard skips ``name`` (as glob does: dot files only match a pattern starting with a dot)."""
    return name.startswith(".") and not pattern.startswith(".")


def _listdir(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path or "."))
    except OSError:
        return []


def _expand(base: str, parts: list[str], seen: set) -> Iterator[str]:
    """Paths under ``base`` matching the glob segments ``parts``; ``**`` spans directories, links
    included, each real directory once per remaining pattern (so a link loop ends)."""
    if not parts:
        yield base
        return
    head, rest = parts[0], parts[1:]
    if head == "**":
        try:
            st = os.stat(base or ".")
        except OSError:
            return
        if (st.st_dev, st.st_ino, len(rest)) in seen:
            return
        seen.add((st.st_dev, st.st_ino, len(rest)))
        yield from _expand(base, rest, seen)
        for name in _listdir(base):
            sub = os.path.join(base, name)
            if not _hidden(name, "") and os.path.isdir(sub):
                yield from _expand(sub, parts, seen)
    elif _is_glob(head):
        for name in _listdir(base):
            if fnmatch.fnmatchcase(name, head) and not _hidden(name, head):
                yield from _expand(os.path.join(base, name), rest, seen)
    elif os.path.lexists(os.path.join(base, head)):
        yield from _expand(os.path.join(base, head), rest, seen)


def glob_files(pattern: str) -> list[str]:
    """Sorted regular files matching ``pattern``, each real file once (the first of its names)."""
    root = "/" if pattern.startswith("/") else ""
    parts = [p for p in pattern.split("/") if p]
    matches = sorted({f for f in _expand(root, parts, set()) if os.path.isfile(f)})
    files, real = [], set()
    for f in matches:
        if os.path.realpath(f) not in real:
            real.add(os.path.realpath(f))
            files.append(f)
    if len(files) < len(matches):
        log.warning("%s: %d of %d matches are the same files through symbolic links; each is read once",
                    pattern, len(matches) - len(files), len(matches))
    return files


def resolve_files(path: str) -> list[str]:
    """The files ``path`` names: itself, or the sorted matches of a glob (each real file once)."""
    expanded = os.path.expanduser(str(path))
    if not _is_glob(expanded):
        files = [str(check_file(expanded))]
    else:
        files = glob_files(expanded)
        if not files:
            raise UserError(f"no files match the data source glob {expanded!r}")
    for f in files:
        _reader(Path(f))  # fail on an unsupported type before reading anything
    return files


# ---------------------------------------------------------------- Hugging Face datasets


def _is_hf(path: str) -> bool:
    return str(path).startswith(HF_PREFIX) or Path(os.path.expanduser(str(path))).is_dir()


def _hf_rows(path: str, split: str, subset: str | None, streaming: bool) -> Iterator[Row]:
    from datasets import load_dataset

    name = path[len(HF_PREFIX):] if path.startswith(HF_PREFIX) else os.path.expanduser(path)
    try:
        ds = load_dataset(name, subset, split=split, streaming=streaming)
    except (FileNotFoundError, ValueError) as err:
        raise UserError(f"{path}: cannot load Hugging Face dataset (split={split!r}): {err}") from err
    yield from enumerate(ds)


# ---------------------------------------------------------------- rows of a source


def row_bytes(row: Any, limit: int) -> int:
    """UTF-8 size of a parsed row's strings (keys included; 8 per other scalar), counted up to just past
    ``limit``: cheap next to tokenising it."""
    total, stack = 0, [row]
    while stack and total <= limit:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item) if item.isascii() else len(item.encode("utf-8", "surrogatepass"))
        elif isinstance(item, dict):
            stack += item.keys()
            stack += item.values()
        elif isinstance(item, list | tuple):
            stack += item
        else:
            total += 8
    return total


def _bounded(row: Any, limit: int) -> Any:
    """The row, or a Reject when it is over ``limit`` (checked before conversion and tokenising)."""
    if isinstance(row, Reject) or row_bytes(row, limit) <= limit:
        return row
    return Reject(f"row too large: over data.max_row_bytes={limit} bytes (rejected before tokenising)")


def iter_raw(path: str, *, split: str = "train", subset: str | None = None, streaming: bool = False,
             max_row_bytes: int = DEFAULT_MAX_ROW_BYTES) -> Iterator[tuple[str, int, Any]]:
    """Yield (file, row number, raw row or Reject) for a file, glob or Hugging Face dataset."""
    path = str(path)
    if _is_hf(path):
        label = f"{path}[{split}]"
        for i, row in _hf_rows(path, split, subset, streaming):
            yield label, i, _bounded(row, max_row_bytes)
        return
    for f in resolve_files(path):
        for i, row in read_file(f, max_row_bytes):
            yield f, i, _bounded(row, max_row_bytes)


def _convert(raw: Any, fmt: str, fields: Mapping[str, str] | None) -> dict | Reject:
    """A canonical, valid example, or a Reject carrying the raw row."""
    if isinstance(raw, Reject):
        return raw
    try:
        example = to_canonical(raw, fmt, fields)
    except Reject as rej:
        return Reject(str(rej), data=raw)
    reason = validate(example)
    return example if reason is None else Reject(reason, data=raw)


def _undetected(raw: Any, fields: Mapping[str, str] | None) -> Reject:
    if isinstance(raw, Reject):
        return raw
    keys = sorted(map(str, raw)) if isinstance(raw, dict) else type(raw).__name__
    return Reject(f"format=auto: no row has the fields of a known format ({', '.join(FORMATS)}; "
                  f"fields={dict(fields or {})}); this row has {keys}", data=raw)


def _chosen(path: str, raw: Any, fields: Mapping[str, str] | None) -> str | None:
    fmt = detect_format(raw, fields)
    if fmt is not None:
        log.info("%s: format=auto chose %r from the fields %s", path, fmt, sorted(raw))
    return fmt


def iter_rows(path: str, format: str = "auto", fields: Mapping[str, str] | None = None, *,
              split: str = "train", subset: str | None = None, streaming: bool = False,
              max_row_bytes: int = DEFAULT_MAX_ROW_BYTES) -> Iterator[tuple[str, int, dict | Reject]]:
    """Yield (file, row number, canonical valid example or Reject) for every row of ``path``."""
    # format="auto" takes the format of the first row that has a known format's fields (logged,
    # see detect_source_format) and applies it to every row; rows before it are held back.
    # fields renames fields, e.g. {"messages": "conversations", "role": "from", "content": "value"}.
    fmt = check_format(format)
    check_fields(fmt, fields)
    chosen = None if fmt == "auto" else fmt
    pending: list[tuple[str, int, Any]] = []
    for file, i, raw in iter_raw(path, split=split, subset=subset, streaming=streaming, max_row_bytes=max_row_bytes):
        if chosen is None:
            chosen = _chosen(str(path), raw, fields)
            if chosen is None:
                pending.append((file, i, raw))
                continue
            for p_file, p_i, p_raw in pending:
                yield p_file, p_i, _convert(p_raw, chosen, fields)
            pending.clear()
        yield file, i, _convert(raw, chosen, fields)
    for p_file, p_i, p_raw in pending:
        yield p_file, p_i, _undetected(p_raw, fields)


def detect_source_format(path: str, fields: Mapping[str, str] | None = None, *, split: str = "train",
                         subset: str | None = None, streaming: bool = False) -> str:
    """The format ``format="auto"`` would choose for ``path``; UserError if none fits."""
    check_fields("auto", fields)
    for _, _, raw in iter_raw(path, split=split, subset=subset, streaming=streaming):
        fmt = detect_format(raw, fields)
        if fmt is not None:
            return fmt
    raise UserError(f"{path}: no row has the fields of a known format ({', '.join(FORMATS)})")


def load_conversations(path: str, format: str = "auto", fields: Mapping[str, str] | None = None, *,
                       split: str = "train", subset: str | None = None,
                       streaming: bool = False) -> Iterator[dict]:
    """Yield the valid canonical examples of ``path`` (use ``iter_rows`` to see rejects too)."""
    for _, _, item in iter_rows(path, format, fields, split=split, subset=subset, streaming=streaming):
        if not isinstance(item, Reject):
            yield item


def iter_source(src: SourceConfig, seed: int, max_row_bytes: int = DEFAULT_MAX_ROW_BYTES) -> Iterator[tuple[int, Any]]:
    """(row number, canonical example or Reject) pairs of one configured source: a demo source's
    ``num_examples`` generated rows, or every row of a file source (``cap`` is applied by the reader's caller;
    a Reject knows its ``file``)."""
    if src.kind == "demo":
        yield from enumerate(demo.generate(src.task, src.num_examples, seed))
        return
    rows = iter_rows(src.path, getattr(src, "format", None) or "auto", getattr(src, "fields", None),
                     split=getattr(src, "split", None) or "train", subset=getattr(src, "subset", None),
                     streaming=bool(getattr(src, "streaming", False)), max_row_bytes=max_row_bytes)
    for file, i, row in rows:
        if isinstance(row, Reject):
            row.file = file  # rows are numbered per file: a glob's reject needs its file
        yield i, row


def validation_source(src: SourceConfig) -> SourceConfig | None:
    """The source's own validation rows as a source (``val_path`` or ``val_split``), or None."""
    import dataclasses

    if getattr(src, "val_path", None):  # a file of validation rows, whatever the training rows come from
        return dataclasses.replace(src, kind="file", path=src.val_path, val_path=None, cap=None, num_examples=None)
    if getattr(src, "val_split", None):
        return dataclasses.replace(src, split=src.val_split, val_split=None, cap=None)
    return None


def source_format(src: SourceConfig) -> str:
    """The format a source is read with (what ``format=auto`` picks, for files)."""
    if src.kind != "file" or src.format != "auto":
        return "demo" if src.kind == "demo" else src.format
    try:
        return detect_source_format(src.path, src.fields, split=src.split, subset=src.subset)
    except ValueError:
        return "auto (no known format found)"
