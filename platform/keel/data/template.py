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
    """A chat format as markup around each message (special tokens are written by name)."""

    name: str
    bos: str | None
    header: str  # with {role}
    eot: str  # closes a message (trained after assistant content)
    sep: str  # text after the end-of-turn token (not trained)
    strip_content: bool
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
    system_in_first_user: bool = False  # no system role: the system prompt opens the first user turn
    tools_block: tuple[str, str] | None = None  # markup around the tool list, before the first user turn

    def header_for(self, role: str) -> str:
        if role in dict(self.headers):
            return dict(self.headers)[role]
        name = self.tool_role if role == "tool" else dict(self.role_names).get(role, role)
        return self.header.format(role=name)

    def eot_for(self, role: str) -> str:
        return dict(self.eots).get(role, self.eot)


_CALLS_JSON = "Call tools by replying with JSON of the form {\"name\": ..., \"arguments\": {...}}.\n"

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
    # Mistral Instruct (v0.1/v0.2 layout: [INST] user [/INST] answer</s>, the system prompt opening
    # the first user turn) with v0.3's tool markup: calls after [TOOL_CALLS], results in
    # [TOOL_RESULTS] ... [/TOOL_RESULTS], the tool list in [AVAILABLE_TOOLS] ... [/AVAILABLE_TOOLS].
    "mistral": ChatTemplate("mistral", "<s>", "", "</s>", "", strip_content=True, tool_role="tool",
                            call_key="arguments", call_open="[TOOL_CALLS] ", call_close="",
                            result_open="", result_close="", tools_intro="",
                            headers=(("user", "[INST] "), ("assistant", ""), ("tool", "[TOOL_RESULTS] ")),
                            eots=(("user", " [/INST]"), ("tool", " [/TOOL_RESULTS]")),
                            system_in_first_user=True, tools_block=("[AVAILABLE_TOOLS] ", " [/AVAILABLE_TOOLS]")),
    # Gemma 2/3: <start_of_turn>user|model ... <end_of_turn>; no system role (it opens the first
    # user turn) and no native tool syntax (calls as JSON, results as a user turn).
    "gemma": ChatTemplate("gemma", "<bos>", "<start_of_turn>{role}\n", "<end_of_turn>", "\n",
                          strip_content=True, tool_role="user", call_key="arguments", call_open="",
                          call_close="", result_open="Tool result:\n", result_close="", tools_intro=_CALLS_JSON,
                          role_names=(("assistant", "model"),), system_in_first_user=True),
    # Phi-3 / Phi-3.5: <|system|>, <|user|>, <|assistant|> headers, <|end|> closes each message.
    "phi3": ChatTemplate("phi3", None, "<|{role}|>\n", "<|end|>", "\n", strip_content=False, tool_role="user",
                         call_key="arguments", call_open="", call_close="", result_open="Tool result:\n",
                         result_close="", tools_intro=_CALLS_JSON),
}

SPECIAL_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|eot_id|>", "<|im_start|>", "<|im_end|>", "<|pad|>",
                  "<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]",
                  "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                  "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>",
                  "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>")


# template=tokenizer: the tokenizer's own Jinja chat_template (keel.data.hf_template).
TOKENIZER = ChatTemplate("tokenizer", None, "", "", "", strip_content=False, tool_role="tool", call_key="arguments",
                         call_open="", call_close="", result_open="", result_close="", tools_intro="")


def get_template(name: str) -> ChatTemplate:
    if name == "tokenizer":
        return TOKENIZER
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}; built-in templates: {sorted(TEMPLATES)}, or tokenizer")
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

    @property
    def tokenizer(self) -> Any:
        return self._tok

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


def _content(msg: dict, template: ChatTemplate, enc: TextEncoder) -> list[int]:
    """Message ids with tool calls and tool results in the template's own syntax.

    User-controlled strings (content, call arguments) are encoded as text; only the
    template's own markup may produce special tokens.
    """
    content = msg["content"].strip() if template.strip_content else msg["content"]
    ids = enc.text(content)
    for i, c in enumerate(msg.get("tool_calls") or []):
        call = json.dumps({"name": c["function"]["name"], template.call_key: c["function"].get("arguments", {})},
                          ensure_ascii=False)
        lead = "\n" if (ids or i) else ""
        ids += enc.text(lead) + enc.markup(template.call_open) + enc.text(call) + enc.markup(template.call_close)
    if msg["role"] == "tool":
        ids = enc.markup(template.result_open) + ids + enc.markup(template.result_close)
    return ids


def _with_tools(messages: list[dict], tools: list | None, template: ChatTemplate) -> list[dict]:
    """Put the tool definitions into the system prompt (one is added if there is none)."""
    if not tools or template.tools_block:
        return messages
    listing = template.tools_intro + "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    if messages and messages[0]["role"] == "system":
        first = {**messages[0], "content": messages[0]["content"] + "\n\n" + listing}
        return [first, *messages[1:]]
    return [{"role": "system", "content": listing}, *messages]


def _fold_system(messages: list[dict], template: ChatTemplate) -> list[dict]:
    """Templates without a system role open the first user turn with the system prompt."""
    if not template.system_in_first_user or not messages or messages[0]["role"] != "system":
        return messages
    system, rest = messages[0]["content"], list(messages[1:])
    for i, m in enumerate(rest):
        if m["role"] == "user":
            rest[i] = {**m, "content": system + "\n\n" + m["content"]}
            return rest
    raise ValueError(f"template {template.name} has no system role and the conversation has no user turn")


def _tools_segment(tools: list | None, template: ChatTemplate, enc: TextEncoder) -> list[Segment]:
    if not tools or not template.tools_block:
        return []
    opening, closing = template.tools_block
    ids = enc.markup(opening) + enc.text(json.dumps(tools, ensure_ascii=False)) + enc.markup(closing)
    return [Segment(ids, "system", "header", -1)]


def render_chat(messages: list[dict], enc: TextEncoder, template: ChatTemplate,
                tools: list | None = None) -> list[Segment]:
    """Render a validated conversation into segments with exact message spans."""
    if template is TOKENIZER:
        from keel.data.hf_template import render_with_tokenizer

        return render_with_tokenizer(messages, enc.tokenizer, tools)
    segs: list[Segment] = []
    if template.bos:
        segs.append(Segment([enc.special(template.bos)], "system", "bos", -1))
    segs += _tools_segment(tools, template, enc)
    for i, msg in enumerate(_fold_system(_with_tools(messages, tools, template), template)):
        role = msg["role"]
        segs.append(Segment(enc.markup(template.header_for(role)), role, "header", i))
        segs.append(Segment(_content(msg, template, enc), role, "content", i))
        segs.append(Segment(enc.markup(template.eot_for(role)), role, "eot", i))
        if template.sep:
            segs.append(Segment(enc.text(template.sep), role, "sep", i))
    return segs


def render_text(text: str, enc: TextEncoder, template: ChatTemplate, eos_token: str) -> list[Segment]:
    """Render a plain-text (pretraining-style) example: [bos] text eos."""
    segs: list[Segment] = []
    bos = enc.tokenizer.bos_token if template is TOKENIZER else template.bos
    if bos:
        segs.append(Segment([enc.special(bos)], "text", "bos", -1))
    segs.append(Segment(enc.text(text), "text", "content", 0))
    segs.append(Segment([enc.special(eos_token)], "text", "eos", 0))
    return segs


def generation_prompt(messages: list[dict], enc: TextEncoder, template: ChatTemplate,
                      tools: list | None = None) -> list[int]:
    """Ids of a conversation rendered as in training, followed by the assistant header: what a model
    continues to answer it (in-training evaluation generates from exactly the trained layout)."""
    if template is TOKENIZER:
        from keel.data.hf_template import template_ids

        return template_ids(enc.tokenizer, messages, tools, generation_prompt=True)
    ids = [i for seg in render_chat(messages, enc, template, tools) for i in seg.ids]
    return ids + enc.markup(template.header_for("assistant"))


def end_of_turn_ids(enc: TextEncoder, template: ChatTemplate) -> list[int]:
    """The token that closes an assistant turn when the template's end-of-turn is a single token."""
    if template is TOKENIZER:
        return []
    ids = enc.markup(template.eot_for("assistant"))
    return ids if len(ids) == 1 else []
