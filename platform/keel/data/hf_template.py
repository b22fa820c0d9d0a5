"""``template=tokenizer`` (the tokenizer's own Jinja ``chat_template``) and ``template=jinja``
(a Jinja chat template from ``template.path``).

Message spans come from the template itself, never from searching the tokens for a response
string: with ``{% generation %}`` markers, from Transformers' assistant-token mask; otherwise
from incremental rendering, where message ``i`` is what rendering ``messages[:i+1]`` adds to
rendering ``messages[:i]``, and an assistant's header is what ``add_generation_prompt`` adds.
Each prefix must be preserved and no token may straddle a span boundary.

Templates that rewrite earlier turns (Qwen3 drops the reasoning of answers before the last user
query; Phi-3 ends a rendering with an eos token that the next turn does not follow) are not
incremental. Their spans are located in one rendering instead: the conversation is rendered once
more with every content and reasoning replaced by a unique placeholder, which gives the template's
markup; the real rendering must then be exactly that markup with each placeholder replaced by its
text (as is or stripped, as the template writes it). An assistant's body starts after its
generation prompt (inside the markup before its first text; markup there up to the content, such as
``<think>`` tags, counts as its reasoning) and ends with the special token that closes it. Tool calls
and tool results cannot be located this way; if a template fails both ways, the error says why and
suggests a built-in template.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from typing import Any

from keel.choices import BUILT_IN_TEMPLATES
from keel.data.encoding import Piece, Segment, TextEncoder, encode_pieces
from keel.errors import ConfigError, UserError

GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")
BUILT_IN_HINT = f"use a built-in template instead (template={'|'.join(BUILT_IN_TEMPLATES)})"


@dataclass(frozen=True)
class JinjaTemplate:
    """A :class:`keel.data.encoding.Renderer` rendering a Jinja chat template: the tokenizer's own
    (``template=tokenizer``, ``source`` None) or a file's (``template=jinja``, ``template.path``)."""

    name: str
    path: str | None = None
    source: str | None = None

    uses_jinja = True

    @property
    def _own(self) -> JinjaTemplate | None:
        """This template when it is a file's (None: the tokenizer's own chat_template)."""
        return self if self.source is not None else None

    def render(self, messages: list[dict], enc: TextEncoder, tools: list | None = None) -> list[Segment]:
        return render_with_tokenizer(messages, enc, tools, self._own)

    def generation_prompt(self, messages: list[dict], enc: TextEncoder, tools: list | None = None) -> list[int]:
        return template_ids(enc.tokenizer, messages, tools, generation_prompt=True, chat_template=self.source)

    def bos_token(self, enc: TextEncoder) -> str | None:
        return enc.tokenizer.bos_token  # the Jinja template writes bos itself; a plain-text row gets the tokenizer's

    def end_of_turn_ids(self, enc: TextEncoder) -> list[int]:
        return []


TOKENIZER = JinjaTemplate("tokenizer")  # template=tokenizer: the tokenizer's own chat_template


@functools.lru_cache(maxsize=8)
def load_jinja(path: str | None) -> JinjaTemplate:
    """template=jinja: the Jinja chat template in the file ``path``."""
    if not path:
        raise ConfigError("template=jinja needs template.path=FILE (a Jinja chat template)")
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
    except OSError as err:
        raise ConfigError(f"template.path: cannot read the Jinja chat template {path!r}: {err}") from None
    if not source.strip():
        raise ConfigError(f"template.path: the Jinja chat template {path!r} is empty")
    return JinjaTemplate("jinja", path, source)


def _render(tok: Any, messages: list[dict], tools: list | None, generation_prompt: bool = False,
            chat_template: str | None = None) -> str:
    return tok.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt,
                                   chat_template=chat_template)


def template_ids(tok: Any, messages: list[dict], tools: list | None = None,
                 generation_prompt: bool = False, chat_template: str | None = None) -> list[int]:
    """Token ids of the template's own rendering (the template writes bos itself, so none is added)."""
    return tok(_render(tok, messages, tools, generation_prompt, chat_template), add_special_tokens=False)["input_ids"]


@functools.lru_cache(maxsize=16)
def _special_tokens(tok: Any) -> tuple[tuple[str, ...], frozenset[int]]:
    """The tokenizer's special and added tokens, as text and as ids (computed once per tokenizer,
    not per example: ``get_added_vocab`` builds a new dict on every call)."""
    added = tok.get_added_vocab()
    texts = tuple(t for t in set(tok.all_special_tokens) | set(added) if t)
    return texts, frozenset(tok.all_special_ids) | frozenset(added.values())


class _Ctx:
    """One rendering job: the tokenizer, the tools, the Jinja source (None: the tokenizer's) and how
    errors name the template."""

    def __init__(self, tok: Any, tools: list | None, jinja: JinjaTemplate | None) -> None:
        self.tok, self.tools = tok, tools
        self.source = jinja.source if jinja else None
        self.label = f"template=jinja ({jinja.path})" if jinja else "template=tokenizer"

    def render(self, messages: list[dict], generation_prompt: bool = False) -> str:
        try:
            return _render(self.tok, messages, self.tools, generation_prompt, self.source)
        except Exception as err:  # a Jinja syntax error or the template's own raise_exception
            if self.source is None:
                raise
            raise UserError(f"{self.label}: rendering failed: {err}") from err

    def error(self, what: str) -> UserError:
        return UserError(f"{self.label}: {what}; {BUILT_IN_HINT}")


def _refuse_lookalikes(messages: list[dict], ctx: _Ctx) -> None:
    """The rendered text is tokenised whole, so special-token text in content would become real."""
    specials = _special_tokens(ctx.tok)[0]
    for i, m in enumerate(messages):
        text = m.get("content", "") + (m.get("reasoning_content") or "")
        hit = next((t for t in specials if t in text), None)
        if hit:
            raise ctx.error(f"cannot safely encode message {i} ({m['role']}): its content contains the "
                            f"special-token text {hit!r}")


class _NotIncremental(Exception):
    """Rendering a longer conversation changes the text of a shorter one."""


def _checked_prefix(prev: str, text: str, what: str) -> None:
    if not text.startswith(prev):
        raise _NotIncremental(f"{what} changes the text before it")


Span = tuple[int, str, int, int, int, int]  # message, role, start, body start, body end, chunk end


def _spans(messages: list[dict], ctx: _Ctx, full: str) -> list[Span]:
    """Character spans of every message in the full rendering."""
    out, prev = [], ""
    for i, m in enumerate(messages):
        text = ctx.render(messages[: i + 1])
        _checked_prefix(prev, text, f"message {i}")
        _checked_prefix(text, full, f"message {i + 1}")
        body, hi = len(prev), len(text)
        if m["role"] == "assistant":
            prompt = ctx.render(messages[:i], generation_prompt=True) if i else ""
            _checked_prefix(prev, prompt, f"the generation prompt before message {i}")
            _checked_prefix(prompt, text, f"message {i} after its generation prompt")
            body, hi = len(prompt), len(text.rstrip())  # trailing separator whitespace is not trained
        out.append((i, m["role"], len(prev), body, hi, len(text)))
        prev = text
    return out


def _segment_of(start: int, end: int, spans: list[Span], ctx: _Ctx) -> tuple[str, str, int]:
    """(role, kind, message) of the token at characters [start, end)."""
    for i, role, lo, body, hi, stop in spans:
        if lo <= start < stop:
            if any(start < edge < end for edge in (body, hi, stop)):
                raise ctx.error(f"a token straddles a span edge of message {i} (characters {start}-{end})")
            kind = "header" if start < body else "content" if start < hi else "sep"
            return role, kind, i
    return "system", "sep", -1


def render_with_tokenizer(messages: list[dict], tok: Any, tools: list | None = None,
                          jinja: JinjaTemplate | None = None) -> list[Segment]:
    """Segments of the Jinja template's rendering, assistant bodies (incl. end-of-turn) as content."""
    enc = tok if isinstance(tok, TextEncoder) else TextEncoder(tok)
    ctx = _Ctx(enc.tokenizer, tools, jinja)
    source = ctx.source or getattr(ctx.tok, "chat_template", None)
    if not source:
        raise ctx.error("the tokenizer has no chat_template")
    _refuse_lookalikes(messages, ctx)
    if GENERATION.search(source):
        return _finish(_from_generation_mask(messages, ctx), ctx.tok)
    full = ctx.render(messages)
    try:
        spans = _spans(messages, ctx, full)
    except _NotIncremental as err:
        return _finish(_located(messages, ctx, enc, full, str(err)), ctx.tok)
    out = ctx.tok(full, add_special_tokens=False, return_offsets_mapping=True)
    segs: list[Segment] = []
    for tid, (start, end) in zip(out["input_ids"], out["offset_mapping"]):
        role, kind, msg = _segment_of(start, end, spans, ctx)
        if segs and (segs[-1].role, segs[-1].kind, segs[-1].message) == (role, kind, msg):
            segs[-1].ids.append(tid)
        else:
            segs.append(Segment([tid], role, kind, msg))
    return _finish(segs, ctx.tok)


def _from_generation_mask(messages: list[dict], ctx: _Ctx) -> list[Segment]:
    """Segments from the template's own ``{% generation %}`` marks (assistant runs, in order)."""
    out = ctx.tok.apply_chat_template(messages, tools=ctx.tools, tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=True, chat_template=ctx.source)
    answers = iter([i for i, m in enumerate(messages) if m["role"] == "assistant"])
    segs: list[Segment] = []
    for tid, marked in zip(out["input_ids"], out["assistant_masks"]):
        if segs and bool(marked) == (segs[-1].kind == "content"):
            segs[-1].ids.append(tid)
            continue
        msg = next(answers, None) if marked else -1
        if marked and msg is None:
            raise ctx.error("the template marks more assistant spans than there are assistant messages")
        segs.append(Segment([tid], "assistant" if marked else "system", "content" if marked else "header", msg))
    return segs


# ---------------------------------------------------------------- templates that are not incremental

_PLACE = re.compile("(\ue000[0-9]+[cr]\ue001)")  # private-use code points: no template trims or splits them


class _Unlocatable(Exception):
    """Why the messages cannot be located in one rendering."""


def _placeholders(messages: list[dict]) -> tuple[list[dict], dict[str, tuple[int, str, str]]]:
    """The messages with each content and reasoning replaced by a unique placeholder."""
    marked, texts = [], {}
    for i, m in enumerate(messages):
        if m.get("tool_calls") or m["role"] == "tool":
            raise _Unlocatable(f"message {i} is a tool call or tool result")
        new = dict(m)
        for field, tag in (("content", "c"), ("reasoning_content", "r")):
            if isinstance(m.get(field), str) and m[field]:
                key = f"\ue000{i}{tag}\ue001"
                new[field] = key
                texts[key] = (i, field, m[field])
        marked.append(new)
    return marked, texts


def _variants(text: str) -> list[str]:
    """How a template may write a text: as is, or stripped."""
    out: list[str] = []
    for v in (text, text.strip(), text.lstrip(), text.rstrip(), text.strip("\n"), text.lstrip("\n"),
              text.rstrip("\n")):
        if v not in out:
            out.append(v)
    return out


def _walk(full: str, markups: list[str], keys: list[str], texts: dict) -> list[tuple[str, int, str]]:
    """(text, message, field) of the real rendering cut at the placeholders' texts; message -1: markup."""
    parts, pos = [], 0
    for j, key in enumerate(keys):
        if not full.startswith(markups[j], pos):
            raise _Unlocatable(f"its markup differs once the placeholder texts are put back (at character {pos})")
        parts.append((markups[j], -1, ""))
        pos += len(markups[j])
        i, field, text = texts[key]
        nxt = markups[j + 1]
        shown = next((v for v in _variants(text) if full.startswith(v, pos) and full.startswith(nxt, pos + len(v))),
                     None)
        if shown is None:
            raise _Unlocatable(f"message {i}'s {field} is not written as is or stripped")
        parts.append((shown, i, field))
        pos += len(shown)
    if full[pos:] != markups[-1]:
        raise _Unlocatable("its text after the last message differs")
    return [*parts, (markups[-1], -1, "")]


def _header(messages: list[dict], i: int, ctx: _Ctx) -> str:
    """What a generation prompt appends to ``messages[:i]``: the assistant header."""
    with_prompt, without = ctx.render(messages[:i], True), ctx.render(messages[:i])
    return with_prompt[len(os.path.commonprefix([with_prompt, without])):]


def _located(messages: list[dict], ctx: _Ctx, enc: TextEncoder, full: str, why_not: str) -> list[Segment]:
    """Segments of a template that is not incremental, its messages located in one rendering."""
    try:
        marked, texts = _placeholders(messages)
        parts = _PLACE.split(ctx.render(marked))
        keys = parts[1::2]
        if len(set(keys)) != len(keys):
            raise _Unlocatable("it writes a message more than once")
        pieces = _label(_walk(full, parts[0::2], keys, texts), messages, ctx)
    except _Unlocatable as err:
        raise ctx.error(f"the chat template does not render incrementally ({why_not}) and its messages cannot "
                        f"be located in one rendering ({err}), so message spans are unknown") from None
    return encode_pieces(pieces, enc, check_markup=False)


def _label(parts: list[tuple[str, int, str]], messages: list[dict], ctx: _Ctx) -> list[Piece]:
    """Pieces of the walked rendering: each assistant body runs from the end of its header to the special
    token that closes it; markup inside the body before the content counts as reasoning."""
    pieces = [Piece(t, "system", "header", -1, True) if i < 0 else
              Piece(t, messages[i]["role"], "reasoning" if f == "reasoning_content" else "content", i, False)
              for t, i, f in parts]
    for i, m in enumerate(messages):
        own = [k for k, (_, mi, _) in enumerate(parts) if mi == i]
        if m["role"] != "assistant" or not own:
            continue
        first, last = own[0] - 1, own[-1] + 1  # the markup before and after the message's texts
        header = _header(messages, i, ctx)
        cut = pieces[first].text.rfind(header) if header else -1
        if cut < 0:
            raise _Unlocatable(f"the generation prompt before message {i} is not where message {i} starts")
        before, body = pieces[first].text[: cut + len(header)], pieces[first].text[cut + len(header):]
        kind = "reasoning" if len(own) > 1 or "think>" in body else "content"
        pieces[first] = [Piece(before, "system", "header", -1, True), Piece(body, "assistant", kind, i, True)]
        for k in range(own[0] + 1, own[-1]):
            if parts[k][1] < 0:
                pieces[k] = Piece(parts[k][0], "assistant", "reasoning", i, True)
        eot = max((t for t in _special_tokens(ctx.tok)[0] if pieces[last].text.startswith(t)), key=len, default="")
        pieces[last] = [Piece(eot, "assistant", "eot", i, True), Piece(pieces[last].text[len(eot):], "system",
                                                                       "sep", -1, True)]
    return [p for item in pieces for p in (item if isinstance(item, list) else [item]) if p.text]


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
