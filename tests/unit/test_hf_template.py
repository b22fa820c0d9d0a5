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


# ---------------------------------------------------------------- reasoning, template=jinja, non-incremental
from pathlib import Path  # noqa: E402

from keel.data.template import BUILT_IN, render_chat  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "chat_templates"
REASONED = [{"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": "4.", "reasoning_content": "Two plus two."},
            {"role": "user", "content": "And times 3?"},
            {"role": "assistant", "content": "12.", "reasoning_content": "Four times three."}]


def _trained_text(tok, enc) -> str:
    return tok.decode([t for t, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE])


def test_qwen3_trains_the_reasoning_and_the_content(tokenizer):
    """Done-when of issue 18 item 6: encode(..., template="qwen3") trains reasoning_content and content."""
    enc = encode(REASONED, tokenizer, template="qwen3", masking="last_turn")
    assert _trained_text(tokenizer, enc) == "<think>\nFour times three.\n</think>\n\n12.<|im_end|>"
    enc = encode(REASONED, tokenizer, template="qwen3", masking="last_turn", train_reasoning=False)
    assert _trained_text(tokenizer, enc) == "12.<|im_end|>"


def test_text_rendering_of_reasoning_for_templates_without_markup(tokenizer):
    enc = encode(REASONED, tokenizer, template="llama3")
    assert _trained_text(tokenizer, enc) == ("<think>\nTwo plus two.\n</think>\n\n4.<|eot_id|>"
                                             "<think>\nFour times three.\n</think>\n\n12.<|eot_id|>")


@pytest.mark.parametrize(("fixture", "built_in"), [("qwen3.jinja", "qwen3"), ("phi3.jinja", "phi3")])
@pytest.mark.parametrize("train_reasoning", [True, False])
def test_jinja_file_that_is_not_incremental_equals_the_built_in(tokenizer, fixture, built_in, train_reasoning):
    """Qwen3's template drops earlier reasoning and Phi-3's ends with eos: neither renders incrementally, so
    their spans are located in one rendering; ids and labels equal the built-in's."""
    from . import family_tokenizers

    path = str(FIXTURES / fixture)
    if built_in == "phi3":  # its template ends with eos_token: Phi-3's is <|endoftext|>, as the built-in writes
        tokenizer = family_tokenizers.phi3()
    for conv in (CONV, REASONED) if built_in == "qwen3" else (CONV,):  # Phi-3's template ignores reasoning
        ours = encode(conv, tokenizer, template=built_in, train_reasoning=train_reasoning)
        theirs = encode(conv, tokenizer, template="jinja", template_path=path, train_reasoning=train_reasoning)
        assert (theirs.input_ids, theirs.labels) == (ours.input_ids, ours.labels)


def test_tokenizer_template_qwen3_is_located_not_refused(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = (FIXTURES / "qwen3.jinja").read_text()
    enc = encode(REASONED, tok, template="tokenizer")
    assert (enc.input_ids, enc.labels) == astuple(encode(REASONED, tokenizer, template="qwen3"))


def astuple(enc) -> tuple:
    return enc.input_ids, enc.labels


def test_jinja_errors_name_the_file(tokenizer, tmp_path):
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}{{ m['content'] }")
    with pytest.raises(ValueError, match=r"template=jinja \(.*bad.jinja\): rendering failed"):
        encode(CONV, tokenizer, template="jinja", template_path=str(bad))
    with pytest.raises(ValueError, match="cannot read the Jinja chat template"):
        encode(CONV, tokenizer, template="jinja", template_path=str(tmp_path / "missing.jinja"))
    counting = tmp_path / "count.jinja"
    counting.write_text("{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(ValueError, match=r"count.jinja\): the chat template does not render incrementally .*"
                                         r"cannot be located in one rendering \(the generation prompt"):
        encode(CONV, tokenizer, template="jinja", template_path=str(counting))


def test_every_built_in_renders_through_render_chat(tokenizer):
    from keel.data.template import TextEncoder

    enc = TextEncoder(tokenizer)
    for name, tpl in BUILT_IN.items():
        assert render_chat(REASONED, enc, tpl), name
