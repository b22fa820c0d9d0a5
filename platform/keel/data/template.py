"""Chat templates that render a conversation to token ids and message spans in one pass.

A built-in template renders a conversation to *pieces*: runs of text each labelled with the
message, role and kind (header, reasoning, content, end-of-turn, ...) it belongs to. The pieces'
text, concatenated, is exactly what the model family's own Jinja chat template writes, and it is
tokenised whole, the way inference servers do (``tokenizer(text, add_special_tokens=False)``), so
the ids are token-identical to serving; each token then takes the label of the piece it starts in
(a token that reaches into a trained piece, e.g. a merged newline, is trained with it). No
response-template search after tokenisation.

Special tokens come only from the template's markup: if a user string holds special-token text
(``<|eot_id|>``), the conversation is encoded with content as plain text instead (the one case
where the ids differ from serving, where that text would become a control token).
"""

from __future__ import annotations

import bisect
import functools
import json
from dataclasses import dataclass
from typing import Any, Protocol

ROLES = ("system", "user", "assistant", "tool")
TRAINABLE = ("reasoning", "content", "eot")  # kinds of an assistant message that masking may train


class Tokenizer(Protocol):
    def convert_tokens_to_ids(self, tokens: Any) -> Any: ...


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


@dataclass(frozen=True)
class ChatTemplate:
    """A chat format as markup around each message (special tokens are written by name)."""

    name: str
    bos: str | None
    header: str  # with {role}
    eot: str  # closes a message (trained after assistant content)
    sep: str  # text after the end-of-turn token (not trained)
    trim: tuple[str, ...]  # roles whose content the family's template strips of surrounding whitespace
    tool_role: str  # header role of tool results
    call_key: str  # key of the arguments in a rendered tool call
    call_open: str  # markup around each rendered tool call
    call_close: str
    result_open: str  # markup around a tool result
    result_close: str
    tools_intro: str  # system-prompt text that introduces the available tools
    role_names: tuple[tuple[str, str], ...] = ()  # header names differing from Keel's roles
    headers: tuple[tuple[str, str], ...] = ()  # per-role header markup replacing ``header``
    eots: tuple[tuple[str, str], ...] = ()  # per-role closing markup replacing ``eot``
    system: str = "role"  # role | first_user | last_user: the system prompt opens that user turn
    system_prefix: str = ""  # markup opening the system message's content (Llama 3.1's knowledge-date lines)
    default_system: str | None = None  # system content rendered when a conversation has none
    tools_block: tuple[str, str] | None = None  # markup around the tool list, before the last user turn
    end: str = ""  # markup after the last message (never trained; not in a generation prompt)
    reasoning: str = "text"  # text: <think> block before every answer that has one | qwen3: Qwen3's rules
    lead: str = ""  # markup opening every answer, trained with it (Mistral's space after [/INST])

    def header_for(self, role: str) -> str:
        if role in dict(self.headers):
            return dict(self.headers)[role]
        name = self.tool_role if role == "tool" else dict(self.role_names).get(role, role)
        return self.header.format(role=name)

    def eot_for(self, role: str) -> str:
        return dict(self.eots).get(role, self.eot)

    @property
    def strip_content(self) -> bool:
        """Whether assistant answers are rendered stripped (what their trained tokens decode to)."""
        return "assistant" in self.trim

    @property
    def generation_header(self) -> str:
        """What a generation prompt appends: the assistant header."""
        return self.header_for("assistant")


_CALLS_JSON = "Call tools by replying with JSON of the form {\"name\": ..., \"arguments\": {...}}.\n"
_ALL = ROLES
_LLAMA = dict(bos="<|begin_of_text|>", header="<|start_header_id|>{role}<|end_header_id|>\n\n", eot="<|eot_id|>",
              sep="", trim=_ALL, tool_role="ipython", call_key="parameters", call_open="", call_close="",
              result_open="", result_close="",
              tools_intro="You have access to the following functions. To call a function, respond with JSON of "
                          "the form {\"name\": function name, \"parameters\": arguments}.\n\n")
_CHATML = dict(bos=None, header="<|im_start|>{role}\n", eot="<|im_end|>", sep="\n", trim=(), tool_role="tool",
               call_key="arguments", call_open="<tool_call>\n", call_close="\n</tool_call>",
               result_open="<tool_response>\n", result_close="\n</tool_response>",
               tools_intro="# Tools\n\nYou may call one or more functions. Function signatures:\n")

TEMPLATES: dict[str, ChatTemplate] = {
    # Llama 3 (Meta-Llama-3-8B-Instruct): contents trimmed. Tool calls as in Llama 3.1's JSON tool calling:
    # bare JSON calls, results back as role "ipython".
    "llama3": ChatTemplate("llama3", **_LLAMA),
    # Llama 3.1 / 3.2 / 3.3 Instruct: Llama 3 plus the system block their template always writes
    # (knowledge-date lines, then the system prompt, empty when there is none).
    "llama3.1": ChatTemplate("llama3.1", **_LLAMA, default_system="",
                             system_prefix="Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"),
    # Generic ChatML (Qwen-style <tool_call> blocks; results as role "tool" in <tool_response>).
    "chatml": ChatTemplate("chatml", **_CHATML),
    # Qwen2.5 Instruct: ChatML with its default system prompt when a conversation has none.
    "qwen2.5": ChatTemplate("qwen2.5", **_CHATML,
                            default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant."),
    # Qwen3: ChatML; <think> blocks after the last user query (an empty one on the final answer), earlier
    # turns' reasoning dropped, exactly as Qwen3's chat template does (see _qwen3_reasoning).
    "qwen3": ChatTemplate("qwen3", **_CHATML, reasoning="qwen3"),
    # Mistral-7B-Instruct-v0.3: <s>[INST] user[/INST] answer</s>[INST] ... (user content as is, answers
    # trimmed after one space). The system prompt opens the last user turn, as in the served prompt of the
    # final answer and in Mistral's reference tokenizer (mistral-common); the hub's Jinja template writes it
    # only when that turn is the conversation's last message, so a training row rendered by it (ending in
    # an answer) would lose it. Tool markup of v0.3: calls after [TOOL_CALLS], results in [TOOL_RESULTS].
    "mistral": ChatTemplate("mistral", "<s>", "", "</s>", "", trim=("assistant",), tool_role="tool",
                            call_key="arguments", call_open="[TOOL_CALLS] ", call_close="",
                            result_open="", result_close="", tools_intro="",
                            headers=(("user", "[INST] "), ("assistant", ""), ("tool", "[TOOL_RESULTS] ")),
                            eots=(("user", "[/INST]"), ("tool", " [/TOOL_RESULTS]")), system="last_user",
                            tools_block=("[AVAILABLE_TOOLS] ", " [/AVAILABLE_TOOLS]"), lead=" "),
    # Gemma 2: <start_of_turn>user|model ... <end_of_turn>, contents trimmed; no system role (Gemma's own
    # template refuses one: here it opens the first user turn) and no native tool syntax (calls as JSON,
    # results as a user turn).
    "gemma": ChatTemplate("gemma", "<bos>", "<start_of_turn>{role}\n", "<end_of_turn>", "\n", trim=_ALL,
                          tool_role="user", call_key="arguments", call_open="", call_close="",
                          result_open="Tool result:\n", result_close="", tools_intro=_CALLS_JSON,
                          role_names=(("assistant", "model"),), system="first_user"),
    # Phi-3 (Phi-3-mini-4k-instruct): <|system|>, <|user|>, <|assistant|> headers, <|end|> closes each
    # message, and the conversation ends with the eos token <|endoftext|> (not trained).
    "phi3": ChatTemplate("phi3", None, "<|{role}|>\n", "<|end|>", "\n", trim=(), tool_role="user",
                         call_key="arguments", call_open="", call_close="", result_open="Tool result:\n",
                         result_close="", tools_intro=_CALLS_JSON, end="<|endoftext|>"),
}

SPECIAL_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|eot_id|>", "<|im_start|>", "<|im_end|>", "<|pad|>",
                  "<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]",
                  "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                  "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>",
                  "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>")
THINK = ("<think>\n", "\n</think>\n\n")  # reasoning markup (Qwen3's; the text rendering of other templates)

# template=tokenizer: the tokenizer's own Jinja chat_template (keel.data.hf_template).
TOKENIZER = ChatTemplate("tokenizer", None, "", "", "", trim=(), tool_role="tool", call_key="arguments",
                         call_open="", call_close="", result_open="", result_close="", tools_intro="")
NAMES = (*TEMPLATES, "tokenizer", "jinja")  # every template.name option


@dataclass(frozen=True)
class JinjaTemplate:
    """template=jinja: a Jinja chat template from a file, rendered like template=tokenizer."""

    path: str
    source: str
    name: str = "jinja"


def get_template(name: str, path: str | None = None) -> Any:
    """The template called ``name`` (``jinja`` reads the Jinja file at ``path``)."""
    if name == "tokenizer":
        return TOKENIZER
    if name == "jinja":
        return load_jinja(path)
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}; built-in templates: {sorted(TEMPLATES)}, or tokenizer, "
                         f"or jinja (template.path=FILE)")
    return TEMPLATES[name]


def from_config(cfg: Any) -> Any:
    """The template a ``template`` config group selects (name, and path for ``jinja``)."""
    return get_template(cfg.name, getattr(cfg, "path", None))


@functools.lru_cache(maxsize=8)
def load_jinja(path: str | None) -> JinjaTemplate:
    if not path:
        raise ValueError("template=jinja needs template.path=FILE (a Jinja chat template)")
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
    except OSError as err:
        raise ValueError(f"template.path: cannot read the Jinja chat template {path!r}: {err}") from None
    if not source.strip():
        raise ValueError(f"template.path: the Jinja chat template {path!r} is empty")
    return JinjaTemplate(path, source)


def uses_jinja(template: Any) -> bool:
    """template=tokenizer or template=jinja: spans come from rendering a Jinja template."""
    return template is TOKENIZER or isinstance(template, JinjaTemplate)


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
                raise ValueError(f"tokenizer has no special token {token!r} needed by the chat template")
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


# ---------------------------------------------------------------- rendering to pieces


def _shown(msg: dict, template: ChatTemplate) -> str:
    """A message's content as the template writes it."""
    return msg["content"].strip() if msg["role"] in template.trim else msg["content"]


def _calls(msg: dict, template: ChatTemplate, i: int, lead: bool) -> list[Piece]:
    """An assistant's tool calls in the template's syntax (user data as text, markup as markup)."""
    out: list[Piece] = []
    for j, c in enumerate(msg.get("tool_calls") or []):
        call = json.dumps({"name": c["function"]["name"], template.call_key: c["function"].get("arguments", {})},
                          ensure_ascii=False)
        out += [Piece("\n" if (lead or j) else "", "assistant", "content", i, False),
                Piece(template.call_open, "assistant", "content", i, True),
                Piece(call, "assistant", "content", i, False),
                Piece(template.call_close, "assistant", "content", i, True)]
    return out


def _with_tools(messages: list[dict], tools: list | None, template: ChatTemplate) -> list[dict]:
    """Put the tool definitions into the system prompt (one is added if there is none)."""
    if not tools or template.tools_block:
        return messages
    listing = template.tools_intro + "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    if messages and messages[0]["role"] == "system":
        first = {**messages[0], "content": messages[0]["content"] + "\n\n" + listing}
        return [first, *messages[1:]]
    return [{"role": "system", "content": listing}, *messages]


def _place_system(messages: list[dict], template: ChatTemplate) -> list[tuple[int, dict]]:
    """(message index, message) in rendering order, the system prompt placed as the template places it."""
    indexed = list(enumerate(messages))
    has_system = bool(messages) and messages[0]["role"] == "system"
    if template.system == "role":
        if not has_system and template.default_system is not None:
            return [(-1, {"role": "system", "content": template.default_system}), *indexed]
        return indexed
    if not has_system:
        return indexed
    system, rest = messages[0]["content"], indexed[1:]
    users = [k for k, (_, m) in enumerate(rest) if m["role"] == "user"]
    if not users:
        raise ValueError(f"template {template.name} has no system role and the conversation has no user turn")
    k = users[0] if template.system == "first_user" else users[-1]
    i, m = rest[k]
    rest[k] = (i, {**m, "content": system + "\n\n" + m["content"]})
    return rest


def _last_query(messages: list[dict]) -> int:
    """Qwen3's ``ns.last_query_index``: the last user message that is not a wrapped tool response."""
    for i in range(len(messages) - 1, -1, -1):
        c = messages[i]["content"]
        if messages[i]["role"] == "user" and not (c.startswith("<tool_response>") and c.endswith("</tool_response>")):
            return i
    return len(messages) - 1


def _split_think(msg: dict) -> tuple[str, str]:
    """(reasoning, content) of an assistant message as Qwen3's template reads them."""
    content, reasoning = msg["content"], msg.get("reasoning_content")
    if isinstance(reasoning, str):
        return reasoning, content
    if "</think>" in content:
        return (content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n"),
                content.split("</think>")[-1].lstrip("\n"))
    return "", content


def _think(reasoning: str, i: int) -> list[Piece]:
    return [Piece(THINK[0], "assistant", "reasoning", i, True),
            Piece(reasoning.strip("\n"), "assistant", "reasoning", i, False),
            Piece(THINK[1], "assistant", "reasoning", i, True)]


def _answer(msg: dict, i: int, template: ChatTemplate, qwen3: tuple[int, bool]) -> list[Piece]:
    """Reasoning (if rendered) and content pieces of an assistant message."""
    if template.reasoning == "qwen3":
        last_query, last = qwen3
        reasoning, content = _split_think(msg)
        if i > last_query and (last or reasoning):
            return [*_think(reasoning, i), Piece(content.lstrip("\n"), "assistant", "content", i, False)]
        return [Piece(content, "assistant", "content", i, False)]
    reasoning = (msg.get("reasoning_content") or "").strip("\n")
    content = msg["content"]
    trim = "assistant" in template.trim
    if not reasoning:
        return [Piece(content.strip() if trim else content, "assistant", "content", i, False)]
    # Templates without reasoning markup: the <think> block opens the answer as text, and the
    # family's template then writes (and trims) that answer as it writes any other.
    block = THINK[0] + reasoning + THINK[1]
    whole = (block + content).strip() if trim else block + content
    cut = len(THINK[0]) + len(reasoning)
    return [Piece(THINK[0], "assistant", "reasoning", i, True),
            Piece(reasoning, "assistant", "reasoning", i, False),
            Piece(whole[cut:len(block)], "assistant", "reasoning", i, True),
            Piece(whole[len(block):], "assistant", "content", i, False)]


def _message(i: int, msg: dict, template: ChatTemplate, qwen3: tuple[int, bool]) -> list[Piece]:
    role = msg["role"]
    out = [Piece(template.header_for(role), role, "header", i, True)]
    if role == "system" and template.system_prefix:
        out.append(Piece(template.system_prefix, role, "header", i, True))
    if role == "assistant":
        out.append(Piece(template.lead, role, "content", i, True))
        out += _answer(msg, i, template, qwen3)
        out += _calls(msg, template, i, bool(out[-1].text))
    elif role == "tool":
        out += [Piece(template.result_open, role, "content", i, True), Piece(_shown(msg, template), role, "content",
                i, False), Piece(template.result_close, role, "content", i, True)]
    else:
        out.append(Piece(_shown(msg, template), role, "content", i, False))
    out.append(Piece(template.eot_for(role), role, "eot", i, True))
    out.append(Piece(template.sep, role, "sep", i, True))
    return out


def _tools_piece(tools: list | None, template: ChatTemplate) -> list[Piece]:
    if not tools or not template.tools_block:
        return []
    opening, closing = template.tools_block
    return [Piece(opening, "system", "header", -1, True),
            Piece(json.dumps(tools, ensure_ascii=False), "system", "header", -1, False),
            Piece(closing, "system", "header", -1, True)]


def render_pieces(messages: list[dict], template: ChatTemplate, tools: list | None = None,
                  generation_prompt: bool = False) -> list[Piece]:
    """The conversation as the family's template writes it, cut into labelled pieces."""
    pieces = [Piece(template.bos, "system", "bos", -1, True)] if template.bos else []
    placed = _place_system(_with_tools(messages, tools, template), template)
    last_query = _last_query(messages)
    for n, (i, msg) in enumerate(placed):
        if msg["role"] == "user" and n == max(k for k, (_, m) in enumerate(placed) if m["role"] == "user"):
            pieces += _tools_piece(tools, template)  # Mistral lists the tools before the last user turn
        pieces += _message(i, msg, template, (last_query, n == len(placed) - 1 and not generation_prompt))
    if generation_prompt:
        pieces.append(Piece(template.generation_header, "assistant", "header", len(messages), True))
    elif template.end:
        pieces.append(Piece(template.end, "system", "eos", -1, True))
    return [p for p in pieces if p.text]


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


def render_chat(messages: list[dict], enc: TextEncoder, template: Any, tools: list | None = None) -> list[Segment]:
    """Render a validated conversation into segments with exact message spans."""
    if uses_jinja(template):
        from keel.data.hf_template import render_with_tokenizer

        return render_with_tokenizer(messages, enc, tools, template if isinstance(template, JinjaTemplate) else None)
    return encode_pieces(render_pieces(messages, template, tools), enc)


def _jinja_source(template: Any) -> str | None:
    return template.source if isinstance(template, JinjaTemplate) else None


def render_text(text: str, enc: TextEncoder, template: Any, eos_token: str) -> list[Segment]:
    """Render a plain-text (pretraining-style) example: [bos] text eos."""
    segs: list[Segment] = []
    bos = enc.tokenizer.bos_token if uses_jinja(template) else template.bos
    if bos:
        segs.append(Segment([enc.special(bos)], "text", "bos", -1))
    segs.append(Segment(enc.text(text), "text", "content", 0))
    segs.append(Segment([enc.special(eos_token)], "text", "eos", 0))
    return segs


def generation_prompt(messages: list[dict], enc: TextEncoder, template: Any, tools: list | None = None) -> list[int]:
    """Ids of a conversation rendered as in training, followed by the assistant header: what a model
    continues to answer it (in-training evaluation generates from exactly the trained layout)."""
    if uses_jinja(template):
        from keel.data.hf_template import template_ids

        return template_ids(enc.tokenizer, messages, tools, generation_prompt=True,
                            chat_template=_jinja_source(template))
    pieces = render_pieces(messages, template, tools, generation_prompt=True)
    return [i for seg in encode_pieces(pieces, enc) for i in seg.ids]


def end_of_turn_ids(enc: TextEncoder, template: Any) -> list[int]:
    """The token that closes an assistant turn when the template's end-of-turn is a single token."""
    if uses_jinja(template):
        return []
    ids = enc.markup(template.eot_for("assistant"))
    return ids if len(ids) == 1 else []
