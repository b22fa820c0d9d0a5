"""Random conversations against every built-in template (hypothesis).

Invariants: the trained tokens decode to exactly the assistant contents plus end-of-turn;
no content string ever produces a real special token (the specials in the ids are exactly
the template's own markup); rendering never crashes on valid input.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from keel.data import encode
from keel.data.encoding import SPECIAL_TOKENS
from keel.data.masking import IGNORE
from keel.data.selfcheck import _expected_runs, same_text
from keel.data.template import BUILT_IN, TextEncoder, get_template

# Printable unicode (no lone surrogates), with special-token look-alikes mixed in.
TEXT = st.lists(st.one_of(st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=12),
                          st.sampled_from(SPECIAL_TOKENS + ("<|", "|>", "[/", "<end_of", "\n\n"))),
                max_size=5).map("".join)
NONEMPTY = TEXT.filter(lambda s: s.strip() != "")


@st.composite
def conversations(draw) -> list[dict]:
    msgs = [{"role": "system", "content": draw(NONEMPTY)}] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 10))):  # 2-20 turns
        msgs.append({"role": "user", "content": draw(NONEMPTY)})
        msgs.append({"role": "assistant", "content": draw(NONEMPTY)})
    return msgs


def _runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    runs, cur = [], []
    for tok, lab in zip(ids, labels):
        if lab != IGNORE:
            cur.append(tok)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


def _specials(ids: list[int], special_ids: set[int]) -> int:
    return sum(1 for t in ids if t in special_ids)


@pytest.mark.parametrize("name", sorted(BUILT_IN))
def test_random_conversations_train_exactly_the_answers(tokenizer, name):
    enc = TextEncoder(tokenizer)
    tpl = get_template(name)
    special_ids = {tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(conversations())
    def check(conv: list[dict]) -> None:
        out = encode(conv, enc, template=name)
        answers = _expected_runs(conv, tpl, "assistant_only", True)  # what the template writes per answer
        runs = [tokenizer.decode(r) for r in _runs(out.input_ids, out.labels)]
        # Adjacent trained runs can only merge if an answer follows an answer; never here.
        assert len(runs) == len(answers) and all(same_text(r, a) for r, a in zip(runs, answers)), (runs, answers)
        # Only the template's own markup makes special tokens: the same conversation with
        # plain contents has exactly as many.
        plain = [{**m, "content": "x"} for m in conv]
        assert _specials(out.input_ids, special_ids) == _specials(encode(plain, enc, template=name).input_ids,
                                                                  special_ids)

    check()


def test_tokenizer_template_equals_the_built_in_or_refuses(tokenizer):
    """template=tokenizer on the tiny tokenizer (a Llama-3 chat_template) == template=llama3,
    except that content holding special-token text is refused rather than encoded."""

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(conversations())
    def check(conv: list[dict]) -> None:
        try:
            theirs = encode(conv, tokenizer, template="tokenizer")
        except ValueError as err:
            assert "special-token text" in str(err)
            assert any(t in m["content"] for m in conv for t in SPECIAL_TOKENS)
            return
        ours = encode(conv, tokenizer, template="llama3")
        assert (theirs.input_ids, theirs.labels) == (ours.input_ids, ours.labels)

    check()
