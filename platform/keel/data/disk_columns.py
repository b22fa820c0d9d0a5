"""Append-only columns kept on disk, not in memory: a source's token columns and its rejected rows.

(``keel.data.parquet_rows`` is the output of ``keel preprocess``; these are its working storage.)

A ``Column`` is one flat int32 file (every example's tokens back to back) plus its offsets
(``<file>.offsets.npy``, written by ``close``). It is appended to in example order by one
writer and read back example by example with ``os.pread``, so reading pages in nothing but
the example asked for (a memory map would keep every page it touched resident). A
``RejectSink`` streams rejected rows to a JSON Lines file and counts them per source and reason.
"""

from __future__ import annotations

import json
import os
from array import array
from collections import Counter, defaultdict
from collections.abc import Iterator, MutableSequence
from pathlib import Path
from typing import Any

import numpy as np

ITEM = 4  # bytes per token (int32)


class _AppendOnly(MutableSequence):
    """A MutableSequence that only appends (what SourceData does with its columns and rejects)."""

    def __setitem__(self, i: int, value: Any) -> None:
        raise TypeError(f"{type(self).__name__} is append-only")

    def __delitem__(self, i: int) -> None:
        raise TypeError(f"{type(self).__name__} is append-only")

    def insert(self, i: int, value: Any) -> None:
        if i != len(self):
            raise TypeError(f"{type(self).__name__} is append-only")
        self.append(value)


class Column(_AppendOnly):
    """Append-only sequence of int32 arrays stored in one file."""

    def __init__(self, path: str | os.PathLike, offsets: np.ndarray | None = None) -> None:
        self.path = Path(path)
        if offsets is None:  # a new column, open for appending
            self._fh: Any = self.path.open("wb")
            self._offsets = array("q", [0])
        else:
            self._fh = None
            self._offsets = array("q", offsets.astype(np.int64).tobytes())
        self._fd: int | None = None

    @classmethod
    def open(cls, path: str | os.PathLike) -> Column:
        """A column that ``close`` finished, for reading."""
        return cls(path, np.load(f"{path}.offsets.npy"))

    def append(self, value: np.ndarray) -> None:
        data = np.ascontiguousarray(value, dtype=np.int32)
        self._fh.write(data.tobytes())
        self._offsets.append(self._offsets[-1] + len(data))

    def close(self) -> None:
        """Finish writing: flush the tokens and write the offsets."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
            np.save(f"{self.path}.offsets.npy", np.frombuffer(self._offsets, dtype=np.int64))

    def lengths(self) -> np.ndarray:
        """Token count of every example."""
        return np.diff(np.frombuffer(self._offsets, dtype=np.int64))

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:  # type: ignore[override]
        if not -len(self) <= i < len(self):
            raise IndexError(f"{self.path}: example {i} of {len(self)}")
        i %= len(self)
        if self._fh is not None:
            self._fh.flush()
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        lo, hi = self._offsets[i], self._offsets[i + 1]
        return np.frombuffer(os.pread(self._fd, (hi - lo) * ITEM, lo * ITEM), dtype=np.int32)

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[i] for i in range(len(self)))

    def __getstate__(self) -> dict:
        assert self._fh is None, "close a Column before sending it to another process"
        return {"path": str(self.path), "offsets": np.frombuffer(self._offsets, dtype=np.int64).copy()}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], state["offsets"])  # type: ignore[misc]

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)


class RejectSink(_AppendOnly):
    """Rejected rows appended to a JSON Lines file; only their count stays in memory."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._fh = self.path.open("a")
        self._count = 0
        self.by_source: dict[str, Counter] = defaultdict(Counter)  # source -> reason (numbers blanked) -> count

    def append(self, value: dict) -> None:
        from keel.data.inspect import reason_key

        self._fh.write(json.dumps(value, default=str) + "\n")
        self._count += 1
        self.by_source[value["source"]][reason_key(value["reason"])] += 1

    def close(self) -> None:
        self._fh.close()

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, i: int) -> Any:
        raise TypeError(f"rejects are in {self.path}, not in memory")


class SourceRejects(_AppendOnly):
    """One source's view of a shared RejectSink: appends go to the sink, the length is this source's count."""

    def __init__(self, sink: RejectSink) -> None:
        self.sink = sink
        self._count = 0

    def append(self, value: dict) -> None:
        self.sink.append(value)
        self._count += 1

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, i: int) -> Any:
        raise TypeError(f"rejects are in {self.sink.path}, not in memory")
