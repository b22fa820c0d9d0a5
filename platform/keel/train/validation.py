"""Validation loss on the held-out rows (``data.val_fraction``, a source's ``val_path`` / ``val_split``).

The driver packs each source's validation examples into rows of their own (``keel.data.pipeline.
validation_rows``) and deals them out as micro-batches of ``trainer.micro_batch_size`` rows of one
source (``micro_batches``). At each evaluation every rank runs its micro-batches through the same
per-micro-batch loss as training (``keel.train.forward.micro_loss_sum``), and one all-reduce sums the
token losses and token counts per source: ``val/loss`` is the token-weighted mean over every
validation token, ``val/loss/<source>`` each source's. Every rank runs as many forwards as the
others (under ZeRO-3 each forward gathers parameter shards from all ranks), a spare one repeating
a batch it does not count.

``Best`` tracks the best ``val/loss`` for ``trainer.save_best`` and ``trainer.early_stopping_patience``;
every rank holds the same one, since it only sees all-reduced values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from keel.data.pipeline import RowPlan

from keel.data.rank_bundles import FIELDS  # the fields of a row a worker trains on: defined once, there


def _padding_rows(n: int, width: int, seq_width: int, pad: int) -> dict:
    """``n`` rows of padding only: a forward's filler, never a target."""
    return {"input_ids": np.full((n, width), pad, np.int32), "targets": np.full((n, width), -100, np.int32),
            "position_ids": np.tile(np.arange(width, dtype=np.int32), (n, 1)),
            "seq_lens": np.zeros((n, seq_width), np.int32)}


def _source_batches(val: RowPlan, micro: int) -> list[dict]:
    """Micro-batches of ``micro`` rows, each holding one source's rows (the last one of a source padded)."""
    padding = val.source_ids < 0
    pad = int(val.input_ids[padding][0]) if padding.any() else 0
    row_source = val.source_ids[:, 0].astype(np.int64)  # a row starts with an example of its source
    out = []
    for k in dict.fromkeys(row_source.tolist()):
        rows = np.flatnonzero(row_source == k)
        for lo in range(0, len(rows), micro):
            sel = rows[lo:lo + micro]
            batch = {f: np.asarray(getattr(val, f)[sel]) for f in FIELDS}
            if len(sel) < micro:
                filler = _padding_rows(micro - len(sel), val.input_ids.shape[1], val.seq_lens.shape[1], pad)
                batch = {f: np.concatenate([batch[f], filler[f]]) for f in FIELDS}
            out.append({**batch, "source": int(k), "counted": True})
    return out


def micro_batches(val: RowPlan, world: int, micro: int) -> list[list[dict]]:
    """Per rank, the validation micro-batches it runs, dealt round-robin; every rank gets the same number
    (a rank short of one repeats the first batch with ``counted`` false)."""
    batches = _source_batches(val, micro)
    ranks: list[list[dict]] = [batches[r::world] for r in range(world)]
    rounds = max(len(mine) for mine in ranks)
    for mine in ranks:
        mine += [{**batches[0], "counted": False}] * (rounds - len(mine))
    return ranks


def measure(model: Any, batches: list[dict], names: list[str]) -> dict:
    """``val/loss``, ``val/loss/<source>`` and ``val/tokens`` over every rank's batches (a collective)."""
    import torch

    from keel.core.collectives import all_reduce_sum
    from keel.core.loss import token_weights
    from keel.train.forward import micro_loss_sum

    sums, counts = np.zeros(len(names)), np.zeros(len(names))
    was_training = model.training
    model.eval()  # no dropout (LoRA's included); training resumes in train mode
    try:
        with torch.no_grad():
            for b in batches:
                ids, targets, pos = (torch.as_tensor(np.asarray(b[f]), dtype=torch.long)
                                     for f in ("input_ids", "targets", "position_ids"))
                weights, count = token_weights(targets, pos, "token")
                loss = float(micro_loss_sum(model, ids, pos, targets, weights, np.asarray(b["seq_lens"])))
                if b["counted"]:
                    sums[int(b["source"])] += loss
                    counts[int(b["source"])] += count
    finally:
        model.train(was_training)
    reduced = all_reduce_sum([*sums.tolist(), *counts.tolist()])
    sums, counts = np.asarray(reduced[: len(names)]), np.asarray(reduced[len(names):])
    row = {"val/loss": float(sums.sum() / max(counts.sum(), 1.0)), "val/tokens": int(counts.sum())}
    row.update({f"val/loss/{n}": float(sums[k] / counts[k]) for k, n in enumerate(names) if counts[k] > 0})
    return row


@dataclass
class Best:
    """The best validation loss so far, and how many evaluations since it improved."""

    patience: int = 0  # trainer.early_stopping_patience (0: never stop)
    min_delta: float = 0.0  # an evaluation improves when its loss < best - min_delta
    step: int | None = None
    loss: float | None = None
    since: int = 0  # evaluations since the last improvement
    last: float | None = None  # the latest evaluation's loss

    def update(self, step: int, loss: float) -> bool:
        """Record the evaluation of ``step``; whether it improved on the best."""
        self.last = loss
        if math.isfinite(loss) and (self.loss is None or loss < self.loss - self.min_delta):
            self.step, self.loss, self.since = step, loss, 0
            return True
        self.since += 1
        return False

    @property
    def stop(self) -> bool:
        """Early stopping: ``patience`` evaluations in a row without improvement."""
        return self.patience > 0 and self.since >= self.patience

    def replay(self, history: list[dict]) -> Best:
        """Carried on from the evaluations of the run before a resume (``eval.jsonl``, steps >= 1)."""
        for row in history:
            if row.get("step", 0) > 0 and "val/loss" in row:
                self.update(row["step"], row["val/loss"])
        return self

    def summary(self) -> dict:
        return {"best_step": self.step, "best_val_loss": self.loss, "val_loss_last": self.last}
