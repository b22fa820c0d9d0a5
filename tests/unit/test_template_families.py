"""Each built-in template is token-identical to its model family's own chat template, served-style.

For every (template, family) pair, ``keel.data.encode(messages, tok, template=T).input_ids`` must equal
``tok(tok.apply_chat_template(messages, tokenize=False, chat_template=FAMILY), add_special_tokens=False)``:
the family's real Jinja template (tests/unit/fixtures/chat_templates, each naming its source) rendered
and tokenised the way inference servers do, by a tokenizer with the family's real pipeline
(tests/unit/family_tokenizers.py). Conversations with and without a system message, multi-turn,
contents with surrounding whitespace and newlines, unicode; and the trained tokens decode to exactly
what the template writes for each answer (its reasoning and end-of-turn included when trained).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from keel.data import encode
from keel.data.selfcheck import same_text, trained_runs
from keel.data.template import BUILT_IN, THINK, TextEncoder, render_pieces

from . import family_tokenizers

FIXTURES = Path(__file__).parent / "fixtures" / "chat_templates"
# template -> (family tokenizer, the family's chat template, whether it renders a system message in a
# conversation that ends with an answer: Gemma 2's refuses one; Mistral v0.3's writes it only into a
# final user turn, i.e. only in a served prompt, checked by test_mistral_system_prompt_is_where_served)
PAIRS = {"llama3": ("llama3", "llama3.jinja", True), "llama3.1": ("llama3", "llama3.1.jinja", True),
         "qwen2.5": ("qwen", "qwen2.5.jinja", True), "qwen3": ("qwen", "qwen3.jinja", True),
         "mistral": ("mistral", "mistral-v0.3.jinja", False), "gemma": ("gemma", "gemma2.jinja", False),
         "phi3": ("phi3", "phi3.jinja", True)}
WORDS = ["Hello", "world", "2 + 2 = 4.", "naïve café", "東京", "🙂", "x = [1, 2]", "def f():\n    return 1",
         "<think>", "</think>", "<tool_call>", "\n", "\n\n", " ", "  ", "\t", "a\r\nb"]


@pytest.fixture(scope="module")
def families() -> dict:
    return {name: build() for name, build in family_tokenizers.BUILDERS.items()}


def _theirs(tok, template_file: str, messages: list[dict]) -> list[int]:
    text = tok.apply_chat_template(messages, tokenize=False, chat_template=(FIXTURES / template_file).read_text())
    return tok(text, add_special_tokens=False)["input_ids"]


def _text(rng: random.Random) -> str:
    body = "".join(rng.choice(WORDS) + rng.choice(["", " ", "\n"]) for _ in range(rng.randint(1, 6)))
    edge = ["", " ", "\n", "  \n", "\n\n"]
    text = rng.choice(edge) + body + rng.choice(edge)
    return text if text.strip() else "ok"


def _conversation(rng: random.Random, system: bool, reasoning: bool) -> list[dict]:
    msgs = [{"role": "system", "content": _text(rng)}] if system else []
    for _ in range(rng.randint(1, 4)):
        msgs.append({"role": "user", "content": _text(rng)})
        answer = {"role": "assistant", "content": _text(rng)}
        if reasoning and rng.random() < 0.6:
            answer["reasoning_content"] = _text(rng)
        msgs.append(answer)
    return msgs


def conversations(template: str, n: int = 30, seed: int = 0, system: bool | None = None) -> list[list[dict]]:
    """``n`` conversations with a system message (where the family renders one) and ``n`` without."""
    rng = random.Random(seed)
    systems = ((True, False) if PAIRS[template][2] else (False,)) if system is None else (system,)
    return [_conversation(rng, s, template == "qwen3") for s in systems for _ in range(n)]


def expected_runs(messages: list[dict], template: str, train_reasoning: bool) -> list[str]:
    """What each assistant answer's trained tokens must decode to: the text the template writes for it."""
    runs: dict[int, str] = {}
    for p in render_pieces(messages, BUILT_IN[template]):
        if p.role == "assistant" and (p.kind in ("content", "eot") or (p.kind == "reasoning" and train_reasoning)):
            runs[p.message] = runs.get(p.message, "") + p.text
    return list(runs.values())


@pytest.mark.parametrize("template", sorted(PAIRS))
def test_token_identical_to_the_family_template(families, template):
    family, fixture, _ = PAIRS[template]
    tok = families[family]
    enc = TextEncoder(tok)
    convs = conversations(template)
    same = sum(encode(c, enc, template=template).input_ids == _theirs(tok, fixture, c) for c in convs)
    assert same == len(convs), f"{template}: {same} of {len(convs)} token-identical"


@pytest.mark.parametrize("template", sorted(PAIRS))
@pytest.mark.parametrize("train_reasoning", [True, False])
def test_trained_tokens_decode_to_the_answers(families, template, train_reasoning):
    tok = families[PAIRS[template][0]]
    enc = TextEncoder(tok)
    for conv in conversations(template, n=10, seed=1):
        out = encode(conv, enc, template=template, train_reasoning=train_reasoning)
        got = [tok.decode(r, clean_up_tokenization_spaces=False) for r in trained_runs(out.input_ids, out.labels)]
        want = expected_runs(conv, template, train_reasoning)
        assert len(got) == len(want) and all(same_text(g, w) for g, w in zip(got, want)), (got, want)


TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20).filter(lambda s: s.strip() != "")


@st.composite
def fuzzed(draw, system: bool) -> list[dict]:
    msgs = [{"role": "system", "content": draw(TEXT)}] if system and draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 3))):
        msgs += [{"role": "user", "content": draw(TEXT)}, {"role": "assistant", "content": draw(TEXT)}]
    return msgs


@pytest.mark.parametrize("template", sorted(PAIRS))
def test_random_unicode_conversations_are_token_identical(families, template):
    family, fixture, system = PAIRS[template]
    tok = families[family]
    enc = TextEncoder(tok)
    specials = [t for t in tok.all_special_tokens if t]

    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(fuzzed(system))
    def check(conv: list[dict]) -> None:
        if any(t in m["content"] for m in conv for t in specials):
            return  # served, special-token text becomes a control token; Keel keeps it text (by design)
        assert encode(conv, enc, template=template).input_ids == _theirs(tok, fixture, conv)

    check()


def test_qwen3_reasoning_is_rendered_where_qwen3_renders_it(families):
    """The final answer after the last user query gets a think block (empty without reasoning); earlier
    answers lose theirs, as Qwen3's template writes them; reasoning inside the content is split out."""
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello", "reasoning_content": "greet"},
            {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>\nadd\n</think>\n\n4"}]
    text = "".join(p.text for p in render_pieces(conv, BUILT_IN["qwen3"]))
    assert text == ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\n"
                    "2+2?<|im_end|>\n<|im_start|>assistant\n" + THINK[0] + "add" + THINK[1] + "4<|im_end|>\n")
    tok = families["qwen"]
    assert encode(conv, tok, template="qwen3").input_ids == _theirs(tok, "qwen3.jinja", conv)


def test_mistral_system_prompt_is_where_served(families):
    """With a system message, every answer's prompt is token-identical to the prompt Mistral v0.3's template
    serves for it (the system prompt opens the last user turn before it)."""
    tok = families["mistral"]
    enc = TextEncoder(tok)
    source = (FIXTURES / "mistral-v0.3.jinja").read_text()
    for conv in conversations("mistral", system=True):
        ids = encode(conv, enc, template="mistral").input_ids
        served = tok(tok.apply_chat_template(conv[:-1], tokenize=False, add_generation_prompt=True,
                                             chat_template=source), add_special_tokens=False)["input_ids"]
        assert ids[: len(served)] == served
