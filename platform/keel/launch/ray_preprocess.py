"""``keel preprocess`` on Ray Data: the whole data path offline, to Parquet shards of packed rows.

Each source is read, in row order, by one Ray Data read task (``keel.data.sources``), encoded
in parallel by ``map_batches`` actors (format checks, template, masking, over-length policy:
``keel.data.examples.process_row``) and streamed back in order into on-disk token columns
(``keel.data.disk_columns``), so no process ever holds a source's tokens. The mixture and the packing
layout are planned from the examples' lengths alone (``keel.data.pipeline``, exactly as
``keel train`` plans them), then Ray Data actors materialise the rows shard by shard. Memory is
bounded by block sizes and the layout (a few dozen bytes per example), not by the data.
"""

from __future__ import annotations

import json
import pickle
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from keel.config import KeelConfig, SourceConfig, from_plain, to_plain
from keel.data.disk_columns import Column, RejectSink, SourceRejects
from keel.data.examples import RowResult, SourceData, held_out, process_row, val_fraction, validates, where
from keel.data.parquet_rows import VAL_SHARD, write_shard
from keel.data.pipeline import Layout, layout_report, pad_id, plan_sources, self_check_report, validation_rows
from keel.data.preprocessed_dir import REPORT, compat
from keel.data.sources import iter_source, source_format, validation_source
from keel.launch.ray_cluster import init_ray
from keel.tracking.logger import redact

BLOCK_ROWS = 512  # source rows per Ray Data block
SHARD_ROWS = 2048  # packed rows per Parquet shard
PIECES = pa.list_(pa.int32())


def _row_block(batch: list[tuple[int, int, int, bytes]]) -> pa.Table:
    source, seq, row, raw = zip(*batch)
    return pa.table({"source": pa.array(source, pa.int32()), "seq": pa.array(seq, pa.int64()),
                     "row": pa.array(row, pa.int64()), "raw": pa.array(raw, pa.binary())})


def _read_rows(k: int, src: SourceConfig, seed: int, max_row_bytes: int, caps: Any = None) -> Iterator[pa.Table]:
    """Source ``k``'s rows in order (canonical examples or readers' Rejects, pickled) in blocks. A capped
    source stops once the consumer says its cap is reached (``caps``): a streamed corpus is not read whole."""
    import ray

    batch = []
    for seq, (row_no, row) in enumerate(iter_source(src, seed, max_row_bytes)):
        batch.append((k, seq, row_no, pickle.dumps(row)))
        if len(batch) == BLOCK_ROWS:
            yield _row_block(batch)
            batch = []
            if caps is not None and ray.get(caps.reached.remote(k)):
                return
    if batch:
        yield _row_block(batch)


class CapsReached:
    """Ray actor: the sources whose ``cap`` the consumer has filled (their readers stop at the next block)."""

    def __init__(self) -> None:
        self.done: set[int] = set()

    def mark(self, k: int) -> None:
        self.done.add(k)

    def reached(self, k: int) -> bool:
        return k in self.done


def _datasource(configs: list, seed: int, max_row_bytes: int, caps: Any = None) -> Any:
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class SourceRows(Datasource):
        """One read task per source: a source's rows are numbered in order, which one reader keeps."""

        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                           data_context: Any = None) -> list:
            meta = BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
            return [ReadTask(lambda k=k, src=src: _read_rows(k, src, seed, max_row_bytes,
                                                             caps if src.cap is not None else None), meta)
                    for k, src in enumerate(configs)]

    return SourceRows()


COLUMNS = ("source", "seq", "row", "action", "reason", "data", "example", "file", "held")


class EncodeRows:
    """Ray Data actor: source rows to encoded pieces (one output row per piece, or per reject)."""

    def __init__(self, cfg: dict, model_path: str, configs: list, samples: int, fractions: list[float]) -> None:
        from keel.data.template import TextEncoder
        from keel.model.build import load_tokenizer

        self.cfg = from_plain(cfg)
        self.enc = TextEncoder(load_tokenizer(model_path, self.cfg.model.trust_remote_code))
        self.masking = [src.masking or self.cfg.masking.name for src in configs]
        self.samples = samples
        self.fractions = fractions  # per read task, the share of its rows held out for validation

    def __call__(self, batch: pa.Table) -> pa.Table:
        out: dict[str, list] = {k: [] for k in (*COLUMNS, "ids", "targets")}
        samples: dict[int, int] = {}
        for k, seq, row, raw in zip(*(batch.column(c).to_pylist() for c in ("source", "seq", "row", "raw"))):
            example = pickle.loads(raw)
            held = held_out(example, self.fractions[k])
            res = process_row(row, example, self.cfg, self.enc, self.masking[k])
            keep_example = res.example is not None and samples.get(k, 0) < self.samples
            samples[k] = samples.get(k, 0) + keep_example
            empty = np.zeros(0, np.int32)
            for j, (ids, targets) in enumerate(res.pieces or [(empty, empty)]):
                first = j == 0
                for c, v in zip(COLUMNS, (k, seq, row, res.action, res.reason,
                                          pickle.dumps(res.data) if first and res.reason is not None else None,
                                          pickle.dumps(res.example) if first and keep_example else None,
                                          res.file, held)):
                    out[c].append(v)
                out["ids"].append(ids)
                out["targets"].append(targets)
        types = (pa.int32(), pa.int64(), pa.int64(), pa.string(), pa.string(), pa.binary(), pa.binary(),
                 pa.string(), pa.bool_())
        return pa.table({**{c: pa.array(out[c], t) for c, t in zip(COLUMNS, types)},
                         "ids": _lists(out["ids"]), "targets": _lists(out["targets"])})


def _lists(arrays: list[np.ndarray]) -> pa.Array:
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum([len(a) for a in arrays], out=offsets[1:])
    values = np.concatenate(arrays).astype(np.int32) if arrays else np.zeros(0, np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def _pieces(column: pa.ChunkedArray | pa.Array) -> Iterator[np.ndarray]:
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offsets, values = arr.offsets.to_numpy(), arr.values.to_numpy(zero_copy_only=False)
    for lo, hi in zip(offsets[:-1], offsets[1:]):
        yield values[lo:hi]


def _results(batch: pa.Table) -> Iterator[tuple[int, RowResult, bool]]:
    """(source, RowResult, held out) back from an encoded block (output rows of the same source row merge)."""
    cols = {c: batch.column(c).to_pylist() for c in COLUMNS}
    current: RowResult | None = None
    key, held = None, False
    for n, (ids, targets) in enumerate(zip(_pieces(batch.column("ids")), _pieces(batch.column("targets")))):
        if (cols["source"][n], cols["seq"][n]) != key:
            if current is not None:
                yield key[0], current, held
            key, held = (cols["source"][n], cols["seq"][n]), cols["held"][n]
            raw_data, raw_example = cols["data"][n], cols["example"][n]
            current = RowResult(cols["row"][n], [], cols["action"][n], cols["reason"][n],
                                pickle.loads(raw_data) if raw_data is not None else None,
                                pickle.loads(raw_example) if raw_example is not None else None, cols["file"][n])
        if current.reason is None:
            current.pieces.append((ids, targets))
    if current is not None:
        yield key[0], current, held


def _source_data(name: str, work: Path, tag: str, rejects: RejectSink) -> SourceData:
    return SourceData(name, Column(work / f"{tag}.ids"), Column(work / f"{tag}.targets"), SourceRejects(rejects))


def encode_sources(configs: list, cfg: KeelConfig, model_path: str, work: Path, rejects: RejectSink,
                   procs: int) -> list[SourceData]:
    """Every source through one Ray Data pipeline into on-disk columns under ``work``; rejects stream to
    ``rejects``. Results come back in source and row order, so each source's rows keep their order; the
    sources' own validation rows (``val_path``/``val_split``) are read after all of them, as ``pipeline.build``
    reads them."""
    import ray
    import ray.data

    from keel.data import selfcheck

    sources = [_source_data(src.name, work, str(k), rejects) for k, src in enumerate(configs)]
    caps = ray.remote(num_cpus=0)(CapsReached).remote()
    for k, (src, data) in enumerate(zip(configs, sources)):
        if validates(src, cfg):
            data.val = _source_data(f"{src.name}/val", work, f"{k}.val", rejects)
    owners = [k for k, src in enumerate(configs) if validation_source(src) is not None]
    tasks = [*configs, *(validation_source(configs[k]) for k in owners)]
    fractions = [val_fraction(src, cfg) for src in configs] + [0.0] * len(owners)
    ds = ray.data.read_datasource(_datasource(tasks, cfg.data.seed, cfg.data.max_row_bytes, caps), num_cpus=0)
    ds = ds.map_batches(EncodeRows, batch_format="pyarrow", batch_size=None, num_cpus=1,
                        compute=ray.data.ActorPoolStrategy(size=procs),
                        fn_constructor_kwargs={"cfg": to_plain(cfg), "model_path": model_path, "configs": tasks,
                                               "samples": selfcheck.SAMPLE, "fractions": fractions})
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=2):
        for k, res, held in _results(batch):
            if k >= len(configs):  # a source's own validation rows
                sources[owners[k - len(configs)]].val.add(res, cfg, where(tasks[k]))
                continue
            cap = configs[k].cap
            if cap is not None and len(sources[k].input_ids) >= cap:
                continue  # the cap bounds what enters the mixture: rows past it count as unread (as in load_source)
            sources[k].add(res, cfg, where(configs[k]), held)
            if cap is not None and len(sources[k].input_ids) >= cap:
                caps.mark.remote(k)  # its reader stops at its next block
    for data in [*sources, *(s.val for s in sources if s.val is not None)]:
        data.input_ids.close()
        data.targets.close()
    return sources


def _save_layout(layout: Layout, path: Path) -> None:
    lens = np.fromiter(map(len, layout.rows), np.int64, len(layout.rows))
    ptr = np.zeros(len(lens) + 1, np.int64)
    np.cumsum(lens, out=ptr[1:])
    items = np.fromiter((i for b in layout.rows for i in b), np.int64, int(ptr[-1]))
    np.savez(path, picks=np.asarray(layout.picks, np.int64).reshape(-1, 2), ptr=ptr, items=items,
             width=np.int64(layout.width))


class WriteShards:
    """Ray Data actor: materialise shards of packed rows from the token columns and the saved layout."""

    def __init__(self, layout: str, columns: list[tuple[str, str, str]], out: str, max_len: int, pad: int) -> None:
        saved = np.load(layout)
        self.picks, self.ptr, self.items = saved["picks"], saved["ptr"], saved["items"]
        self.width = int(saved["width"])
        self.sources = [SourceData(name, Column.open(ids), Column.open(targets)) for name, ids, targets in columns]
        self.out, self.max_len, self.pad = out, max_len, pad

    def __call__(self, batch: dict) -> dict:
        from keel.data.pipeline import fill_rows, row_tokens

        tokens, trained = [], []
        for shard, lo, hi in zip(batch["shard"], batch["lo"], batch["hi"]):
            rows = [self.items[self.ptr[r]:self.ptr[r + 1]].tolist() for r in range(lo, hi)]
            part = Layout(self.picks, rows, self.width, [])
            arrays = fill_rows(part, self.sources, 0, len(rows), self.max_len, self.pad)
            write_shard(self.out, int(shard), arrays)
            tok, tr = row_tokens(arrays, len(self.sources))
            tokens.append(tok)
            trained.append(tr)
        return {"shard": batch["shard"], "tokens": tokens, "trained": trained}


def write_rows(layout: Layout, sources: list[SourceData], work: Path, out: Path, cfg: KeelConfig, pad: int,
               procs: int) -> tuple[int, np.ndarray, np.ndarray]:
    """Every row of the layout as Parquet shards in ``out``; returns the shard count and the rows' token counts."""
    import ray.data

    _save_layout(layout, work / "layout.npz")
    bounds = [(s, lo, min(lo + SHARD_ROWS, len(layout.rows))) for s, lo in enumerate(range(0, len(layout.rows),
                                                                                         SHARD_ROWS))]
    columns = [(s.name, str(s.input_ids.path), str(s.targets.path)) for s in sources]
    ds = ray.data.from_items([{"shard": s, "lo": lo, "hi": hi} for s, lo, hi in bounds])
    ds = ds.map_batches(WriteShards, batch_size=1, num_cpus=1,
                        compute=ray.data.ActorPoolStrategy(size=max(1, min(procs, len(bounds)))),
                        fn_constructor_kwargs={"layout": str(work / "layout.npz"), "columns": columns,
                                               "out": str(out), "max_len": cfg.packing.max_len, "pad": pad})
    done = sorted(ds.take_all(), key=lambda r: r["shard"])
    assert [r["shard"] for r in done] == list(range(len(bounds))), "a shard was not written"
    tokens = np.concatenate([np.asarray(r["tokens"]) for r in done]).reshape(-1, len(sources))
    trained = np.concatenate([np.asarray(r["trained"]) for r in done]).reshape(-1, len(sources))
    return len(bounds), tokens, trained


def _init_ray_data(cfg: KeelConfig, procs: int) -> None:
    """Join the configured Ray cluster, or start a local one with ``procs`` CPUs; Ray Data keeps row order."""
    import ray

    init_ray(cfg, local_cpus=procs)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # rows come back in source order: row numbers stay exact
    ctx.enable_progress_bars = False


def _summary(report: dict, configs: list) -> dict:
    """report.json's headline numbers per source, with the format it was read as (what format=auto chose)."""
    out = {}
    for src, (name, s) in zip(configs, report["sources"].items()):
        out[name] = {"format": source_format(src), "rows_read": s["rows_read"], "available": s["available"],
                     "examples": s["available"], "val_examples": s["val_examples"],
                     "rejected": s["rejected"], "truncated": s["truncated"], "split": s["split"], "tokens": s["tokens"],
                     "trained_tokens": s["trained_tokens"],
                     "trained_fraction": s["trained_tokens"] / s["tokens"] if s["tokens"] else 0.0}
    return out


def _write_validation(sources: list[SourceData], configs: list, cfg: KeelConfig, pad: int, out: Path,
                      report: dict) -> int:
    """The validation rows (as ``pipeline.build`` packs them) as ``val-NNNNN.parquet`` shards; their count."""
    val = validation_rows(sources, configs, cfg, pad)
    if val is None:
        return 0
    report["validation"] = val.report
    fields = ("input_ids", "targets", "position_ids", "seq_lens", "source_ids")
    starts = range(0, val.input_ids.shape[0], SHARD_ROWS)
    for s, lo in enumerate(starts):
        write_shard(out, s, {f: getattr(val, f)[lo:lo + SHARD_ROWS] for f in fields}, name=VAL_SHARD)
    return len(starts)


def preprocess(cfg: KeelConfig, out: Path, procs: int) -> dict:
    """Run the data path of ``cfg`` on Ray Data into ``out``; returns report.json's content."""
    from keel.data.template import TextEncoder
    from keel.mitigation import adjust_hook, configured, schedule_hook
    from keel.model.build import load_tokenizer, model_path

    plugins = configured(cfg)
    path = model_path(cfg)
    tokenizer = load_tokenizer(path, cfg.model.trust_remote_code)
    work = out / ".work"
    work.mkdir(parents=True)
    _init_ray_data(cfg, procs)
    configs = [*cfg.data.sources, *(src for p in plugins for src in p.extra_sources())]
    rejects = RejectSink(out / "rejects.jsonl")
    try:
        sources = encode_sources(configs, cfg, path, work, rejects, procs)
    finally:
        rejects.close()
    layout, notes = plan_sources(cfg, sources, configs, TextEncoder(tokenizer), adjust_hook(plugins),
                                 schedule_hook(plugins))
    shards, tokens, trained = write_rows(layout, sources, work, out, cfg, pad_id(tokenizer), procs)
    data_report = layout_report(sources, layout, tokens, trained, cfg)
    data_report["self_check"] = self_check_report(sources, notes)
    val_shards = _write_validation(sources, configs, cfg, pad_id(tokenizer), out, data_report)
    report = {"rows": len(layout.rows), "shards": shards, "shard_rows": SHARD_ROWS, "val_shards": val_shards,
              "source_names": [s.name for s in sources], "compat": compat(cfg, tokenizer),
              "packing_efficiency": data_report["packing_efficiency"], "sources": _summary(data_report, configs),
              "rejects_by_reason": {s.name: dict(rejects.by_source.get(s.name, {})) for s in sources},
              "val_rejects_by_reason": {s.name: dict(rejects.by_source.get(s.val.name, {})) for s in sources
                                        if s.val is not None},
              "data_report": data_report, "config": redact(to_plain(cfg))}
    (out / REPORT).write_text(json.dumps(report, indent=2, default=str))
    shutil.rmtree(work)
    return report
