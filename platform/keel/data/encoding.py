"""Rendered text to token ids, the way inference servers tokenise it, with each token's message span.

A template renders a conversation to *pieces*: runs of text each labelled with the message, role and
kind (header, reasoning, content, end-of-turn, ...) it belongs to. :func:`encode_pieces` tokenises the
pieces' text whole (``tokenizer(text, add_special_tokens=False)``), so the ids are token-identical to
serving, and each token takes the label of the piece it starts in (a token that reaches into a
trained piece, e.g. a merged newline, is trained with it). No response-template search after
tokenisation.

Special tokens come only from the template's markup: if a user string holds special-token text
(``<|eot_id|>``), the conversation is encoded with content as plain text instead (the one case
where the ids differ from serving, where that text would become a control token).

:class:`Renderer` is what every chat template offers the data path and evaluation: the built-in
templates (``keel.data.template``) and the Jinja ones (``template=tokenizer|jinja``,
``keel.data.hf_template``) implement it, and ``keel.data.template.get_template`` chooses one.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any, Protocol

from keel.errors import UserError

TRAINABLE = ("reasoning", "content", "eot")  # kinds of an assistant message that masking may train


@dataclass(frozen=True)
class Segment:
    """A run of tokens with the message index and kind it belongs to."""

    ids: list[int]
    role: str  # system | user | assistant | tool | text
    kind: str  # bos | header | reasoning | content | eot | sep | eos
    message: int  # index of the message (-1 for bos and template-added text)


@dataclass(frozen=True)
class Piece:
    """Rendered text of one part of a message; ``markup`` text is the template's own (its
    special-token text is real), anything else is user data (encoded as text)."""

    text: str
    role: str
    kind: str
    message: int
    markup: bool


class Renderer(Protocol):
    """A chat template: conversations to labelled token segments (for training) and to generation prompts."""

    name: str  # the template.name that chose it

    @property
    def uses_jinja(self) -> bool:
        """Spans come from rendering a Jinja template (template=tokenizer|jinja), not from built-in pieces."""
        ...

    def render(self, messages: list[dict], enc: TextEncoder, tools: list | None = None) -> list[Segment]:
        """A validated conversation as segments with exact message spans."""
        ...

    def generation_prompt(self, messages: list[dict], enc: TextEncoder, tools: list | None = None) -> list[int]:
        """Ids of the conversation rendered as in training, followed by the assistant header."""
        ...

    def bos_token(self, enc: TextEncoder) -> str | None:
        """The token opening a plain-text (pretraining-style) example, if any."""
        ...

    def end_of_turn_ids(self, enc: TextEncoder) -> list[int]:
        """The token closing an assistant turn when it is a single token, else []."""
        ...


# Every special token the built-in templates' markup names (written by name, encoded by id).
SPECIAL_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|eot_id|>", "<|im_start|>", "<|im_end|>", "<|pad|>",
                  "<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]",
                  "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                  "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>",
                  "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>")


class TextEncoder:
    """Encodes text the way the tokenizer does for serving, plain strings with special tokens
    treated as text, and special tokens by name."""

    def __init__(self, tokenizer: Any) -> None:
        backend = tokenizer.backend_tokenizer
        # Private copies: flipping encode_special_tokens must not change the caller's tokenizer.
        from tokenizers import Tokenizer as RustTokenizer

        self._raw = RustTokenizer.from_str(backend.to_str())
        self._raw.encode_special_tokens = True
        self._served = RustTokenizer.from_str(backend.to_str())  # as tokenizer(text, add_special_tokens=False)
        self._served.encode_special_tokens = False
        self._tok = tokenizer
        self._special: dict[str, int] = {}
        self._markup: dict[str, tuple[int, ...]] = {}  # headers repeat every message: encode once
        self.special_ids = frozenset(tokenizer.all_special_ids) | frozenset(
            int(i) for i, t in tokenizer.added_tokens_decoder.items() if t.special)

    @property
    def tokenizer(self) -> Any:
        return self._tok

    def text(self, s: str) -> list[int]:
        if not s:
            return []
        return self._raw.encode(s, add_special_tokens=False).ids

    def served(self, s: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and character offsets of ``s`` tokenised as an inference server does."""
        out = self._served.encode(s, add_special_tokens=False)
        return out.ids, out.offsets

    def text_offsets(self, s: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and character offsets of ``s`` with special-token text encoded as text."""
        out = self._raw.encode(s, add_special_tokens=False)
        return out.ids, out.offsets

    def special(self, token: str) -> int:
        if token not in self._special:
            idx = self._tok.convert_tokens_to_ids(token)
            if idx is None or idx == getattr(self._tok, "unk_token_id", None):
                raise UserError(f"tokenizer has no special token {token!r} needed by the chat template")
            self._special[token] = int(idx)
        return self._special[token]

    def markup(self, s: str) -> list[int]:
        """Encode template markup: special tokens by id, the text between them as text."""
        if s not in self._markup:
            self._markup[s] = tuple(i for part in split_specials(s) for i in
                                    ([self.special(part[1])] if part[0] else self.text(part[1])))
        return list(self._markup[s])


def split_specials(s: str) -> list[tuple[bool, str]]:
    """``s`` cut into (is special token, text) parts at the templates' special tokens."""
    parts: list[tuple[bool, str]] = []
    rest = s
    while rest:
        hits = [(rest.find(t), -len(t), t) for t in SPECIAL_TOKENS if t in rest]
        if not hits:
            parts.append((False, rest))
            break
        pos, _, tok = min(hits)
        if pos:
            parts.append((False, rest[:pos]))
        parts.append((True, tok))
        rest = rest[pos + len(tok):]
    return parts


# ---------------------------------------------------------------- pieces to token ids


def _check_markup(pieces: list[Piece], enc: TextEncoder) -> None:
    """Every special token the markup names must exist in the tokenizer (else it would be text)."""
    for p in pieces:
        if p.markup:
            enc.markup(p.text)  # cached per markup string; raises naming a missing special token


def _injected(ids: list[int], owner: list[int], pieces: list[Piece], enc: TextEncoder) -> bool:
    """Whether user text produced a special token (it then would be a control token when served)."""
    return any(t in enc.special_ids and not pieces[o].markup for t, o in zip(ids, owner))


def _text_as_text(pieces: list[Piece], starts: list[int], enc: TextEncoder) -> tuple[list[int], list]:
    """Ids and offsets with user text's special-token look-alikes encoded as text: the markup's special
    tokens by id, every run of text between them encoded on its own."""
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    run, run_start = "", 0

    def flush() -> None:
        if run:
            got, offs = enc.text_offsets(run)
            ids.extend(got)
            offsets.extend((run_start + a, run_start + b) for a, b in offs)

    for p, start in zip(pieces, starts):
        parts = split_specials(p.text) if p.markup else [(False, p.text)]
        pos = start
        for is_special, text in parts:
            if is_special:
                flush()
                ids.append(enc.special(text))
                offsets.append((pos, pos + len(text)))
                run, run_start = "", pos + len(text)
            else:
                run += text
            pos += len(text)
    flush()
    return ids, offsets


def _owners(offsets: list[tuple[int, int]], ids: list[int], pieces: list[Piece], starts: list[int],
            enc: TextEncoder) -> list[int]:
    """The piece each token belongs to: the one it starts in, or the first trainable piece a (non-special)
    token reaches into when it starts in an untrained one (a newline merged across a header's end)."""
    owners = []
    for tid, (a, b) in zip(ids, offsets):
        k = max(0, bisect.bisect_right(starts, a) - 1)
        if tid not in enc.special_ids and not _trainable(pieces[k]):
            nxt = k + 1
            while nxt < len(pieces) and starts[nxt] < b:
                if _trainable(pieces[nxt]):
                    k = nxt
                    break
                nxt += 1
        owners.append(k)
    return owners


def _trainable(p: Piece) -> bool:
    return p.role == "assistant" and p.kind in TRAINABLE


def encode_pieces(pieces: list[Piece], enc: TextEncoder, check_markup: bool = True) -> list[Segment]:
    """Tokenise the pieces' text whole (as served) and cut the ids into labelled segments."""
    pieces = [p for p in pieces if p.text]
    if check_markup:
        _check_markup(pieces, enc)
    starts, pos = [], 0
    for p in pieces:
        starts.append(pos)
        pos += len(p.text)
    ids, offsets = enc.served("".join(p.text for p in pieces))
    owners = _owners(offsets, ids, pieces, starts, enc)
    if _injected(ids, owners, pieces, enc):
        ids, offsets = _text_as_text(pieces, starts, enc)
        owners = _owners(offsets, ids, pieces, starts, enc)
    segs: list[Segment] = []
    for tid, k in zip(ids, owners):
        p = pieces[k]
        if segs and (segs[-1].role, segs[-1].kind, segs[-1].message) == (p.role, p.kind, p.message):
            segs[-1].ids.append(tid)
        else:
            segs.append(Segment([tid], p.role, p.kind, p.message))
    return segs

