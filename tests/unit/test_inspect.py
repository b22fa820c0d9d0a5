"""`keel inspect`: trained spans, rendering, per-source stats, the HTML/JSON report."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
from keel.data import encode
from keel.data import inspect as view
from keel.data.masking import IGNORE
from keel.data.pipeline import SourceData

CHAT = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "It is 4."},
        {"role": "user", "content": "And <b>3 & 3</b>?"}, {"role": "assistant", "content": "6, \"six\"."}]


def _shifted(messages: list[dict], tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Input ids and shifted targets, as ``pipeline.load_source`` stores them."""
    enc = encode(messages, tokenizer)
    labels = np.asarray(enc.labels)
    targets = np.full_like(labels, IGNORE)
    targets[:-1] = labels[1:]
    return np.asarray(enc.input_ids), targets


def test_trained_spans_follow_the_shift():
    ids = [10, 11, 12, 13, 14, 15]
    targets = [IGNORE, 12, 13, IGNORE, IGNORE, IGNORE]  # labels of positions 2 and 3
    assert view.trained_spans(ids, targets) == [(0, 2, False), (2, 4, True), (4, 6, False)]
    assert view.trained_spans([7, 8], [8, IGNORE]) == [(0, 1, False), (1, 2, True)]
    assert view.trained_spans([], []) == []


def test_terminal_marks_exactly_assistant_content_and_eot(tokenizer):
    ids, targets = _shifted(CHAT, tokenizer)
    text = view.render_terminal(tokenizer, ids, targets, color=False)
    assert re.findall(r"⟦(.*?)⟧", text, flags=re.S) == ["It is 4.<|eot_id|>", "6, \"six\".<|eot_id|>"]
    assert text.replace("⟦", "").replace("⟧", "") == tokenizer.decode(ids.tolist(), skip_special_tokens=False)
    coloured = view.render_terminal(tokenizer, ids, targets, color=True)
    assert f"{view.ANSI_TRAINED}It is 4.<|eot_id|>{view.ANSI_RESET}" in coloured and "⟦" not in coloured


def _source(tokenizer) -> SourceData:
    ids, targets = _shifted(CHAT, tokenizer)
    short_ids, short_targets = _shifted(CHAT[:2], tokenizer)
    rejects = [{"source": "s", "row": 3, "reason": "messages[1].content: empty", "data": {"x": "<y>"}},
               {"source": "s", "row": 7, "reason": "messages[2].content: empty", "data": {"x": 1}},
               {"source": "s", "row": 9, "reason": "messages: no assistant turn", "data": None}]
    return SourceData("s", [ids, short_ids], [targets, short_targets], rejects, rows_read=5)


def test_source_stats_counts(tokenizer):
    src = _source(tokenizer)
    st = view.source_stats(src)
    n_tokens = len(src.input_ids[0]) + len(src.input_ids[1])
    n_trained = sum(int((t != IGNORE).sum()) for t in src.targets)
    assert (st["examples"], st["rows_read"], st["rejected"]) == (2, 5, 3)
    assert (st["tokens"], st["trained_tokens"]) == (n_tokens, n_trained)
    assert st["trained_fraction"] == n_trained / n_tokens
    assert sum(b["count"] for b in st["length_histogram"]) == 2
    assert [(g["reason"], g["count"]) for g in st["rejects_by_reason"]] == [
        ("messages[N].content: empty", 2), ("messages: no assistant turn", 1)]
    assert [e["row"] for e in st["rejects_by_reason"][0]["examples"]] == [3, 7]
    json.dumps(st)  # machine-readable as is


def test_length_histogram_bins_cover_all_lengths():
    hist = view.length_histogram([1, 2, 3, 10], bins=3)
    assert hist == [{"lo": 1, "hi": 5, "count": 3}, {"lo": 5, "hi": 9, "count": 0}, {"lo": 9, "hi": 13, "count": 1}]
    assert view.length_histogram([5, 5], bins=10) == [{"lo": 5, "hi": 6, "count": 2}]
    assert view.length_histogram([]) == []


def test_html_escapes_text_and_shows_stats(tokenizer):
    src = _source(tokenizer)
    st = view.source_stats(src)
    examples = [view.render_html(tokenizer, src.input_ids[0], src.targets[0])]
    page = view.report_html("keel inspect", {"masking": "assistant_only"}, [view.source_html(st, examples)])
    assert "And &lt;b&gt;3 &amp; 3&lt;/b&gt;?" in page and "<b>3" not in page
    assert '<mark class="t">6, &quot;six&quot;.&lt;|eot_id|&gt;</mark>' in page
    assert f"<td class=num>{st['tokens']}</td>" in page and "messages[N].content: empty" in page
    assert "<svg" in page and "{&quot;x&quot;: &quot;&lt;y&gt;&quot;}" in page


def test_cli_writes_report(tmp_path):
    out = tmp_path / "report"
    cmd = [sys.executable, "-m", "keel.cli.main", "inspect", "--n", "2", "--no-color", "trainer.max_steps=1",
           "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("--- arithmetic example") == 2 and "⟦" in proc.stdout
    report = json.loads((out / "inspect.json").read_text())
    assert [s["name"] for s in report["sources"]] == ["arithmetic", "strings", "text"]
    assert all(s["examples"] > 0 and 0 < s["trained_fraction"] <= 1 for s in report["sources"])
    assert "<mark" in (out / "inspect.html").read_text()
    assert not (tmp_path / "outputs").exists()  # no Hydra run dir
