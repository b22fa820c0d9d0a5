"""``template=tokenizer``: render with the tokenizer's own Jinja ``chat_template``.

Message spans come from the template itself, never from searching the tokens for a response
string: with ``{% generation %}`` markers, from Transformers' assistant-token mask; otherwise
from incremental rendering, where message ``i`` is what rendering ``messages[:i+1]`` adds to
rendering ``messages[:i]``, and an assistant's header is what ``add_generation_prompt`` adds.
Each prefix must be preserved and no token may straddle a span boundary; if not, the error
says so and suggests a built-in template.
"""

from __future__ import annotations

import functools
import re
from typing import Any

from keel.data.template import Segment

GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")
BUILT_IN_HINT = "use a built-in template instead (template=llama3|chatml|mistral|gemma|phi3)"


def _render(tok: Any, messages: list[dict], tools: list | None, generation_prompt: bool = False) -> str:
    return tok.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt)


def template_ids(tok: Any, messages: list[dict], tools: list | None = None,
                 generation_prompt: bool = False) -> list[int]:
    """Token ids of the tokenizer's own rendering (the template writes bos itself, so none is added)."""
    return tok(_render(tok, messages, tools, generation_prompt), add_special_tokens=False)["input_ids"]


@functools.lru_cache(maxsize=16)
def _special_tokens(tok: Any) -> tuple[tuple[str, ...], frozenset[int]]:
    """The tokenizer's special and added tokens, as text and as ids (computed once per tokenizer,
    not per example: ``get_added_vocab`` builds a new dict on every call)."""
    added = tok.get_added_vocab()
    texts = tuple(t for t in set(tok.all_special_tokens) | set(added) if t)
    return texts, frozenset(tok.all_special_ids) | frozenset(added.values())


def _refuse_lookalikes(messages: list[dict], tok: Any) -> None:
    """The rendered text is tokenised whole, so special-token text in content would become real."""
    specials = _special_tokens(tok)[0]
    for i, m in enumerate(messages):
        hit = next((t for t in specials if t in m.get("content", "")), None)
        if hit:
            raise ValueError(f"template=tokenizer cannot safely encode message {i} ({m['role']}): its content "
                             f"contains the special-token text {hit!r}; {BUILT_IN_HINT}")


def _checked_prefix(prev: str, text: str, what: str) -> None:
    if not text.startswith(prev):
        raise ValueError(f"template=tokenizer: the chat template does not render incrementally ({what} changes "
                         f"the text before it), so message spans are unknown; {BUILT_IN_HINT}")


Span = tuple[int, str, int, int, int, int]  # message, role, start, body start, body end, chunk end


def _spans(messages: list[dict], tok: Any, tools: list | None, full: str) -> list[Span]:
    """Character spans of every message in the full rendering."""
    out, prev = [], ""
    for i, m in enumerate(messages):
        text = _render(tok, messages[: i + 1], tools)
        _checked_prefix(prev, text, f"message {i}")
        _checked_prefix(text, full, f"message {i + 1}")
        body, hi = len(prev), len(text)
        if m["role"] == "assistant":
            prompt = _render(tok, messages[:i], tools, generation_prompt=True) if i else ""
            _checked_prefix(prev, prompt, f"the generation prompt before message {i}")
            _checked_prefix(prompt, text, f"message {i} after its generation prompt")
            body, hi = len(prompt), len(text.rstrip())  # trailing separator whitespace is not trained
        out.append((i, m["role"], len(prev), body, hi, len(text)))
        prev = text
    return out


def _segment_of(start: int, end: int, spans: list[Span]) -> tuple[str, str, int]:
    """(role, kind, message) of the token at characters [start, end)."""
    for i, role, lo, body, hi, stop in spans:
        if lo <= start < stop:
            if any(start < edge < end for edge in (body, hi, stop)):
                raise ValueError(f"template=tokenizer: a token straddles a span edge of message {i} "
                                 f"(characters {start}-{end}); {BUILT_IN_HINT}")
            kind = "header" if start < body else "content" if start < hi else "sep"
            return role, kind, i
    return "system", "sep", -1


def render_with_tokenizer(messages: list[dict], tok: Any, tools: list | None = None) -> list[Segment]:
    """Segments of the tokenizer's own rendering, assistant bodies (incl. end-of-turn) as content."""
    if not getattr(tok, "chat_template", None):
        raise ValueError(f"template=tokenizer: the tokenizer has no chat_template; {BUILT_IN_HINT}")
    _refuse_lookalikes(messages, tok)
    if GENERATION.search(tok.chat_template):
        return _finish(_from_generation_mask(messages, tok, tools), tok)
    full = _render(tok, messages, tools)
    spans = _spans(messages, tok, tools, full)
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    segs: list[Segment] = []
    for tid, (start, end) in zip(enc["input_ids"], enc["offset_mapping"]):
        role, kind, msg = _segment_of(start, end, spans)
        if segs and (segs[-1].role, segs[-1].kind, segs[-1].message) == (role, kind, msg):
            segs[-1].ids.append(tid)
        else:
            segs.append(Segment([tid], role, kind, msg))
    return _finish(segs, tok)


def _from_generation_mask(messages: list[dict], tok: Any, tools: list | None) -> list[Segment]:
    """Segments from the template's own ``{% generation %}`` marks (assistant runs, in order)."""
    out = tok.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True)
    answers = iter([i for i, m in enumerate(messages) if m["role"] == "assistant"])
    segs: list[Segment] = []
    for tid, marked in zip(out["input_ids"], out["assistant_masks"]):
        if segs and bool(marked) == (segs[-1].kind == "content"):
            segs[-1].ids.append(tid)
            continue
        msg = next(answers, None) if marked else -1
        if marked and msg is None:
            raise ValueError(f"template=tokenizer: the template marks more assistant spans than there are "
                             f"assistant messages; {BUILT_IN_HINT}")
        segs.append(Segment([tid], "assistant" if marked else "system", "content" if marked else "header", msg))
    return segs


def _finish(segs: list[Segment], tok: Any) -> list[Segment]:
    """Mark a leading bos (never trained) and each assistant body's end-of-turn token."""
    specials = _special_tokens(tok)[1]
    first = segs[0] if segs else None
    if first is not None and tok.bos_token_id is not None and first.ids[0] == tok.bos_token_id:
        rest = [Segment(first.ids[1:], first.role, first.kind, first.message)] if len(first.ids) > 1 else []
        segs = [Segment(first.ids[:1], first.role, "bos", -1), *rest, *segs[1:]]
    return _split_eot(segs, specials)


def _split_eot(segs: list[Segment], special_ids: set[int]) -> list[Segment]:
    """An assistant body's final special token is its end-of-turn (``masking.train_eot``)."""
    out = []
    for s in segs:
        if s.role == "assistant" and s.kind == "content" and len(s.ids) > 1 and s.ids[-1] in special_ids:
            out += [Segment(s.ids[:-1], s.role, "content", s.message), Segment(s.ids[-1:], s.role, "eot", s.message)]
        else:
            out.append(s)
    return out
