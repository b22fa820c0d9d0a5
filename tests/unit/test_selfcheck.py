"""Start-up self-checks (keel.data.selfcheck): built-in template vs the tokenizer's, trained spans decode to answers."""

from __future__ import annotations

import copy

import pytest
from keel.data import encode, examples, pipeline, selfcheck
from keel.data.template import BUILT_IN, TextEncoder

from tests.conftest import compose

CHAT = {"messages": [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "2 + 3 = 5."},
                     {"role": "user", "content": "And times 2?"}, {"role": "assistant", "content": "5 * 2 = 10."}]}




def _sample(tok, example: dict, template: str = "llama3", masking: str = "assistant_only"):
    enc = encode(example["messages"], tok, template=template, masking=masking)
    return (7, example, enc.input_ids, enc.labels)


def test_demo_build_runs_the_checks_against_the_same_template(tokenizer):
    plan, _ = pipeline.build(compose("trainer.max_steps=2"), tokenizer)
    check = plan.report["self_check"]
    assert check["notes"] == []  # the tiny tokenizer carries the Llama 3 layout: every sample compared
    assert check["samples"] == {"arithmetic": selfcheck.SAMPLE, "strings": selfcheck.SAMPLE, "text": 0}


def test_another_template_is_a_note_not_an_error(tokenizer):
    plan, _ = pipeline.build(compose("trainer.max_steps=2", "template=chatml"), tokenizer)
    (note,) = plan.report["self_check"]["notes"]
    assert "not the built-in 'chatml'" in note and "first difference at token 0" in note


def test_a_rendering_difference_stops_with_a_diff(tokenizer):
    """A tokenizer whose template matches on the probe but does not trim contents: an answer with surrounding
    spaces renders differently, and the check names the source, the row and the first differing text."""
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = tok.chat_template.replace(" | trim", "")
    enc = TextEncoder(tok)
    same, why = selfcheck.same_template(enc, BUILT_IN["llama3"])
    assert same and why == ""
    padded = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  Hello  "}]}
    selfcheck.check_source("chat", [_sample(tok, CHAT)], enc, BUILT_IN["llama3"], "assistant_only", True, same)
    with pytest.raises(ValueError, match=r"data source 'chat' row 7 .*render it differently: first difference"):
        selfcheck.check_source("chat", [_sample(tok, padded)], enc, BUILT_IN["llama3"], "assistant_only", True, same)


@pytest.mark.parametrize("name", sorted(BUILT_IN))
@pytest.mark.parametrize("masking", ["assistant_only", "last_turn"])
def test_trained_spans_decode_to_the_answers(tokenizer, name, masking):
    enc = TextEncoder(tokenizer)
    row, example, ids, labels = _sample(tokenizer, CHAT, name, masking)
    assert selfcheck.check_example(example, ids, labels, enc, BUILT_IN[name], masking, True, False) is None
    shifted = [-100] + labels[:-1]  # an off-by-one mask: trains the token before each answer token
    failure = selfcheck.check_example(example, ids, shifted, enc, BUILT_IN[name], masking, True, False)
    assert failure and failure.startswith("the trained tokens decode to")


def test_train_eot_false_and_skipped_rows(tokenizer):
    enc = TextEncoder(tokenizer)
    ex = encode(CHAT["messages"], tokenizer, template="llama3", train_eot=False)
    assert selfcheck.check_example(CHAT, ex.input_ids, ex.labels, enc, BUILT_IN["llama3"], "assistant_only", False,
                                   True) is None
    tools = {**CHAT, "tools": [{"name": "f"}]}
    assert not selfcheck._checkable(tools) and not selfcheck._checkable({"text": "plain"})


def test_build_stops_on_a_broken_mask(tokenizer, monkeypatch):
    """If masking ever trained the wrong tokens, the run would stop before any worker starts."""
    from keel.data import masking

    real = masking.apply_mask

    def off_by_one(segs, mode, train_eot=True, train_reasoning=True):
        out = real(segs, mode, train_eot, train_reasoning)
        return masking.Encoded(out.input_ids, [-100] + out.labels[:-1])

    monkeypatch.setattr(examples, "apply_mask", off_by_one)
    with pytest.raises(ValueError, match=r"self-check failed: data source 'arithmetic' row 0 "):
        pipeline.build(compose("trainer.max_steps=2"), tokenizer)
