"""Examples of one source: every row validated, rendered, masked and fitted to ``packing.max_len``.

Each row becomes a ``RowResult``: its encoded pieces (one, or several when
``data.overlength=split``), or the reason it is rejected. ``SourceData`` collects the results of
a source in row order, whether they are computed here (``load_source``) or by parallel workers
(``keel preprocess``), so both paths keep and reject exactly the same rows.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import MutableSequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from keel.data import selfcheck, tokenizer_eos
from keel.data.encoding import TextEncoder
from keel.data.formats import validate
from keel.data.masking import IGNORE, apply_mask
from keel.data.sources import Reject, iter_source, validation_source
from keel.data.template import from_config, render_chat, render_text
from keel.errors import UserError

if TYPE_CHECKING:
    from keel.config import KeelConfig, SourceConfig


Piece = tuple[np.ndarray, np.ndarray]  # input ids, shifted targets (targets[i] = labels[i + 1])


@dataclass
class RowResult:
    """What one source row became: its pieces and action, or why it was rejected."""

    row: int
    pieces: list[Piece] = field(default_factory=list)
    action: str = "kept"  # kept | truncated | split | rejected
    reason: str | None = None  # why it was rejected
    data: Any = None  # the row a reject carries
    example: dict | None = None  # the canonical example of a chat kept whole (self-check samples)
    file: str | None = None  # the file a reader's or format's reject came from (rows are numbered per file)


@dataclass
class SourceData:
    """Encoded, valid examples of one source, plus its rejects.

    ``input_ids``/``targets`` are lists, or on-disk columns (``keel.data.disk_columns``) for sources too
    large to hold in memory; ``rejects`` likewise may be a file-backed sink.
    """

    name: str
    input_ids: MutableSequence = field(default_factory=list)
    targets: MutableSequence = field(default_factory=list)  # shifted: targets[i] = labels[i+1]
    rejects: MutableSequence = field(default_factory=list)
    rows_read: int = 0
    truncated: int = 0  # over-length examples cut to packing.max_len (data.overlength=truncate)
    split: int = 0  # over-length examples split into several (data.overlength=split)
    samples: list = field(default_factory=list)  # (row, example, ids, targets) of the first kept chats: self-checks
    _lengths: np.ndarray | None = field(default=None, repr=False, compare=False)  # of a list: planning reads it often
    val: SourceData | None = None  # its validation examples (data.val_fraction, val_path or val_split), never trained

    def lengths(self) -> np.ndarray:
        """Token count of every example."""
        own = getattr(self.input_ids, "lengths", None)
        if own is not None:
            return own()
        if self._lengths is None or len(self._lengths) != len(self.input_ids):  # examples are only ever appended
            self._lengths = np.fromiter(map(len, self.input_ids), np.int64, len(self.input_ids))
        return self._lengths

    def add(self, res: RowResult, cfg: KeelConfig, where: str, held_out: bool = False) -> None:
        """Record one row's result (``data.on_error=raise``: a reject is a UserError naming source and row);
        a ``held_out`` row's examples go to ``val``."""
        self.rows_read += 1
        if res.reason is not None:
            if cfg.data.on_error == "raise":
                raise UserError(f"data source {self.name!r} ({res.file or where}) row {res.row}: {res.reason}")
            where_from = {"file": res.file} if res.file else {}
            self.rejects.append({"source": self.name, **where_from, "row": res.row, "reason": res.reason,
                                 "data": res.data})
            return
        dest = self.val if held_out else self
        dest.truncated += res.action == "truncated"
        dest.split += res.action == "split"
        if res.example is not None and len(self.samples) < selfcheck.SAMPLE:
            self.samples.append((res.row, res.example, *res.pieces[0]))
        for ids, targets in res.pieces:
            dest.input_ids.append(ids)
            dest.targets.append(targets)


def held_out(row: Any, fraction: float) -> bool:
    """Whether a source row is a validation row: a hash of its canonical content below ``fraction``.

    The same row is on the same side in every run, at every world size and in every source that holds
    it (duplicates never straddle the split); rows a reader rejected are never held out.
    """
    if fraction <= 0 or not isinstance(row, dict):
        return False
    text = json.dumps(row, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") < fraction * 2**64


def val_fraction(src: SourceConfig, cfg: KeelConfig) -> float:
    """The share of ``src``'s rows held out: ``data.val_fraction`` unless the source has its own validation
    rows (``val_path``/``val_split``); 0 for the sources plugins add (replay, progressive)."""
    if validation_source(src) is not None or src.name not in {s.name for s in cfg.data.sources}:
        return 0.0
    return cfg.data.val_fraction


def where(src: SourceConfig) -> str:
    """How errors name a source's origin."""
    return src.path if src.kind == "file" else f"demo:{src.task}"


def chat_messages(ex: dict, cfg: KeelConfig) -> list[dict]:
    """The messages a chat example is rendered from (``template.default_system`` added when it has none)."""
    messages = ex["messages"]
    if cfg.template.default_system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": cfg.template.default_system}] + messages
    return messages


def _encode_example(ex: dict, enc: TextEncoder, cfg: KeelConfig, masking: str) -> tuple[np.ndarray, np.ndarray]:
    tpl = from_config(cfg.template)
    if "text" in ex and "messages" not in ex:
        segs = render_text(ex["text"], enc, tpl, tokenizer_eos(enc._tok))
    else:
        segs = render_chat(chat_messages(ex, cfg), enc, tpl, ex.get("tools"))
    encoded = apply_mask(segs, masking, cfg.masking.train_eot, cfg.masking.train_reasoning)
    ids = np.asarray(encoded.input_ids, dtype=np.int32)
    labels = np.asarray(encoded.labels, dtype=np.int32)
    # Shift inside the example so its first token is never the target of the previous one.
    targets = np.full_like(labels, IGNORE)
    targets[:-1] = labels[1:]
    return ids, targets


class _OverLength(Exception):
    """An example that cannot be made to fit under the overlength policy."""


def _truncate(ids: np.ndarray, targets: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    ids, targets = ids[:max_len].copy(), targets[:max_len].copy()
    targets[-1] = IGNORE  # its target was the first token cut off
    return ids, targets


def _turn_units(messages: list[dict]) -> tuple[list[dict], list[list[dict]]]:
    """Leading system message(s), and the turns grouped so each group ends with an assistant turn."""
    head = [m for m in messages[:1] if m["role"] == "system"]
    units, cur = [], []
    for m in messages[len(head):]:
        cur.append(m)
        if m["role"] == "assistant":
            units.append(cur)
            cur = []
    return head, units


def _split_chat(ex: dict, enc: TextEncoder, cfg: KeelConfig, masking: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """Split an over-length chat at turn boundaries into pieces that fit (greedy, in order)."""
    head, units = _turn_units(ex["messages"])
    pieces, start = [], 0
    while start < len(units):
        end, best = start, None
        while end < len(units):
            cand = _encode_example({**ex, "messages": head + sum(units[start:end + 1], [])}, enc, cfg, masking)
            if len(cand[0]) > cfg.packing.max_len:
                break
            best, end = cand, end + 1
        if best is None:
            raise _OverLength(f"over-length after splitting at turns: turn group {start} alone exceeds "
                              f"packing.max_len={cfg.packing.max_len}")
        pieces.append(best)
        start = end
    return pieces


def _fit(ex: dict, ids: np.ndarray, targets: np.ndarray, enc: TextEncoder, cfg: KeelConfig, masking: str) -> tuple:
    """Apply ``data.overlength``: (pieces, action) with action kept|truncated|split."""
    max_len, policy = cfg.packing.max_len, cfg.data.overlength
    if len(ids) <= max_len:
        return [(ids, targets)], "kept"
    if policy == "truncate" or (policy == "split" and "messages" not in ex):
        if policy == "split":  # plain text: consecutive windows
            return [_truncate(ids[i:], targets[i:], max_len) for i in range(0, len(ids), max_len)], "split"
        return [_truncate(ids, targets, max_len)], "truncated"
    if policy == "split":
        return _split_chat(ex, enc, cfg, masking), "split"
    raise _OverLength(f"over-length: {len(ids)} tokens > packing.max_len={max_len} (data.overlength=drop)")


def _row_pieces(row: Any, cfg: KeelConfig, enc: TextEncoder, masking: str) -> tuple[list[Piece], str]:
    """Encoded pieces of one row and the action taken; raises Reject or _OverLength with the reason."""
    if isinstance(row, Reject):
        raise row
    reason = validate(row)
    if reason is not None:
        raise Reject(reason, row)
    ids, targets = _encode_example(row, enc, cfg, masking)
    pieces, action = _fit(row, ids, targets, enc, cfg, masking)
    for _, t in pieces:
        trained = int((t != IGNORE).sum())
        if trained < cfg.masking.min_trained_tokens:
            raise Reject(f"too few trained tokens: {trained} < masking.min_trained_tokens", row)
    return pieces, action


def process_row(row_no: int, row: Any, cfg: KeelConfig, enc: TextEncoder, masking: str) -> RowResult:
    """Validate, encode and fit one row (a canonical example or a reader's Reject)."""
    try:
        pieces, action = _row_pieces(row, cfg, enc, masking)
    except (Reject, _OverLength) as err:
        return RowResult(row_no, action="rejected", reason=str(err),
                         data=err.data if isinstance(err, Reject) else row,
                         file=getattr(row, "file", None) if isinstance(row, Reject) else None)
    example = {**row, "messages": chat_messages(row, cfg)} if action == "kept" and "messages" in row else None
    return RowResult(row_no, pieces, action, example=example)


def validates(src: SourceConfig, cfg: KeelConfig) -> bool:
    """Whether ``src`` has validation rows (held out of it, or its own)."""
    return val_fraction(src, cfg) > 0 or validation_source(src) is not None


def load_source(src: SourceConfig, cfg: KeelConfig, enc: TextEncoder) -> SourceData:
    """Validate and encode one source; every row is either kept or rejected with a reason. With
    ``data.val_fraction`` the held-out rows' examples go to ``.val`` (``load_validation`` adds a
    ``val_path``/``val_split``'s)."""
    out = SourceData(src.name)
    if validates(src, cfg):
        out.val = SourceData(f"{src.name}/val")
    fraction = val_fraction(src, cfg)
    masking = src.masking or cfg.masking.name
    for row_no, row in iter_source(src, cfg.data.seed, cfg.data.max_row_bytes):
        if src.cap is not None and len(out.input_ids) >= src.cap:
            break  # the cap bounds what enters the mixture; unread rows are not rejects
        out.add(process_row(row_no, row, cfg, enc, masking), cfg, where(src), held_out(row, fraction))
    return out


def load_validation(src: SourceConfig, data: SourceData, cfg: KeelConfig, enc: TextEncoder) -> None:
    """Encode a source's own validation rows (``val_path`` or ``val_split``) into ``data.val``."""
    vsrc = validation_source(src)
    if vsrc is None:
        return
    masking = src.masking or cfg.masking.name
    for row_no, row in iter_source(vsrc, cfg.data.seed, cfg.data.max_row_bytes):
        data.val.add(process_row(row_no, row, cfg, enc, masking), cfg, where(vsrc))
