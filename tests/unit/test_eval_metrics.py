"""Evaluation diagnostics: diversity metrics by hand, perplexity against a hand loop, report helpers."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
from keel.eval.diversity import (
    distinct_n,
    diversity_report,
    length_stats,
    mode_collapse_warnings,
    repeated_ngram_rate,
)
from keel.eval.generate import split_example
from keel.eval.report import json_safe, usable_ks, write_report

# ---------------------------------------------------------------- diversity


def test_distinct_n_by_hand():
    texts = ["a b a b", "a c"]
    # unigrams: a b a b a c -> 3 unique / 6
    assert distinct_n(texts, 1) == pytest.approx(3 / 6)
    # bigrams: (a b) (b a) (a b) | (a c) -> 3 unique / 4
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)
    assert distinct_n(["a", ""], 2) == 0.0
    assert distinct_n([], 1) == 0.0
    with pytest.raises(ValueError, match="positive int"):
        distinct_n(texts, 0)


def test_repeated_ngram_rate_by_hand():
    # "a b a b a": bigrams (a b) (b a) (a b) (b a) -> the last two repeat: 2/4
    assert repeated_ngram_rate(["a b a b a"], n=2) == pytest.approx(0.5)
    # averaged over texts with at least one n-gram; "x" has none and is left out
    assert repeated_ngram_rate(["a b a b a", "c d e", "x"], n=2) == pytest.approx((0.5 + 0.0) / 2)
    # 4-grams, default n: "a b c d a b c d" -> 5 grams, the 5th (a b c d) repeats
    assert repeated_ngram_rate(["a b c d a b c d"]) == pytest.approx(1 / 5)
    assert repeated_ngram_rate(["short"]) == 0.0


def test_length_stats():
    stats = length_stats(["one", "one two", "one two three", "a b c d e f g h i j"])
    assert stats["count"] == 4
    assert stats["mean"] == pytest.approx((1 + 2 + 3 + 10) / 4)
    assert stats["p50"] == pytest.approx(2.5)  # linear interpolation, as numpy
    assert stats["p95"] == pytest.approx(3 + 0.85 * 7)
    assert stats["max"] == 10
    assert length_stats([])["count"] == 0


def test_diversity_report_and_entropy():
    report = diversity_report(["a b c", "a b d"], entropies=[1.0, 2.0, 3.0])
    assert report["distinct_2"] == pytest.approx(3 / 4)
    assert report["mean_entropy"] == pytest.approx(2.0)
    assert report["entropy_tokens"] == 3
    assert diversity_report(["a"])["mean_entropy"] is None


def test_mode_collapse_warnings():
    base = {"distinct_2": 0.8, "mean_entropy": 2.0}
    assert mode_collapse_warnings({"distinct_2": 0.7, "mean_entropy": 1.9}, base) == []
    warns = mode_collapse_warnings({"distinct_2": 0.4, "mean_entropy": 1.9}, base)
    assert len(warns) == 1 and "distinct_2" in warns[0] and "50%" in warns[0]
    warns = mode_collapse_warnings({"distinct_2": 0.4, "mean_entropy": 0.5}, base)
    assert len(warns) == 2
    # unmeasured entropy on either side is skipped, not an error
    assert mode_collapse_warnings({"distinct_2": 0.8, "mean_entropy": None}, base) == []
    with pytest.raises(ValueError, match="drop"):
        mode_collapse_warnings(base, base, drop=1.5)


# ---------------------------------------------------------------- report helpers


def test_split_example_uses_last_assistant_turn():
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
            {"role": "assistant", "content": "a2"}]
    prompt = split_example({"messages": msgs})
    assert prompt.reference == "a2"
    assert [m["content"] for m in prompt.messages] == ["s", "q1", "a1", "q2"]
    assert split_example({"text": "plain"}) is None
    assert split_example({"messages": [{"role": "assistant", "content": "a"}]}) is None


def test_usable_ks_and_json_safe(tmp_path):
    assert usable_ks([8, 1, 4, 4], 4) == ([1, 4], [8])
    with pytest.raises(ValueError, match="no k <= n"):
        usable_ks([8], 4)
    safe = json_safe({1: {"stderr": math.nan, "x": [math.inf, 0.5]}})
    assert safe == {"1": {"stderr": None, "x": [None, 0.5]}}
    path = write_report({"a": math.nan}, tmp_path / "r.json")
    assert json.loads(path.read_text()) == {"a": None}


# ---------------------------------------------------------------- perplexity


@pytest.fixture(scope="module")
def tiny_model(tiny_path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32).eval()


EXAMPLES = [
    "The quick brown fox jumps over the lazy dog.",
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}],
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour"},
                  {"role": "assistant", "content": "Blue, or perhaps a deep green like a forest in June."}]},
    "short",
]


def _hand_nll(model, tokenizer, examples, masking):
    """Sum of NLL / count, one unpadded example at a time, with an explicit log-softmax gather."""
    import torch
    from keel.data import encode

    total, count = 0.0, 0
    for ex in examples:
        msgs = ex["messages"] if isinstance(ex, dict) else ex
        enc = encode(msgs, tokenizer, template="llama3", masking=masking)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([enc.input_ids])).logits[0].double()
        logp = torch.log_softmax(logits, dim=-1)
        for pos in range(1, len(enc.labels)):
            if enc.labels[pos] != -100:
                total -= float(logp[pos - 1, enc.labels[pos]])
                count += 1
    return total / count, count


@pytest.mark.parametrize("masking", ["all_tokens", "assistant_only"])
def test_perplexity_matches_hand_loop(tiny_model, tokenizer, masking):
    from keel.eval.perplexity import perplexity

    examples = EXAMPLES if masking == "all_tokens" else EXAMPLES[1:3]
    want_nll, want_tokens = _hand_nll(tiny_model, tokenizer, examples, masking)
    got = perplexity(tiny_model, tokenizer, examples, masking=masking, batch_size=3)
    assert got["tokens"] == want_tokens and got["examples"] == len(examples)
    assert got["nll"] == pytest.approx(want_nll, abs=1e-5)
    assert got["ppl"] == pytest.approx(math.exp(want_nll), rel=1e-5)


def test_perplexity_no_trained_tokens_is_a_clear_error(tiny_model, tokenizer):
    from keel.eval.perplexity import perplexity

    with pytest.raises(ValueError, match="no trained tokens"):
        perplexity(tiny_model, tokenizer, ["plain text only"], masking="assistant_only")
    with pytest.raises(ValueError, match="unknown masking"):
        perplexity(tiny_model, tokenizer, ["x"], masking="everything")


def test_perplexity_of_uniform_logits_is_vocab_size(tokenizer):
    import torch
    from keel.eval.perplexity import perplexity

    vocab = len(tokenizer)  # targets must be valid class indices

    class Uniform(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None):
            return SimpleNamespace(logits=torch.zeros((*input_ids.shape, vocab)))

    got = perplexity(Uniform(), tokenizer, EXAMPLES, batch_size=2)
    assert got["ppl"] == pytest.approx(vocab, rel=1e-5)  # float32 log-softmax
    assert got["nll"] == pytest.approx(math.log(vocab), abs=1e-5)
