"""The whole data path for a run: sources -> encode -> mix -> pack -> per-step row plan.

The result is a pure function of (config, tokenizer): the same seed gives the same rows
in the same order, whatever the world size (rows are laid out step-major, and each
data-parallel rank takes a fixed slice of its step).

A mixture that changes over training (``mix=schedule``, or a plugin's ``schedule`` hook)
splits the steps into ``mix.segments`` consecutive segments; each is sampled at the
schedule's mean mixture over its steps, packed on its own and shuffled only within
itself, so every row belongs to one segment and lands in that segment's steps.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from keel.data import selfcheck
from keel.data.encoding import TextEncoder
from keel.data.examples import SourceData, chat_messages, load_source, load_validation, validates
from keel.data.masking import IGNORE
from keel.data.mixing import Schedule, mixture_weights, sample_plan, segment_plans
from keel.data.packing import pack
from keel.data.template import from_config
from keel.errors import ConfigError, UserError

if TYPE_CHECKING:
    from keel.config import KeelConfig, SourceConfig


__all__ = ["Layout", "RowPlan", "SourceData", "build", "chat_messages", "fill_rows", "layout_report",
           "load_source", "mean_lengths", "plan_sources", "row_tokens", "settle_length", "validation_rows"]


@dataclass
class RowPlan:
    """Packed rows in training order, and what they hold."""

    input_ids: np.ndarray  # [R, L] int32
    targets: np.ndarray  # [R, L] int32, -100 where not trained
    position_ids: np.ndarray  # [R, L] int32, restart at 0 per example (and for tail padding)
    seq_lens: np.ndarray  # [R, D] int32, example lengths per row, 0-padded
    source_ids: np.ndarray  # [R, L] int16, source of each token (-1 padding)
    source_names: list[str]
    report: dict
    val: RowPlan | None = None  # the validation rows (one source per row), when the run validates


def mean_lengths(sources: list[SourceData]) -> list[float]:
    """Mean encoded length of each source's examples (0 for an empty source)."""
    return [float(s.lengths().mean()) if len(s.input_ids) else 0.0 for s in sources]


def _pick_lengths(sources: list[SourceData], plan: list[tuple[int, int]]) -> list[int]:
    """Token count of each picked example."""
    lens = [s.lengths() for s in sources]
    return [int(lens[k][i]) for k, i in plan]


def rows_per_step(cfg: KeelConfig) -> int:
    """Packed rows in one optimizer step across all data-parallel ranks."""
    return cfg.cluster.num_workers * cfg.trainer.grad_accum * cfg.trainer.micro_batch_size


def _plan_bins(sources: list[SourceData], weights: list[float], cfg: KeelConfig, needed: int, seed: int | None = None):
    sizes = [len(s.input_ids) for s in sources]
    mean_len = sum(w * m for w, m in zip(weights, mean_lengths(sources)) if w > 0)
    total = math.ceil(needed * cfg.packing.max_len / mean_len * 1.05) + 16
    while True:
        plan = sample_plan(sizes, weights, total, cfg.data.seed if seed is None else seed)
        lengths = _pick_lengths(sources, plan)
        bins = pack(lengths, cfg.packing.max_len, strategy=cfg.packing.strategy, window=cfg.packing.window)
        if len(bins) >= needed:
            return plan, lengths, bins
        total = math.ceil(total * 1.25)


def segment_steps(cfg: KeelConfig) -> list[tuple[int, int]]:
    """Step ranges ``[lo, hi)`` of the schedule segments: ``mix.segments`` near-equal parts (each >= 1 step)."""
    steps = cfg.trainer.max_steps
    n = min(cfg.mix.segments, steps)
    return [(s * steps // n, (s + 1) * steps // n) for s in range(n)]


def _fit_prefix(lengths: list[int], rows: int, cfg: KeelConfig) -> tuple[int, list[list[int]]]:
    """The longest prefix of a segment's picks that packs into at most ``rows`` bins, and its bins."""
    memo: dict[int, list[list[int]]] = {}  # the search and the result read the same prefixes

    def packed(m: int) -> list[list[int]]:
        if m not in memo:
            memo[m] = pack(lengths[:m], cfg.packing.max_len, strategy=cfg.packing.strategy,
                           window=cfg.packing.window)
        return memo[m]

    bins = packed(len(lengths))
    if len(bins) <= rows:
        return len(lengths), bins  # all of it fits: the caller grows the segment if it is short
    lo, hi = 0, len(lengths)  # packed(lo) fits, packed(hi) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if len(packed(mid)) <= rows else (lo, mid)
    bins = packed(lo)
    if len(bins) < rows:  # one more pick re-packed into more than one extra bin (rare): drop its last bins
        return hi, packed(hi)[:rows]
    return lo, bins


def _plan_segments(sources: list[SourceData], seg_weights: list[list[float]], rows: list[int], cfg: KeelConfig):
    """Per segment, the kept picks and exactly ``rows[s]`` bins packed within the segment.

    Each segment keeps the longest prefix of its (evenly interleaved) picks that fills its
    rows, so it realises its mixture within a pick per source; the next segment's draws
    continue right after the kept picks.
    """
    sizes = [len(s.input_ids) for s in sources]
    means = mean_lengths(sources)
    L = cfg.packing.max_len
    totals = [math.ceil(r * L / sum(w * m for w, m in zip(ws, means)) * 1.1) + 8 for ws, r in zip(seg_weights, rows)]
    bins: dict[int, list[list[int]]] = {}

    def keep(s: int, plan: list) -> int:
        m, bins[s] = _fit_prefix(_pick_lengths(sources, plan), rows[s], cfg)
        return m

    while True:
        plans = segment_plans(sizes, seg_weights, totals, cfg.data.seed, keep)
        short = [len(bins[s]) < r for s, r in enumerate(rows)]
        if not any(short):
            return plans, [bins[s] for s in range(len(rows))]
        totals = [math.ceil(t * 1.25) if sh else t for t, sh in zip(totals, short)]


def _static_rows(sources: list[SourceData], weights: list[float], cfg: KeelConfig, needed: int):
    """Plan, the ``needed`` bins used (in row order) and the widest bin, for a fixed mixture."""
    plan, _, bins = _plan_bins(sources, weights, cfg, needed)
    # Rows keep time order by window, shuffled (seeded) so a step is not all-long or all-short.
    order = np.random.default_rng(cfg.data.seed).permutation(len(bins))[:needed]
    return plan, [bins[b] for b in order], max(len(b) for b in bins)


def _pack(sources: list[SourceData], plan: list[tuple[int, int]], cfg: KeelConfig) -> list[list[int]]:
    return pack(_pick_lengths(sources, plan), cfg.packing.max_len, strategy=cfg.packing.strategy,
                window=cfg.packing.window)


def _epoch_plan(sources: list[SourceData], weights: list[float], cfg: KeelConfig) -> tuple[list, list[list[int]], int]:
    """``trainer.epochs`` natural sizes of the task sources: their picks, the bins they pack into, and the
    steps those bins make (their count over the rows per step, rounded to the nearest, at least 1).

    The natural size is every example of ``data.sources`` once (the sources plugins add, replay and
    progressive, come on top at their weight): E epochs draw E x natural / (task weight) picks at the
    mixture, so the task sources together get E natural sizes and source k ``p_k x picks`` (its own
    epochs, reported). A source's picks run in passes without replacement.
    """
    natural = sum(len(s.input_ids) for s in sources[: len(cfg.data.sources)])
    task = sum(weights[: len(cfg.data.sources)])
    if natural == 0 or task == 0:
        raise UserError("trainer.epochs counts passes over data.sources, but none of them has usable examples "
                         "with a weight above 0 (see rejects.jsonl)")
    total = max(1, round(cfg.trainer.epochs * natural / task))
    plan = sample_plan([len(s.input_ids) for s in sources], weights, total, cfg.data.seed)
    bins = _pack(sources, plan, cfg)
    return plan, bins, max(1, round(len(bins) / rows_per_step(cfg)))


def _epoch_rows(sources: list[SourceData], weights: list[float], cfg: KeelConfig):
    """Like ``_static_rows`` for a run sized by ``trainer.epochs``: the steps, the plan, its rows, the widest.

    Rounding the steps down leaves a few bins out (chosen at random); rounding up fills the missing rows
    (fewer than half a step's) with examples drawn again at the mixture, from a seed of their own.
    """
    plan, bins, steps = _epoch_plan(sources, weights, cfg)
    needed = steps * rows_per_step(cfg)
    if needed > len(bins):
        fill_seed = int(np.random.SeedSequence([cfg.data.seed, 1]).generate_state(1)[0])
        extra, _, extra_bins = _plan_bins(sources, weights, cfg, needed - len(bins), seed=fill_seed)
        bins += [[len(plan) + i for i in b] for b in extra_bins[: needed - len(bins)]]
        plan += extra
    order = np.random.default_rng(cfg.data.seed).permutation(len(bins))[:needed]
    return steps, plan, [bins[b] for b in order], max(len(b) for b in bins)


def _scheduled_steps(sources: list[SourceData], schedule: Schedule, cfg: KeelConfig) -> int:
    """The steps in which a changing mixture draws ``trainer.epochs`` natural sizes of the task sources.

    Every segment has as many rows; one holds ``L x packing efficiency / mean length`` examples, of which
    the task sources' weight is theirs. So the task examples per row averaged over the segments, at the
    packing efficiency of the whole run's mean mixture, give the rows the epochs need.
    """
    plan, bins, _ = _epoch_plan(sources, schedule.mean(0.0, 1.0), cfg)
    L, task = cfg.packing.max_len, len(cfg.data.sources)
    efficiency = sum(_pick_lengths(sources, plan)) / (len(bins) * L)
    means, n = mean_lengths(sources), cfg.mix.segments
    per_row = np.mean([sum(w[:task]) / sum(wk * m for wk, m in zip(w, means))
                       for w in (schedule.mean(s / n, (s + 1) / n) for s in range(n))]) * L * efficiency
    natural = sum(len(s.input_ids) for s in sources[:task])
    return max(1, round(cfg.trainer.epochs * natural / per_row / rows_per_step(cfg)))


def with_steps(cfg: KeelConfig, steps: int) -> KeelConfig:
    """``cfg`` with the run's length fixed at ``steps`` (what a run sized by ``trainer.epochs`` trains)."""
    return dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, max_steps=steps, epochs=None))


def _scheduled_rows(sources: list[SourceData], schedule: Schedule, cfg: KeelConfig):
    """Like ``_static_rows`` per segment: segment s fills exactly the rows of its steps."""
    steps, per_step = cfg.trainer.max_steps, rows_per_step(cfg)
    segs = segment_steps(cfg)
    seg_weights = [schedule.mean(lo / steps, hi / steps) for lo, hi in segs]
    rows = [(hi - lo) * per_step for lo, hi in segs]
    plans, bins = _plan_segments(sources, seg_weights, rows, cfg)
    rng = np.random.default_rng(cfg.data.seed)
    plan, used = [], []
    for seg_plan, seg_bins in zip(plans, bins):
        # Shuffled within the segment only: its rows stay in its own steps.
        used += [[len(plan) + i for i in seg_bins[b]] for b in rng.permutation(len(seg_bins))]
        plan += seg_plan
    return plan, used, max(len(b) for seg_bins in bins for b in seg_bins), seg_weights


def _fill_row(r: int, bin_items: list[int], plan, sources, arrays: dict, pad_id: int) -> None:
    pos = 0
    for d, item in enumerate(bin_items):
        k, i = plan[item]
        ids, tgt = sources[k].input_ids[i], sources[k].targets[i]
        n = len(ids)
        arrays["input_ids"][r, pos:pos + n] = ids
        arrays["targets"][r, pos:pos + n] = tgt
        arrays["position_ids"][r, pos:pos + n] = np.arange(n)
        arrays["source_ids"][r, pos:pos + n] = k
        arrays["seq_lens"][r, d] = n
        pos += n
    tail = arrays["input_ids"].shape[1] - pos
    arrays["input_ids"][r, pos:] = pad_id
    # Tail padding is its own "example": it attends only to itself and is never a target.
    arrays["position_ids"][r, pos:] = np.arange(tail)


def source_weights(sources: list[SourceData], cfg: KeelConfig) -> list[float]:
    """Mixture weights p_k per the ``mix`` group (N_k counted in examples or tokens)."""
    if cfg.mix.name == "explicit":
        raw = [cfg.mix.weights[src.name] for src in cfg.data.sources]
        return [w / sum(raw) for w in raw]
    if cfg.mix.count == "tokens":
        sizes = [float(s.lengths().sum()) for s in sources]
    else:
        sizes = [float(len(s.input_ids)) for s in sources]
    quality = [src.quality if src.quality is not None else 1.0 for src in cfg.data.sources]
    return mixture_weights(sizes, T=cfg.mix.T, quality=quality)


@dataclass
class Layout:
    """Which picked examples fill each packed row, before any row is materialised."""

    picks: list[tuple[int, int]]  # (source, example index) of every picked example
    rows: list[list[int]]  # per row, in training order, the picks packed into it
    width: int  # the most examples in one row
    weights: list[float]  # the mixture the rows realise (expected, for a schedule)
    schedule: dict | None = None  # the schedule's report, for a changing mixture
    steps: int = 0  # the optimizer steps the rows make (trainer.max_steps, or what trainer.epochs came to)


def _require_examples(sources: list[SourceData]) -> None:
    if not any(len(s.input_ids) for s in sources):
        raise UserError("no usable examples in any data source (see rejects.jsonl)")


def plan_layout(sources: list[SourceData], cfg: KeelConfig, weights: list[float] | None,
                schedule: Schedule | None = None) -> Layout:
    """Mix and pack exactly the rows ``trainer.max_steps`` steps will consume (or, with ``trainer.epochs``,
    the steps that many epochs make: ``Layout.steps``).

    ``weights`` is the fixed mixture; a non-static ``schedule`` replaces it (``weights`` unused).
    """
    _require_examples(sources)
    if schedule is None and cfg.trainer.max_steps is None:
        steps, plan, used, width = _epoch_rows(sources, weights, cfg)
        return Layout(plan, used, width, list(weights), steps=steps)
    if schedule is None:
        plan, used, width = _static_rows(sources, weights, cfg, cfg.trainer.max_steps * rows_per_step(cfg))
        return Layout(plan, used, width, list(weights), steps=cfg.trainer.max_steps)
    if cfg.trainer.max_steps is None:
        cfg = with_steps(cfg, _scheduled_steps(sources, schedule, cfg))
    plan, used, width, seg_weights = _scheduled_rows(sources, schedule, cfg)
    sched = _schedule_report(sources, schedule, seg_weights, plan, used, cfg)
    return Layout(plan, used, width, sched.pop("expected"), sched, steps=cfg.trainer.max_steps)


def fill_rows(layout: Layout, sources: list[SourceData], lo: int, hi: int, max_len: int, pad_id: int) -> dict:
    """Rows ``[lo, hi)`` of the layout as arrays (input_ids, targets, position_ids, seq_lens, source_ids)."""
    n = hi - lo
    arrays = {"input_ids": np.zeros((n, max_len), np.int32), "targets": np.full((n, max_len), IGNORE, np.int32),
              "position_ids": np.zeros((n, max_len), np.int32), "seq_lens": np.zeros((n, layout.width), np.int32),
              "source_ids": np.full((n, max_len), -1, np.int16)}
    for r, bin_items in enumerate(layout.rows[lo:hi]):
        _fill_row(r, bin_items, layout.picks, sources, arrays, pad_id)
    return arrays


def row_tokens(arrays: dict, num_sources: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the real tokens and the trained tokens of each source: two [rows, sources] arrays."""
    src, trained = arrays["source_ids"], arrays["targets"] != IGNORE
    tokens = np.stack([(src == k).sum(axis=1) for k in range(num_sources)], axis=1)
    kept = np.stack([((src == k) & trained).sum(axis=1) for k in range(num_sources)], axis=1)
    return tokens.astype(np.int64), kept.astype(np.int64)


def layout_report(sources: list[SourceData], layout: Layout, tokens: np.ndarray, trained: np.ndarray,
                  cfg: KeelConfig) -> dict:
    """The data report: rows, packing efficiency, and per source what it has and what the rows hold.

    ``tokens``/``trained`` are ``row_tokens`` of every row, in order.
    """
    L = cfg.packing.max_len
    used_items = [i for b in layout.rows for i in b]
    examples = Counter(layout.picks[i][0] for i in used_items)
    real = int(tokens.sum())
    report = {
        "rows": len(layout.rows), "max_len": L, "real_tokens": real,
        "packing_efficiency": real / (len(layout.rows) * L),
        "length": _length_report(sources, layout, examples, cfg),
        "sources": {s.name: {"available": len(s.input_ids), "rows_read": s.rows_read,
                             "rejected": len(s.rejects), "truncated": s.truncated, "split": s.split,
                             "val_examples": len(s.val.input_ids) if s.val is not None else 0,
                             "weight": layout.weights[k],
                             "examples": examples.get(k, 0),
                             "example_share": examples.get(k, 0) / max(1, len(used_items)),
                             "epochs": examples.get(k, 0) / max(1, len(s.input_ids)),
                             "tokens": int(tokens[:, k].sum()), "trained_tokens": int(trained[:, k].sum())}
                    for k, s in enumerate(sources)},
    }
    if layout.schedule is not None:
        report["schedule"] = _with_token_shares(layout.schedule, tokens, cfg)
    return report


def _length_report(sources: list[SourceData], layout: Layout, examples: Counter, cfg: KeelConfig) -> dict:
    """The run's length: steps, rows per step, and the epochs over the task sources' natural size."""
    task = range(len(cfg.data.sources))
    natural = sum(len(sources[k].input_ids) for k in task)
    used = sum(examples.get(k, 0) for k in task)
    return {"steps": layout.steps, "rows_per_step": rows_per_step(cfg), "epochs_asked": cfg.trainer.epochs,
            "natural_size": natural, "epochs": used / max(1, natural)}


def settle_length(cfg: KeelConfig, report: dict) -> None:
    """Fix ``trainer.max_steps`` at the steps the data report planned (a run sized by ``trainer.epochs``):
    the workers, the LR schedule and the checkpoints see an ordinary ``max_steps`` run."""
    length = report.get("length")  # absent from a directory preprocessed before runs had epochs
    if cfg.trainer.max_steps is None:
        if length is None:
            raise UserError("trainer.epochs: this data report has no planned length; set trainer.max_steps")
        cfg.trainer.max_steps, cfg.trainer.epochs = length["steps"], None
    assert length is None or cfg.trainer.max_steps == length["steps"], (cfg.trainer.max_steps, length)


def _schedule_report(sources, schedule: Schedule, seg_weights, plan, used, cfg) -> dict:
    """Mixture at start/end, and per segment its expected weights and realised example shares.

    ``expected`` is the mean of the segment mixtures weighted by the examples each segment
    contributes to the rows: what the overall example shares should match. Token shares are
    added from the materialised rows (``_with_token_shares``).
    """
    names = [s.name for s in sources]
    per_step = rows_per_step(cfg)
    segments, expected, n_items = [], np.zeros(len(sources)), 0
    for (lo, hi), w in zip(segment_steps(cfg), seg_weights):
        items = [i for b in used[lo * per_step:hi * per_step] for i in b]
        ex = np.bincount([plan[i][0] for i in items], minlength=len(sources))
        segments.append({"steps": [lo, hi], "examples": len(items), "weights": dict(zip(names, w)),
                         "example_share": dict(zip(names, (ex / max(1, ex.sum())).tolist()))})
        expected += len(items) * np.asarray(w)
        n_items += len(items)
    return {"interpolation": schedule.interpolation,
            "points": [{"at": at, "weights": dict(zip(names, w))} for at, w in schedule.points],
            "start": dict(zip(names, schedule.mixture(0.0))), "end": dict(zip(names, schedule.mixture(1.0))),
            "segments": segments, "expected": (expected / max(1, n_items)).tolist()}


def _with_token_shares(sched: dict, tokens: np.ndarray, cfg: KeelConfig) -> dict:
    """The schedule report with each segment's realised token share per source."""
    per_step = rows_per_step(cfg)
    names = list(sched["start"])
    segments = []
    for seg in sched["segments"]:
        lo, hi = seg["steps"]
        tok = tokens[lo * per_step:hi * per_step].sum(axis=0)
        segments.append({**seg, "token_share": dict(zip(names, (tok / max(1, tok.sum())).tolist()))})
    return {**sched, "segments": segments}


def config_schedule(cfg: KeelConfig) -> Schedule:
    """``mix.schedule`` as a Schedule over ``data.sources`` (unnamed sources weigh 0 at a point)."""
    names = [src.name for src in cfg.data.sources]
    points = []
    for i, point in enumerate(cfg.mix.schedule):
        unknown = sorted(set(point.weights) - set(names))
        if unknown:
            raise ConfigError(f"config error: mix.schedule[{i}].weights names unknown source {unknown[0]!r}; "
                             f"the data sources are {names}")
        points.append((point.at, tuple(float(point.weights.get(n, 0.0)) for n in names)))
    return Schedule(tuple(points), cfg.mix.interpolation)


def _mixture(cfg: KeelConfig, sources: list[SourceData], adjust: Any, schedule: Any) -> tuple:
    """(weights, None) for a fixed mixture, or (None, schedule) when it changes over training."""
    if cfg.mix.name == "schedule":
        sched = config_schedule(cfg)
        if adjust is not None:  # plugins adjust every point (replay keeps its share throughout)
            sched = Schedule(tuple((at, tuple(adjust(list(w), sources))) for at, w in sched.points),
                             sched.interpolation)
        return None, sched if schedule is None else schedule(sched, sources)
    weights = source_weights(sources[: len(cfg.data.sources)], cfg)
    if adjust is not None:
        weights = adjust(weights, sources)
    if schedule is None:
        return weights, None
    fixed = Schedule(((0.0, tuple(weights)),))
    sched = schedule(fixed, sources)
    if sched is fixed:
        return weights, None  # no plugin changed it: exactly the fixed-mixture path
    return (list(sched.points[0][1]), None) if sched.static else (None, sched)


def pad_id(tokenizer: Any) -> int:
    """The id the rows' tail padding uses."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def plan_sources(cfg: KeelConfig, sources: list[SourceData], configs: list, enc: TextEncoder, adjust: Any = None,
                 schedule: Any = None) -> tuple[Layout, list[str]]:
    """Self-checks, the mixture and the row layout of loaded sources; returns the layout and the notes."""
    notes = _self_check(sources, configs, enc, cfg)
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ConfigError(f"config error: data source names must be unique, with the mitigation sources: {names}")
    _require_examples(sources)  # before the mixture, whose weights need a source with examples
    weights, sched = _mixture(cfg, sources, adjust, schedule)
    assert weights is None or len(weights) == len(sources)
    return plan_layout(sources, cfg, weights, sched), notes


def self_check_report(sources: list[SourceData], notes: list[str]) -> dict:
    """What ``data_report.json`` records of the start-up self-checks."""
    return {"samples": {s.name: len(s.samples) for s in sources}, "notes": notes}


def build(cfg: KeelConfig, tokenizer: Any, extra_sources: tuple = (), adjust: Any = None,
          schedule: Any = None) -> tuple[RowPlan, list[dict]]:
    """Run the data path for ``cfg``; returns the row plan and every rejected row.

    ``extra_sources`` (e.g. replay) join the mixture after the configured ones,
    ``adjust(weights, sources)`` turns the configured sources' weights into weights for all
    (applied to every point of ``mix.schedule``), and ``schedule(schedule, sources)`` may
    turn the resulting Schedule (one point for a fixed mixture) into a changing one.
    """
    enc = TextEncoder(tokenizer)
    configs = [*cfg.data.sources, *extra_sources]
    sources = [load_source(src, cfg, enc) for src in configs]
    for src, data in zip(configs, sources):  # after every training row, as keel preprocess reads them
        load_validation(src, data, cfg, enc)
    layout, notes = plan_sources(cfg, sources, configs, enc, adjust, schedule)
    arrays = fill_rows(layout, sources, 0, len(layout.rows), cfg.packing.max_len, pad_id(tokenizer))
    report = layout_report(sources, layout, *row_tokens(arrays, len(sources)), cfg)
    report["self_check"] = self_check_report(sources, notes)
    plan = RowPlan(source_names=[s.name for s in sources], report=report, **arrays)
    plan.val = validation_rows(sources, configs, cfg, pad_id(tokenizer))
    if plan.val is not None:
        report["validation"] = plan.val.report
    rejects = [r for s in sources for r in s.rejects]
    return plan, rejects + [r for s in sources if s.val is not None for r in s.val.rejects]  # as preprocess reads


def validation_rows(sources: list[SourceData], configs: list, cfg: KeelConfig, pad: int) -> RowPlan | None:
    """Each source's validation examples packed apart (a row holds one source's), in source order; None
    when no source validates. ``source_ids`` index ``sources``, as in the training rows."""
    if not any(validates(src, cfg) for src in configs):
        return None
    vals = [s.val if s.val is not None else SourceData(s.name) for s in sources]
    picks: list[tuple[int, int]] = []
    rows: list[list[int]] = []
    for k, data in enumerate(vals):
        for b in pack(data.lengths().tolist(), cfg.packing.max_len, strategy=cfg.packing.strategy,
                      window=cfg.packing.window) if len(data.input_ids) else []:
            rows.append([len(picks) + i for i in range(len(b))])
            picks += [(k, i) for i in b]
    if not rows:
        raise UserError("validation: no usable validation examples in any source (data.val_fraction="
                         f"{cfg.data.val_fraction}; see rejects.jsonl)")
    layout = Layout(picks, rows, max(len(r) for r in rows), [])
    arrays = fill_rows(layout, vals, 0, len(rows), cfg.packing.max_len, pad)
    tokens, trained = row_tokens(arrays, len(vals))
    report = {"rows": len(rows), "fraction": cfg.data.val_fraction,
              "sources": {s.name: {"from": _val_origin(src, cfg), "examples": len(v.input_ids),
                                   "rows_read": v.rows_read, "rejected": len(v.rejects),
                                   "tokens": int(tokens[:, k].sum()), "trained_tokens": int(trained[:, k].sum())}
                          for k, (s, src, v) in enumerate(zip(sources, configs, vals)) if validates(src, cfg)}}
    return RowPlan(source_names=[s.name for s in sources], report=report, **arrays)


def _val_origin(src: SourceConfig, cfg: KeelConfig) -> str:
    if getattr(src, "val_path", None):
        return f"val_path={src.val_path}"
    if getattr(src, "val_split", None):
        return f"val_split={src.val_split}"
    return f"data.val_fraction={cfg.data.val_fraction}"


def _self_check(sources: list[SourceData], configs: list, enc: TextEncoder, cfg: KeelConfig) -> list[str]:
    """keel.data.selfcheck on each source's sampled chats (UserError on a mismatch); the notes to print."""
    template = from_config(cfg.template)
    compare, why = selfcheck.same_template(enc, template)
    for data, src in zip(sources, configs):
        samples = [(row, ex, *_unshift(ids, targets)) for row, ex, ids, targets in data.samples]
        selfcheck.check_source(data.name, samples, enc, template, src.masking or cfg.masking.name,
                               cfg.masking.train_eot, compare, cfg.masking.train_reasoning)
    return [selfcheck.not_same_note(cfg.template.name, why)] if why else []


def _unshift(ids: np.ndarray, targets: np.ndarray) -> tuple[list[int], list[int]]:
    """(input_ids, labels) back from the shifted targets the rows carry (labels[i + 1] = targets[i])."""
    labels = [IGNORE] + [int(t) for t in targets[:-1]]
    return [int(i) for i in ids], labels
