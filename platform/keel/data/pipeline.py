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

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from keel.data import selfcheck, tokenizer_eos
from keel.data.formats import validate
from keel.data.masking import IGNORE, apply_mask
from keel.data.mixing import Schedule, mixture_weights, sample_plan, segment_plans
from keel.data.packing import pack
from keel.data.sources import Reject, iter_source
from keel.data.template import TextEncoder, get_template, render_chat, render_text


@dataclass
class SourceData:
    """Encoded, valid examples of one source, plus its rejects."""

    name: str
    input_ids: list[np.ndarray] = field(default_factory=list)
    targets: list[np.ndarray] = field(default_factory=list)  # shifted: targets[i] = labels[i+1]
    rejects: list[dict] = field(default_factory=list)
    rows_read: int = 0
    truncated: int = 0  # over-length examples cut to packing.max_len (data.overlength=truncate)
    split: int = 0  # over-length examples split into several (data.overlength=split)
    samples: list = field(default_factory=list)  # (row, example, ids, targets) of the first kept chats: self-checks


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


def chat_messages(ex: dict, cfg: Any) -> list[dict]:
    """The messages a chat example is rendered from (``template.default_system`` added when it has none)."""
    messages = ex["messages"]
    if cfg.template.default_system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": cfg.template.default_system}] + messages
    return messages


def _encode_example(ex: dict, enc: TextEncoder, cfg: Any, masking: str) -> tuple[np.ndarray, np.ndarray]:
    tpl = get_template(cfg.template.name)
    if "text" in ex and "messages" not in ex:
        segs = render_text(ex["text"], enc, tpl, tokenizer_eos(enc._tok))
    else:
        segs = render_chat(chat_messages(ex, cfg), enc, tpl, ex.get("tools"))
    encoded = apply_mask(segs, masking, cfg.masking.train_eot)
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


def _split_chat(ex: dict, enc: TextEncoder, cfg: Any, masking: str) -> list[tuple[np.ndarray, np.ndarray]]:
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


def _fit(ex: dict, ids: np.ndarray, targets: np.ndarray, enc: TextEncoder, cfg: Any, masking: str) -> tuple:
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


def _row_pieces(row: Any, src: Any, cfg: Any, enc: TextEncoder, masking: str) -> tuple[list, str]:
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


def load_source(src: Any, cfg: Any, enc: TextEncoder) -> SourceData:
    """Validate and encode one source; every row is either kept or rejected with a reason."""
    out = SourceData(src.name)
    masking = src.masking or cfg.masking.name
    for row_no, row in iter_source(src, cfg.data.seed):
        if src.cap is not None and len(out.input_ids) >= src.cap:
            break  # the cap bounds what enters the mixture; unread rows are not rejects
        out.rows_read += 1
        try:
            pieces, action = _row_pieces(row, src, cfg, enc, masking)
        except (Reject, _OverLength) as err:
            where = src.path if src.kind == "file" else f"demo:{src.task}"
            if cfg.data.on_error == "raise":
                raise ValueError(f"data source {src.name!r} ({where}) row {row_no}: {err}") from None
            raw = err.data if isinstance(err, Reject) else row
            out.rejects.append({"source": src.name, "row": row_no, "reason": str(err), "data": raw})
            continue
        out.truncated += action == "truncated"
        out.split += action == "split"
        if action == "kept" and "messages" in row and len(out.samples) < selfcheck.SAMPLE:
            out.samples.append((row_no, {**row, "messages": chat_messages(row, cfg)}, *pieces[0]))
        for ids, targets in pieces:
            out.input_ids.append(ids)
            out.targets.append(targets)
    return out


def mean_lengths(sources: list[SourceData]) -> list[float]:
    """Mean encoded length of each source's examples (0 for an empty source)."""
    return [float(np.mean([len(x) for x in s.input_ids])) if s.input_ids else 0.0 for s in sources]


def rows_per_step(cfg: Any) -> int:
    """Packed rows in one optimizer step across all data-parallel ranks."""
    return cfg.cluster.num_workers * cfg.trainer.grad_accum * cfg.trainer.micro_batch_size


def _plan_bins(sources: list[SourceData], weights: list[float], cfg: Any, needed: int):
    sizes = [len(s.input_ids) for s in sources]
    mean_len = sum(w * np.mean([len(x) for x in s.input_ids]) for w, s in zip(weights, sources) if w > 0)
    total = math.ceil(needed * cfg.packing.max_len / mean_len * 1.05) + 16
    while True:
        plan = sample_plan(sizes, weights, total, cfg.data.seed)
        lengths = [len(sources[k].input_ids[i]) for k, i in plan]
        bins = pack(lengths, cfg.packing.max_len, strategy=cfg.packing.strategy, window=cfg.packing.window)
        if len(bins) >= needed:
            return plan, lengths, bins
        total = math.ceil(total * 1.25)


def segment_steps(cfg: Any) -> list[tuple[int, int]]:
    """Step ranges ``[lo, hi)`` of the schedule segments: ``mix.segments`` near-equal parts (each >= 1 step)."""
    steps = cfg.trainer.max_steps
    n = min(cfg.mix.segments, steps)
    return [(s * steps // n, (s + 1) * steps // n) for s in range(n)]


def _fit_prefix(lengths: list[int], rows: int, cfg: Any) -> tuple[int, list[list[int]]]:
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


def _plan_segments(sources: list[SourceData], seg_weights: list[list[float]], rows: list[int], cfg: Any):
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
        m, bins[s] = _fit_prefix([len(sources[k].input_ids[i]) for k, i in plan], rows[s], cfg)
        return m

    while True:
        plans = segment_plans(sizes, seg_weights, totals, cfg.data.seed, keep)
        short = [len(bins[s]) < r for s, r in enumerate(rows)]
        if not any(short):
            return plans, [bins[s] for s in range(len(rows))]
        totals = [math.ceil(t * 1.25) if sh else t for t, sh in zip(totals, short)]


def _static_rows(sources: list[SourceData], weights: list[float], cfg: Any, needed: int):
    """Plan, the ``needed`` bins used (in row order) and the widest bin, for a fixed mixture."""
    plan, _, bins = _plan_bins(sources, weights, cfg, needed)
    # Rows keep time order by window, shuffled (seeded) so a step is not all-long or all-short.
    order = np.random.default_rng(cfg.data.seed).permutation(len(bins))[:needed]
    return plan, [bins[b] for b in order], max(len(b) for b in bins)


def _scheduled_rows(sources: list[SourceData], schedule: Schedule, cfg: Any):
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


def source_weights(sources: list[SourceData], cfg: Any) -> list[float]:
    """Mixture weights p_k per the ``mix`` group (N_k counted in examples or tokens)."""
    if cfg.mix.name == "explicit":
        raw = [cfg.mix.weights[src.name] for src in cfg.data.sources]
        return [w / sum(raw) for w in raw]
    if cfg.mix.count == "tokens":
        sizes = [float(sum(len(x) for x in s.input_ids)) for s in sources]
    else:
        sizes = [float(len(s.input_ids)) for s in sources]
    quality = [src.quality if src.quality is not None else 1.0 for src in cfg.data.sources]
    return mixture_weights(sizes, T=cfg.mix.T, quality=quality)


def build_rows(sources: list[SourceData], cfg: Any, pad_id: int, weights: list[float] | None,
               schedule: Schedule | None = None) -> RowPlan:
    """Mix, pack and lay out exactly the rows ``trainer.max_steps`` steps will consume.

    ``weights`` is the fixed mixture; a non-static ``schedule`` replaces it (``weights`` unused).
    """
    usable = [s for s in sources if s.input_ids]
    if not usable:
        raise ValueError("no usable examples in any data source (see rejects.jsonl)")
    needed = cfg.trainer.max_steps * rows_per_step(cfg)
    if schedule is None:
        plan, used, D = _static_rows(sources, weights, cfg, needed)
    else:
        plan, used, D, seg_weights = _scheduled_rows(sources, schedule, cfg)
    L = cfg.packing.max_len
    arrays = {"input_ids": np.zeros((needed, L), np.int32), "targets": np.full((needed, L), IGNORE, np.int32),
              "position_ids": np.zeros((needed, L), np.int32), "seq_lens": np.zeros((needed, D), np.int32),
              "source_ids": np.full((needed, L), -1, np.int16)}
    for r, bin_items in enumerate(used):
        _fill_row(r, bin_items, plan, sources, arrays, pad_id)
    if schedule is None:
        report = _report(sources, weights, arrays, plan, used, L)
    else:
        sched = _schedule_report(sources, schedule, seg_weights, arrays, plan, used, cfg)
        report = _report(sources, sched.pop("expected"), arrays, plan, used, L)
        report["schedule"] = sched
    return RowPlan(source_names=[s.name for s in sources], report=report, **arrays)


def _schedule_report(sources, schedule: Schedule, seg_weights, arrays, plan, used, cfg) -> dict:
    """Mixture at start/end, and per segment its expected weights and realised example/token shares.

    ``expected`` is the mean of the segment mixtures weighted by the examples each segment
    contributes to the rows: what the overall example shares should match.
    """
    names = [s.name for s in sources]
    per_step = rows_per_step(cfg)
    segments, expected, n_items = [], np.zeros(len(sources)), 0
    for (lo, hi), w in zip(segment_steps(cfg), seg_weights):
        items = [i for b in used[lo * per_step:hi * per_step] for i in b]
        ex = np.bincount([plan[i][0] for i in items], minlength=len(sources))
        ids = arrays["source_ids"][lo * per_step:hi * per_step]
        tok = np.bincount(ids[ids >= 0].astype(np.int64), minlength=len(sources))
        segments.append({"steps": [lo, hi], "examples": len(items), "weights": dict(zip(names, w)),
                         "example_share": dict(zip(names, (ex / max(1, ex.sum())).tolist())),
                         "token_share": dict(zip(names, (tok / max(1, tok.sum())).tolist()))})
        expected += len(items) * np.asarray(w)
        n_items += len(items)
    return {"interpolation": schedule.interpolation,
            "points": [{"at": at, "weights": dict(zip(names, w))} for at, w in schedule.points],
            "start": dict(zip(names, schedule.mixture(0.0))), "end": dict(zip(names, schedule.mixture(1.0))),
            "segments": segments, "expected": (expected / max(1, n_items)).tolist()}


def _report(sources, weights, arrays, plan, used_bins, L) -> dict:
    used_items = [i for b in used_bins for i in b]
    examples = Counter(plan[i][0] for i in used_items)
    real = int(sum(len(sources[plan[i][0]].input_ids[plan[i][1]]) for i in used_items))
    tokens = {s.name: int((arrays["source_ids"] == k).sum()) for k, s in enumerate(sources)}
    trained = {s.name: int(((arrays["source_ids"] == k) & (arrays["targets"] != IGNORE)).sum())
               for k, s in enumerate(sources)}
    return {
        "rows": len(used_bins), "max_len": L, "real_tokens": real,
        "packing_efficiency": real / (len(used_bins) * L),
        "sources": {s.name: {"available": len(s.input_ids), "rows_read": s.rows_read,
                             "rejected": len(s.rejects), "truncated": s.truncated, "split": s.split,
                             "weight": weights[k],
                             "examples": examples.get(k, 0),
                             "example_share": examples.get(k, 0) / max(1, len(used_items)),
                             "epochs": examples.get(k, 0) / max(1, len(s.input_ids)),
                             "tokens": tokens[s.name], "trained_tokens": trained[s.name]}
                    for k, s in enumerate(sources)},
    }


def config_schedule(cfg: Any) -> Schedule:
    """``mix.schedule`` as a Schedule over ``data.sources`` (unnamed sources weigh 0 at a point)."""
    names = [src.name for src in cfg.data.sources]
    points = []
    for i, point in enumerate(cfg.mix.schedule):
        unknown = sorted(set(point.weights) - set(names))
        if unknown:
            raise ValueError(f"config error: mix.schedule[{i}].weights names unknown source {unknown[0]!r}; "
                             f"the data sources are {names}")
        points.append((point.at, tuple(float(point.weights.get(n, 0.0)) for n in names)))
    return Schedule(tuple(points), cfg.mix.interpolation)


def _mixture(cfg: Any, sources: list[SourceData], adjust: Any, schedule: Any) -> tuple:
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


def build(cfg: Any, tokenizer: Any, extra_sources: tuple = (), adjust: Any = None,
          schedule: Any = None) -> tuple[RowPlan, list[dict]]:
    """Run the data path for ``cfg``; returns the row plan and every rejected row.

    ``extra_sources`` (e.g. replay) join the mixture after the configured ones,
    ``adjust(weights, sources)`` turns the configured sources' weights into weights for all
    (applied to every point of ``mix.schedule``), and ``schedule(schedule, sources)`` may
    turn the resulting Schedule (one point for a fixed mixture) into a changing one.
    """
    enc = TextEncoder(tokenizer)
    sources = [load_source(src, cfg, enc) for src in [*cfg.data.sources, *extra_sources]]
    notes = _self_check(sources, [*cfg.data.sources, *extra_sources], enc, cfg)
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"config error: data source names must be unique, with the mitigation sources: {names}")
    weights, sched = _mixture(cfg, sources, adjust, schedule)
    assert weights is None or len(weights) == len(sources)
    rejects = [r for s in sources for r in s.rejects]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    plan = build_rows(sources, cfg, pad_id, weights, sched)
    plan.report["self_check"] = {"samples": {s.name: len(s.samples) for s in sources}, "notes": notes}
    return plan, rejects


def _self_check(sources: list[SourceData], configs: list, enc: TextEncoder, cfg: Any) -> list[str]:
    """keel.data.selfcheck on each source's sampled chats (ValueError on a mismatch); the notes to print."""
    template = get_template(cfg.template.name)
    compare, why = selfcheck.same_template(enc, template)
    for data, src in zip(sources, configs):
        samples = [(row, ex, *_unshift(ids, targets)) for row, ex, ids, targets in data.samples]
        selfcheck.check_source(data.name, samples, enc, template, src.masking or cfg.masking.name,
                               cfg.masking.train_eot, compare)
    return [selfcheck.not_same_note(cfg.template.name, why)] if why else []


def _unshift(ids: np.ndarray, targets: np.ndarray) -> tuple[list[int], list[int]]:
    """(input_ids, labels) back from the shifted targets the rows carry (labels[i + 1] = targets[i])."""
    labels = [IGNORE] + [int(t) for t in targets[:-1]]
    return [int(i) for i in ids], labels
