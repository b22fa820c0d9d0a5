"""What a run will train on: trained-token spans, per-source stats, terminal and HTML views.

Targets are shifted inside each example (``targets[i]`` is the label of position ``i + 1``),
so position ``p`` is trained exactly when ``targets[p - 1] != -100``; the first token of
an example is never trained. Everything here is pure: no Hydra, no Ray, no files.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from keel.data.masking import IGNORE

Span = tuple[int, int, bool]  # [start, end) token positions, trained or not

ANSI_TRAINED = "\x1b[1;30;42m"  # bold, black on green
ANSI_UNTRAINED = "\x1b[2m"  # dim
ANSI_RESET = "\x1b[0m"
OPEN, CLOSE = "⟦", "⟧"
REJECT_EXAMPLES = 3  # raw rows kept per reject reason
REJECT_DATA_CHARS = 400  # a kept raw row is cut to this many characters


# ---------------------------------------------------------------- spans and decoding


def trained_mask(targets: Sequence[int] | np.ndarray) -> np.ndarray:
    """Per-position trained flags of one example from its shifted targets."""
    tgt = np.asarray(targets)
    flags = np.zeros(len(tgt), dtype=bool)
    flags[1:] = tgt[:-1] != IGNORE
    return flags


def trained_spans(input_ids: Sequence[int] | np.ndarray, targets: Sequence[int] | np.ndarray) -> list[Span]:
    """Maximal runs ``(start, end, trained)`` of positions, covering ``input_ids`` in order."""
    if len(input_ids) != len(targets):
        raise ValueError(f"input_ids and targets differ in length: {len(input_ids)} != {len(targets)}")
    flags = trained_mask(targets)
    if len(flags) == 0:
        return []
    cuts = np.flatnonzero(flags[1:] != flags[:-1]) + 1
    starts = [0, *cuts.tolist()]
    ends = [*cuts.tolist(), len(flags)]
    return [(s, e, bool(flags[s])) for s, e in zip(starts, ends)]


def decode_spans(tokenizer: Any, input_ids: Sequence[int] | np.ndarray,
                 targets: Sequence[int] | np.ndarray) -> list[tuple[str, bool]]:
    """The text of each trained/untrained run, decoded run by run (special tokens shown)."""
    ids = [int(x) for x in input_ids]
    return [(tokenizer.decode(ids[s:e], skip_special_tokens=False, clean_up_tokenization_spaces=False), t)
            for s, e, t in trained_spans(ids, targets)]


# ---------------------------------------------------------------- rendering


def _ansi(text: str, style: str) -> str:
    """Style each line on its own, so colour never bleeds across a line break."""
    return "\n".join(f"{style}{line}{ANSI_RESET}" if line else "" for line in text.split("\n"))


def render_terminal(tokenizer: Any, input_ids: Sequence[int] | np.ndarray,
                    targets: Sequence[int] | np.ndarray, color: bool) -> str:
    """One example as text: trained runs coloured (ANSI) or wrapped in ⟦ ⟧ when ``color`` is off."""
    parts = []
    for text, trained in decode_spans(tokenizer, input_ids, targets):
        if color:
            parts.append(_ansi(text, ANSI_TRAINED if trained else ANSI_UNTRAINED))
        else:
            parts.append(f"{OPEN}{text}{CLOSE}" if trained else text)
    return "".join(parts)


def render_html(tokenizer: Any, input_ids: Sequence[int] | np.ndarray,
                targets: Sequence[int] | np.ndarray) -> str:
    """One example as an HTML ``<pre>``: trained runs in ``<mark>``, the rest dimmed, all escaped."""
    parts = []
    for text, trained in decode_spans(tokenizer, input_ids, targets):
        tag = "mark" if trained else "span"
        parts.append(f'<{tag} class="{"t" if trained else "u"}">{html.escape(text)}</{tag}>')
    return f'<pre class="example">{"".join(parts)}</pre>'


# ---------------------------------------------------------------- stats


def length_histogram(lengths: Sequence[int], bins: int = 10) -> list[dict]:
    """Equal-width integer bins ``{"lo", "hi", "count"}`` (``lo <= length < hi``) over ``lengths``."""
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    if len(lengths) == 0:
        return []
    arr = np.asarray(lengths, dtype=np.int64)
    lo, hi = int(arr.min()), int(arr.max())
    width = max(1, math.ceil((hi - lo + 1) / bins))
    n = math.ceil((hi - lo + 1) / width)
    counts = np.bincount((arr - lo) // width, minlength=n)
    return [{"lo": lo + k * width, "hi": lo + (k + 1) * width, "count": int(c)} for k, c in enumerate(counts)]


def reason_key(reason: str) -> str:
    """A reject reason with numbers blanked, so rows failing the same check group together."""
    return re.sub(r"\d+", "N", reason)[:160]


def _short(data: Any) -> str:
    """A reject's row for display, cut short; lone surrogates (why some rows are rejected) as ``\\udXXX``."""
    text = json.dumps(data, ensure_ascii=False, default=str)
    text = text if len(text) <= REJECT_DATA_CHARS else text[:REJECT_DATA_CHARS] + "…"
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def where_row(rej: dict) -> str:
    """``row N``, or ``FILE row N`` when the reject knows its file (rows are numbered per file)."""
    return f"{rej['file']} row {rej['row']}" if rej.get("file") else f"row {rej['row']}"


def rejects_by_reason(rejects: list[dict]) -> list[dict]:
    """Reject counts per reason (most frequent first), each with its first few rows."""
    groups: dict[str, dict] = {}
    for rej in rejects:
        group = groups.setdefault(reason_key(rej["reason"]), {"count": 0, "examples": []})
        group["count"] += 1
        if len(group["examples"]) < REJECT_EXAMPLES:
            where = {"file": rej["file"]} if rej.get("file") else {}
            group["examples"].append({**where, "row": rej["row"], "reason": rej["reason"],
                                      "data": _short(rej["data"])})
    ordered = sorted(groups.items(), key=lambda kv: -kv[1]["count"])
    return [{"reason": key, **group} for key, group in ordered]


def _percentile(arr: np.ndarray, q: float) -> float:
    return float(np.percentile(arr, q)) if len(arr) else 0.0


def source_stats(source: Any, bins: int = 10) -> dict:
    """Examples, tokens, trained fraction, length profile and rejects of one loaded source."""
    lengths = np.asarray([len(x) for x in source.input_ids], dtype=np.int64)
    trained = int(sum(int(trained_mask(t).sum()) for t in source.targets))
    tokens = int(lengths.sum())
    return {
        "name": source.name, "rows_read": source.rows_read, "examples": len(source.input_ids),
        "rejected": len(source.rejects), "tokens": tokens, "trained_tokens": trained,
        "val_examples": len(source.val.input_ids) if getattr(source, "val", None) is not None else 0,  # held out
        "trained_fraction": trained / tokens if tokens else 0.0,
        "length": {"min": int(lengths.min()) if len(lengths) else 0,
                   "mean": float(lengths.mean()) if len(lengths) else 0.0,
                   "p50": _percentile(lengths, 50), "p95": _percentile(lengths, 95),
                   "max": int(lengths.max()) if len(lengths) else 0},
        "length_histogram": length_histogram(lengths.tolist(), bins),
        "rejects_by_reason": rejects_by_reason(source.rejects),
    }


# ---------------------------------------------------------------- HTML report

CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:72em}
pre.example{white-space:pre-wrap;word-break:break-word;border:1px solid #ccc;padding:.6em;background:#fafafa}
mark.t{background:#b7f5b0;color:#000;font-weight:600}span.u{color:#777}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.2em .5em;text-align:left}
td.num{text-align:right}code.raw{white-space:pre-wrap;word-break:break-all;font-size:85%}"""


def _stats_table(stats: dict) -> str:
    length = stats["length"]
    rows = [("rows read", stats["rows_read"]), ("examples", stats["examples"]), ("rejected", stats["rejected"]),
            ("tokens", stats["tokens"]), ("trained tokens", stats["trained_tokens"]),
            ("trained fraction", f"{stats['trained_fraction']:.1%}"),
            ("length min / mean / p50 / p95 / max",
             f"{length['min']} / {length['mean']:.1f} / {length['p50']:.0f} / {length['p95']:.0f} / {length['max']}")]
    body = "".join(f"<tr><th>{html.escape(k)}</th><td class=num>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def histogram_svg(hist: list[dict], width: int = 480, height: int = 120) -> str:
    """Inline SVG bar chart of a length histogram (bars titled with their range and count)."""
    if not hist:
        return "<p>no examples</p>"
    top, bar_w = max(h["count"] for h in hist) or 1, width / len(hist)
    bars = []
    for k, h in enumerate(hist):
        bh = (height - 14) * h["count"] / top
        bars.append(f'<rect x="{k * bar_w + 1:.1f}" y="{height - 14 - bh:.1f}" width="{bar_w - 2:.1f}" '
                    f'height="{bh:.1f}" fill="#4a9"><title>{h["lo"]}–{h["hi"] - 1} tokens: {h["count"]}'
                    f"</title></rect>")
    axis = (f'<text x="0" y="{height - 2}" font-size="10">{hist[0]["lo"]}</text>'
            f'<text x="{width}" y="{height - 2}" font-size="10" text-anchor="end">{hist[-1]["hi"] - 1} tokens</text>')
    return f'<svg width="{width}" height="{height}" role="img">{"".join(bars)}{axis}</svg>'


def _rejects_html(groups: list[dict]) -> str:
    if not groups:
        return "<p>no rejects</p>"
    rows = []
    for g in groups:
        shown = "<br>".join(f"{html.escape(where_row(e))}: {html.escape(e['reason'])}<br><code class=raw>"
                            f"{html.escape(e['data'])}</code>" for e in g["examples"])
        rows.append(f"<tr><td>{html.escape(g['reason'])}</td><td class=num>{g['count']}</td><td>{shown}</td></tr>")
    return f"<table><tr><th>reason</th><th>count</th><th>first rows</th></tr>{''.join(rows)}</table>"


def source_html(stats: dict, examples_html: list[str]) -> str:
    """One source's section: stats table, length histogram, rejects, rendered examples."""
    return (f"<section><h2>{html.escape(stats['name'])}</h2>{_stats_table(stats)}"
            f"<h3>Length histogram (tokens per example)</h3>{histogram_svg(stats['length_histogram'])}"
            f"<h3>Rejects by reason</h3>{_rejects_html(stats['rejects_by_reason'])}"
            f"<h3>Examples ({len(examples_html)} shown)</h3>{''.join(examples_html)}</section>")


def report_html(title: str, summary: dict, sections: list[str]) -> str:
    """The whole ``inspect.html`` page: a run summary, then one section per source."""
    items = "".join(f"<li>{html.escape(str(k))}: <code>{html.escape(str(v))}</code></li>" for k, v in summary.items())
    legend = '<p>Legend: <mark class="t">trained tokens</mark> <span class="u">not trained</span></p>'
    return (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1><ul>{items}</ul>{legend}"
            f"{''.join(sections)}</body></html>\n")
