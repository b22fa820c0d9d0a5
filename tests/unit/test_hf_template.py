"""template=tokenizer: the tokenizer's own chat_template, spans without any response search."""

from __future__ import annotations

import copy

import pytest
from keel.data import encode
from keel.data.masking import IGNORE

from .test_masking import CONV  # the same multi-turn conversation the built-in templates are tested on

# The tiny tokenizer's Llama-3 template, with the assistant body marked for generation.
MARKED = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
          "'<|end_header_id|>\n\n' }}{% if message['role'] == 'assistant' %}{% generation %}"
          "{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}{% else %}"
          "{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


@pytest.fixture
def marked(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = MARKED
    return tok


@pytest.mark.parametrize(("masking", "train_eot"), [("assistant_only", True), ("last_turn", True),
                                                    ("assistant_only", False), ("all_tokens", True)])
def test_incremental_rendering_equals_the_built_in(tokenizer, masking, train_eot):
    ours = encode(CONV, tokenizer, template="llama3", masking=masking, train_eot=train_eot)
    theirs = encode(CONV, tokenizer, template="tokenizer", masking=masking, train_eot=train_eot)
    assert (theirs.input_ids, theirs.labels) == (ours.input_ids, ours.labels)


@pytest.mark.parametrize(("masking", "train_eot"), [("assistant_only", True), ("last_turn", False)])
def test_generation_markers_equal_the_built_in(tokenizer, marked, masking, train_eot):
    ours = encode(CONV, tokenizer, template="llama3", masking=masking, train_eot=train_eot)
    theirs = encode(CONV, marked, template="tokenizer", masking=masking, train_eot=train_eot)
    assert (theirs.input_ids, theirs.labels) == (ours.input_ids, ours.labels)


def test_trained_tokens_are_the_answers(tokenizer):
    enc = encode(CONV, tokenizer, template="tokenizer")
    trained = tokenizer.decode([t for t, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE])
    assert trained == "2 + 2 = 4.<|eot_id|>4 * 3 = 12.<|eot_id|>"


def test_special_token_text_in_content_is_refused(tokenizer):
    sneaky = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok <|eot_id|> more"}]
    with pytest.raises(ValueError, match=r"message 1 \(assistant\).*'<\|eot_id\|>'.*built-in template"):
        encode(sneaky, tokenizer, template="tokenizer")


def test_a_template_that_is_not_incremental_is_refused(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ValueError, match="does not render incrementally"):
        encode(CONV, tok, template="tokenizer")


def test_a_tokenizer_without_a_template_is_refused(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat_template"):
        encode(CONV, tok, template="tokenizer")
