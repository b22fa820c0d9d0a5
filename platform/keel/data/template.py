"""Chat templates that render a conversation to token ids and message spans in one pass.

Each message is tokenised as its own segments (header, content, end-of-turn), so the
span of every message is known exactly: no response-template search after
tokenisation. Content is encoded with special-token parsing switched off, so a user
string that looks like ``<|eot_id|>`` can never inject a real special token.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Protocol

ROLES = ("system", "user", "assistant", "tool")


class Tokenizer(Protocol):
    def convert_tokens_to_ids(self, tokens: Any) -> Any: ...


@dataclass(frozen=True)
class Segment:
    """A run of tokens with the message index and kind it belongs to."""

    ids: list[int]
    role: str  # system | user | assistant | text
    kind: str  # bos | header | content | eot | sep | eos
    message: int  # index of the message (-1 for bos)


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    bos: str | None
    header: str  # with {role}
    eot: str
    sep: str  # text after the end-of-turn token (not trained)
    strip_content: bool
    tool_role: str  # header role of tool results
    call_key: str  # key of the arguments in a rendered tool call
    call_open: str  # text around each rendered tool call
    call_close: str
    result_open: str  # text around a tool result
    result_close: str
    tools_intro: str  # system-prompt text that introduces the available tools


TEMPLATES: dict[str, ChatTemplate] = {
    # Llama 3.1 JSON tool calling: calls are bare JSON, results come back as role "ipython".
    "llama3": ChatTemplate("llama3", "<|begin_of_text|>", "<|start_header_id|>{role}<|end_header_id|>\n\n",
                           "<|eot_id|>", "", strip_content=True, tool_role="ipython", call_key="parameters",
                           call_open="", call_close="", result_open="", result_close="",
                           tools_intro="You have access to the following functions. To call a function, respond "
                                       "with JSON of the form {\"name\": function name, \"parameters\": "
                                       "arguments}.\n\n"),
    # Qwen2/2.5 style: <tool_call> blocks; results go back as role "tool" in <tool_response>.
    "chatml": ChatTemplate("chatml", None, "<|im_start|>{role}\n", "<|im_end|>", "\n", strip_content=False,
                           tool_role="tool", call_key="arguments", call_open="<tool_call>\n",
                           call_close="\n</tool_call>", result_open="<tool_response>\n",
                           result_close="\n</tool_response>",
                           tools_intro="# Tools\n\nYou may call one or more functions. Function signatures:\n"),
}

SPECIAL_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|eot_id|>", "<|im_start|>", "<|im_end|>", "<|pad|>")


def get_template(name: str) -> ChatTemplate:
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}; built-in templates: {sorted(TEMPLATES)}")
    return TEMPLATES[name]


class TextEncoder:
    """Encodes plain strings with special tokens treated as text, and specials by name."""

    def __init__(self, tokenizer: Any) -> None:
        backend = tokenizer.backend_tokenizer
        # A private copy: flipping encode_special_tokens must not change the caller's tokenizer.
        from tokenizers import Tokenizer as RustTokenizer

        self._raw = RustTokenizer.from_str(backend.to_str())
        self._raw.encode_special_tokens = True
        self._tok = tokenizer
        self._special: dict[str, int] = {}
        self._markup: dict[str, tuple[int, ...]] = {}  # headers repeat every message: encode once

    def text(self, s: str) -> list[int]:
        if not s:
            return []
        return self._raw.encode(s, add_special_tokens=False).ids

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
            self._markup[s] = tuple(self._encode_markup(s))
        return list(self._markup[s])

    def _encode_markup(self, s: str) -> list[int]:
        ids: list[int] = []
        rest = s
        while rest:
            hits = [(rest.find(t), t) for t in SPECIAL_TOKENS if t in rest]
            if not hits:
                ids += self.text(rest)
                break
            pos, tok = min(hits)
            ids += self.text(rest[:pos]) + [self.special(tok)]
            rest = rest[pos + len(tok):]
        return ids


def _content(msg: dict, template: ChatTemplate) -> str:
    """Message text with tool calls and tool results in the template's own syntax."""
    content = msg["content"]
    calls = [template.call_open + json.dumps({"name": c["function"]["name"],
                                              template.call_key: c["function"].get("arguments", {})},
                                             ensure_ascii=False) + template.call_close
             for c in msg.get("tool_calls") or []]
    if calls:
        content = "\n".join(([content] if content else []) + calls)
    if msg["role"] == "tool":
        content = template.result_open + content + template.result_close
    return content.strip() if template.strip_content else content


def _with_tools(messages: list[dict], tools: list | None, template: ChatTemplate) -> list[dict]:
    """Put the tool definitions into the system prompt (one is added if there is none)."""
    if not tools:
        return messages
    listing = template.tools_intro + "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    if messages and messages[0]["role"] == "system":
        first = {**messages[0], "content": messages[0]["content"] + "\n\n" + listing}
        return [first, *messages[1:]]
    return [{"role": "system", "content": listing}, *messages]


def render_chat(messages: list[dict], enc: TextEncoder, template: ChatTemplate,
                tools: list | None = None) -> list[Segment]:
    """Render a validated conversation into segments with exact message spans."""
    segs: list[Segment] = []
    if template.bos:
        segs.append(Segment([enc.special(template.bos)], "system", "bos", -1))
    for i, msg in enumerate(_with_tools(messages, tools, template)):
        role = msg["role"]
        header_role = template.tool_role if role == "tool" else role
        segs.append(Segment(enc.markup(template.header.format(role=header_role)), role, "header", i))
        segs.append(Segment(enc.text(_content(msg, template)), role, "content", i))
        segs.append(Segment([enc.special(template.eot)], role, "eot", i))
        if template.sep:
            segs.append(Segment(enc.text(template.sep), role, "sep", i))
    return segs


def render_text(text: str, enc: TextEncoder, template: ChatTemplate, eos_token: str) -> list[Segment]:
    """Render a plain-text (pretraining-style) example: [bos] text eos."""
    segs: list[Segment] = []
    if template.bos:
        segs.append(Segment([enc.special(template.bos)], "text", "bos", -1))
    segs.append(Segment(enc.text(text), "text", "content", 0))
    segs.append(Segment([enc.special(eos_token)], "text", "eos", 0))
    return segs
