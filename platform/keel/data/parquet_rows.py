"""Packed rows as Parquet shards: what ``keel preprocess`` writes and ``data.preprocessed`` reads.

A shard ``rows-NNNNN.parquet`` holds consecutive rows in training order, one Parquet row per
packed row: ``input_ids``, ``targets`` (shifted, -100 untrained) and ``source_ids`` (per
token, -1 padding), each ``packing.max_len`` long, and ``seq_lens`` (the lengths of the
examples packed into it). Position ids are not stored: they restart at 0 per example (and
for the tail padding), as ``keel.data.pipeline`` lays them out.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from keel.errors import UserError

SHARD = "rows-{:05d}.parquet"
VAL_SHARD = "val-{:05d}.parquet"  # the validation rows (data.val_fraction, val_path, val_split), same layout
TOKEN_COLUMNS = {"input_ids": np.int32, "targets": np.int32, "source_ids": np.int16}


def _fixed(values: np.ndarray) -> pa.Array:
    rows, width = values.shape
    offsets = pa.array(np.arange(0, rows * width + 1, width, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1)))


def _ragged(padded: np.ndarray) -> pa.Array:
    counts = (padded > 0).sum(axis=1)
    offsets = np.zeros(len(padded) + 1, dtype=np.int32)
    np.cumsum(counts, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(padded[padded > 0].astype(np.int32)))


def write_shard(directory: str | os.PathLike, index: int, arrays: dict, name: str = SHARD) -> Path:
    """Write rows (``keel.data.pipeline.fill_rows`` arrays) as shard ``index``; returns its path."""
    table = pa.table({**{k: _fixed(arrays[k]) for k in TOKEN_COLUMNS}, "seq_lens": _ragged(arrays["seq_lens"])})
    path = Path(directory) / name.format(index)
    tmp = path.with_suffix(".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)  # a shard is either complete or absent
    return path


def shard_paths(directory: str | os.PathLike, count: int, name: str = SHARD) -> list[Path]:
    """The ``count`` shards of a preprocessed directory, in row order; UserError naming a missing one."""
    paths = [Path(directory) / name.format(i) for i in range(count)]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise UserError(f"data.preprocessed: {missing[0]} is missing ({len(missing)} of {count} shards); "
                         "rerun `keel preprocess`")
    return paths


def _position_ids(seq_lens: list[np.ndarray], width: int) -> np.ndarray:
    out = np.zeros((len(seq_lens), width), dtype=np.int32)
    for r, lens in enumerate(seq_lens):
        pieces = [np.arange(n, dtype=np.int32) for n in lens]
        tail = width - int(lens.sum())
        out[r] = np.concatenate([*pieces, np.arange(tail, dtype=np.int32)])
    return out


def _read_table(table: pa.Table, max_len: int) -> dict:
    rows = table.num_rows
    out = {}
    for name, dtype in TOKEN_COLUMNS.items():
        flat = table.column(name).combine_chunks().flatten().to_numpy(zero_copy_only=False)
        if flat.size != rows * max_len:
            raise UserError(f"data.preprocessed: column {name} holds {flat.size} tokens for {rows} rows of {max_len}")
        out[name] = flat.astype(dtype).reshape(rows, max_len)
    lens = [np.asarray(x, dtype=np.int32) for x in table.column("seq_lens").to_pylist()]
    width = max((len(x) for x in lens), default=1)
    out["seq_lens"] = np.zeros((rows, width), dtype=np.int32)
    for r, x in enumerate(lens):
        out["seq_lens"][r, :len(x)] = x
    out["position_ids"] = _position_ids(lens, max_len)
    return out


def read_rows(directory: str | os.PathLike, shards: int, rows: int, max_len: int, name: str = SHARD) -> dict:
    """The first ``rows`` rows of a preprocessed directory as row arrays (as ``fill_rows`` gives them)."""
    parts, have = [], 0
    for path in shard_paths(directory, shards, name):
        if have >= rows:
            break
        table = pq.read_table(path)
        parts.append(_read_table(table.slice(0, rows - have), max_len))
        have += min(table.num_rows, rows - have)
    if have < rows:
        raise UserError(f"data.preprocessed: {directory} holds {have} rows, this run needs {rows}")
    width = max(p["seq_lens"].shape[1] for p in parts)
    for p in parts:
        p["seq_lens"] = np.pad(p["seq_lens"], ((0, 0), (0, width - p["seq_lens"].shape[1])))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
