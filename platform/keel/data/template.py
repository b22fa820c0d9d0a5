r"""Chat templates: the built-in ones, and the one place that chooses a template (:func:`get_template`).

A built-in template (:class:`ChatTemplate`) renders a conversation to *pieces*: runs of text each
labelled with the message, role and kind (header, reasoning, content, end-of-turn, ...) it belongs
to, whose concatenated text is exactly what the model family's own Jinja chat template writes;
``keel.data.encoding`` tokenises them whole, as served, and labels each token. ``template=tokenizer``
and ``template=jinja`` render a Jinja template instead (``keel.data.hf_template``). All three are
:class:`keel.data.encoding.Renderer`\ s; the functions at the end of this module render through it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

from keel.choices import BUILT_IN_TEMPLATES
from keel.data.encoding import Piece, Renderer, Segment, TextEncoder, encode_pieces
from keel.data.formats import ROLES
from keel.data.hf_template import TOKENIZER, load_jinja
from keel.errors import UserError

if TYPE_CHECKING:
    from keel.config import TemplateConfig


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

    # ---- the Renderer protocol (keel.data.encoding)

    uses_jinja = False

    def render(self, messages: list[dict], enc: TextEncoder, tools: list | None = None) -> list[Segment]:
        return encode_pieces(render_pieces(messages, self, tools), enc)

    def generation_prompt(self, messages: list[dict], enc: TextEncoder, tools: list | None = None) -> list[int]:
        pieces = render_pieces(messages, self, tools, generation_prompt=True)
        return [i for seg in encode_pieces(pieces, enc) for i in seg.ids]

    def bos_token(self, enc: TextEncoder) -> str | None:
        return self.bos

    def end_of_turn_ids(self, enc: TextEncoder) -> list[int]:
        ids = enc.markup(self.eot_for("assistant"))
        return ids if len(ids) == 1 else []


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

BUILT_IN: dict[str, ChatTemplate] = {
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
assert tuple(BUILT_IN) == BUILT_IN_TEMPLATES  # keel.config validates template.name against these names
THINK = ("<think>\n", "\n</think>\n\n")  # reasoning markup (Qwen3's; the text rendering of other templates)


def get_template(name: str, path: str | None = None) -> Renderer:
    """The template called ``name`` (``jinja`` reads the Jinja file at ``path``): the one place that chooses."""
    if name == "tokenizer":
        return TOKENIZER
    if name == "jinja":
        return load_jinja(path)
    if name not in BUILT_IN:
        raise UserError(f"unknown template {name!r}; built-in templates: {sorted(BUILT_IN)}, or tokenizer, "
                         f"or jinja (template.path=FILE)")
    return BUILT_IN[name]


def from_config(cfg: TemplateConfig) -> Renderer:
    """The template a ``template`` config group selects (name, and path for ``jinja``)."""
    return get_template(cfg.name, cfg.path)


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
        raise UserError(f"template {template.name} has no system role and the conversation has no user turn")
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


# ---------------------------------------------------------------- rendering through the Renderer


def render_chat(messages: list[dict], enc: TextEncoder, template: Renderer, tools: list | None = None) -> list[Segment]:
    """Render a validated conversation into segments with exact message spans."""
    return template.render(messages, enc, tools)


def render_text(text: str, enc: TextEncoder, template: Renderer, eos_token: str) -> list[Segment]:
    """Render a plain-text (pretraining-style) example: [bos] text eos."""
    segs: list[Segment] = []
    bos = template.bos_token(enc)
    if bos:
        segs.append(Segment([enc.special(bos)], "text", "bos", -1))
    segs.append(Segment(enc.text(text), "text", "content", 0))
    segs.append(Segment([enc.special(eos_token)], "text", "eos", 0))
    return segs


def generation_prompt(messages: list[dict], enc: TextEncoder, template: Renderer,
                      tools: list | None = None) -> list[int]:
    """Ids of a conversation rendered as in training, followed by the assistant header: what a model
    continues to answer it (in-training evaluation generates from exactly the trained layout)."""
    return template.generation_prompt(messages, enc, tools)


def end_of_turn_ids(enc: TextEncoder, template: Renderer) -> list[int]:
    """The token that closes an assistant turn when the template's end-of-turn is a single token."""
    return template.end_of_turn_ids(enc)


def uses_jinja(template: Renderer) -> bool:
    """template=tokenizer or template=jinja: spans come from rendering a Jinja template."""
    return template.uses_jinja
