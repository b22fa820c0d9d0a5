"""Dataset formats, their adapters into canonical conversations, and validation.

A canonical example is either a conversation::

    {"messages": [{"role": "system" | "user" | "assistant" | "tool", "content": str,
                   "tool_calls": [...],  # optional, assistant only
                   "reasoning_content": str,  # optional, assistant only (read from "thinking" too)
                   }, ...],
     "tools": [...]}  # optional

or ``{"text": str}`` (pretraining-style). A tool call is
``{"type": "function", "function": {"name": str, "arguments": dict | str}}``; an assistant
message that calls tools may have empty content.

``to_canonical`` turns one row of a known format into a canonical example (raising
``Reject`` with the reason when it cannot), ``detect_format`` picks a format from a row's
keys, and ``validate`` returns the reason a canonical example cannot be trained, or
``None``. Callers count and write rejected rows, never drop them silently.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

# The formats (in detection order), their aliases and field names are the config's vocabulary
# (data.sources[*].format and fields): defined in keel.choices, with check_format and check_fields.
from keel.choices import DEFAULT_FIELDS, FORMATS, REQUIRED_FIELDS

ROLES = ("system", "user", "assistant", "tool")  # a canonical message's roles
REASONING_ALIASES = ("thinking",)  # read when the reasoning field itself is absent

# Role names seen in the wild -> canonical role. "function_call" is handled apart: it
# becomes a tool call on an assistant message.
ROLE_ALIASES = {
    "system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
    "model": "assistant", "tool": "tool", "observation": "tool", "function": "tool", "ipython": "tool",
}
CALL_ROLES = ("function_call", "tool_call")


class Reject(Exception):
    """A row that cannot be used; ``str()`` is the reason, ``data`` the raw row if any, ``file`` where it was read."""

    def __init__(self, reason: str, data: Any = None, file: str | None = None) -> None:
        super().__init__(reason)
        self.data = data
        self.file = file


# ---------------------------------------------------------------- format and field names


def field_names(fmt: str, fields: Mapping[str, str] | None = None) -> dict[str, str]:
    """Canonical field name -> name in the data, for ``fmt`` with ``fields`` overrides."""
    names = dict(DEFAULT_FIELDS[fmt])
    names.update({k: v for k, v in (fields or {}).items() if k in names})
    return names


def detect_format(row: Any, fields: Mapping[str, str] | None = None) -> str | None:
    """The first format whose required fields ``row`` has, or None."""
    if not isinstance(row, dict):
        return None
    for fmt in FORMATS:
        names = field_names(fmt, fields)
        if all(names[k] in row for k in REQUIRED_FIELDS[fmt]):
            return fmt
    return None


# ---------------------------------------------------------------- field helpers


def _type_name(value: Any) -> str:
    return type(value).__name__


def _required(row: dict, key: str, fmt: str) -> Any:
    if key not in row or row[key] is None:
        raise Reject(f"{key}: missing required field for format {fmt}")
    return row[key]


def _text(row: dict, key: str, fmt: str) -> str:
    value = _required(row, key, fmt)
    if not isinstance(value, str):
        raise Reject(f"{key}: wrong type, expected a string, got {_type_name(value)}")
    if not value.strip():
        raise Reject(f"{key}: empty")
    return value


def _optional_text(row: dict, key: str) -> str:
    value = row.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise Reject(f"{key}: wrong type, expected a string, got {_type_name(value)}")
    return value


def _as_list(value: Any, key: str) -> list:
    """A list field, also accepted as a JSON string of a list (CSV/Parquet columns)."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError) as err:
            raise Reject(f"{key}: malformed JSON: {err}") from None
    if not isinstance(value, (list, tuple)):
        raise Reject(f"{key}: wrong type, expected a list, got {_type_name(value)}")
    return list(value)


def _tools(value: Any, key: str) -> list | None:
    """The tools schema list; empty or absent gives None."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError) as err:
            raise Reject(f"{key}: malformed JSON: {err}") from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise Reject(f"{key}: wrong type, expected a list of tools, got {_type_name(value)}")
    return value or None


# ---------------------------------------------------------------- tool calls


def _arguments(args: Any) -> Any:
    if isinstance(args, str):
        try:
            parsed = json.loads(args)
        except (ValueError, RecursionError):
            return args
        return parsed if isinstance(parsed, dict) else args
    return {} if args is None else args


def _norm_call(call: Any, where: str) -> dict:
    """One tool call in canonical form (accepts OpenAI-nested and flat {name, arguments})."""
    if not isinstance(call, dict):
        raise Reject(f"{where}: wrong type, expected a tool call object, got {_type_name(call)}")
    fn = call["function"] if isinstance(call.get("function"), dict) else call
    name = fn.get("name")
    if not isinstance(name, str) or not name.strip():
        raise Reject(f"{where}.name: missing required field for a tool call")
    args = fn.get("arguments", fn.get("parameters"))
    return {"type": "function", "function": {"name": name, "arguments": _arguments(args)}}


def _parse_calls(value: Any, where: str) -> list[dict]:
    """Tool calls from a function_call turn's value (a JSON string, object or list)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError) as err:
            raise Reject(f"{where}: malformed JSON in function call: {err}") from None
    calls = value if isinstance(value, list) else [value]
    if not calls:
        raise Reject(f"{where}: empty function call")
    return [_norm_call(c, f"{where}[{j}]") for j, c in enumerate(calls)]


def _content(value: Any) -> Any:
    """Message content: None -> "", text parts joined; anything else is left for validate."""
    if value is None:
        return ""
    if isinstance(value, list) and value and all(isinstance(p, dict) and p.get("type") == "text"
                                                 and isinstance(p.get("text"), str) for p in value):
        return "".join(p["text"] for p in value)
    return value


# ---------------------------------------------------------------- adapters


def _add_call(out: list[dict], calls: list[dict]) -> None:
    """Attach tool calls to the preceding assistant turn, or start an assistant turn."""
    if out and out[-1]["role"] == "assistant":
        out[-1].setdefault("tool_calls", []).extend(calls)
    else:
        out.append({"role": "assistant", "content": "", "tool_calls": calls})


def _add_turn(out: list[dict], msg: Any, names: dict[str, str], where: str) -> None:
    if not isinstance(msg, dict):
        raise Reject(f"{where}: wrong type, expected a message object, got {_type_name(msg)}")
    if names["role"] not in msg:
        raise Reject(f"{where}.{names['role']}: missing required field")
    role, value = msg[names["role"]], msg.get(names["content"])
    if role in CALL_ROLES:
        _add_call(out, _parse_calls(value, f"{where}.{names['content']}"))
        return
    turn = {"role": ROLE_ALIASES.get(role, role) if isinstance(role, str) else role, "content": _content(value)}
    _add_reasoning(turn, msg, names["reasoning_content"], where)
    calls = msg.get(names["tool_calls"])
    if calls:
        turn["tool_calls"] = [_norm_call(c, f"{where}.tool_calls[{j}]")
                              for j, c in enumerate(_as_list(calls, f"{where}.tool_calls"))]
    out.append(turn)


def _add_reasoning(turn: dict, msg: dict, key: str, where: str) -> None:
    """An assistant's reasoning trace (``reasoning_content``, also accepted as ``thinking``)."""
    found = next((k for k in (key, *REASONING_ALIASES) if msg.get(k) is not None), None)
    if found is None:
        return
    value = msg[found]
    if not isinstance(value, str):
        raise Reject(f"{where}.{found}: wrong type, expected a string, got {_type_name(value)}")
    if value.strip():
        turn["reasoning_content"] = value


def _turns(messages: list, names: dict[str, str], key: str) -> list[dict]:
    out: list[dict] = []
    for i, msg in enumerate(messages):
        _add_turn(out, msg, names, f"{key}[{i}]")
    return out


def _chat(row: dict, names: dict[str, str], fmt: str) -> dict:
    """OpenAI/HF ``messages`` and ShareGPT ``conversations`` rows."""
    key = names["messages"]
    messages = _as_list(_required(row, key, fmt), key)
    system = _optional_text(row, names["system"])
    out = [{"role": "system", "content": system}] if system.strip() else []
    out += _turns(messages, names, key)
    example: dict[str, Any] = {"messages": out}
    tools = _tools(row.get(names["tools"]), names["tools"])
    if tools:
        example["tools"] = tools
    return example


def _history(value: Any, key: str) -> list[dict]:
    out: list[dict] = []
    for i, pair in enumerate(_as_list(value, key) if value is not None else []):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise Reject(f"{key}[{i}]: wrong type, expected a [user, assistant] pair")
        out += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return out


def _system_turn(row: dict, names: dict[str, str]) -> list[dict]:
    system = _optional_text(row, names["system"])
    return [{"role": "system", "content": system}] if system.strip() else []


def _alpaca(row: dict, names: dict[str, str], fmt: str) -> dict:
    """Alpaca ``instruction``/``input``/``output`` (+ optional ``system``, ``history``)."""
    instruction = _text(row, names["instruction"], fmt)
    extra = _optional_text(row, names["input"])
    output = _text(row, names["output"], fmt)
    user = f"{instruction}\n{extra}" if extra.strip() else instruction
    history = _history(row.get(names["history"]), names["history"])
    turns = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return {"messages": _system_turn(row, names) + history + turns}


def _prompt_completion(row: dict, names: dict[str, str], fmt: str) -> dict:
    """Prompt/completion pairs: strings, or (TRL conversational) lists of messages."""
    prompt, completion = _required(row, names["prompt"], fmt), _required(row, names["completion"], fmt)
    if isinstance(prompt, list) or isinstance(completion, list):
        chat = DEFAULT_FIELDS["messages"]
        turns = _turns(_as_list(prompt, names["prompt"]), chat, names["prompt"])
        turns += _turns(_as_list(completion, names["completion"]), chat, names["completion"])
        return {"messages": turns}
    user, answer = _text(row, names["prompt"], fmt), _text(row, names["completion"], fmt)
    turns = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return {"messages": _system_turn(row, names) + turns}


def _gsm8k(row: dict, names: dict[str, str], fmt: str) -> dict:
    """GSM8K ``question``/``answer`` (the answer keeps its worked solution and final line)."""
    question, answer = _text(row, names["question"], fmt), _text(row, names["answer"], fmt)
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def _plain_text(row: dict, names: dict[str, str], fmt: str) -> dict:
    """Plain ``text`` rows (pretraining-style)."""
    return {"text": _text(row, names["text"], fmt)}


ADAPTERS = {"messages": _chat, "sharegpt": _chat, "alpaca": _alpaca, "prompt_completion": _prompt_completion,
            "gsm8k": _gsm8k, "text": _plain_text}


def to_canonical(row: Any, fmt: str, fields: Mapping[str, str] | None = None) -> dict:
    """Adapt one row of format ``fmt`` to a canonical example; raises Reject with the reason."""
    if not isinstance(row, dict):
        raise Reject(f"row: wrong type, expected an object, got {_type_name(row)}")
    return ADAPTERS[fmt](row, field_names(fmt, fields), fmt)


# ---------------------------------------------------------------- validation


def _calls_problem(i: int, msg: dict) -> str | None:
    calls = msg["tool_calls"]
    if msg["role"] != "assistant":
        return f"messages[{i}].tool_calls: only assistant messages can call tools"
    if not isinstance(calls, list) or not calls:
        return f"messages[{i}].tool_calls: wrong type, expected a non-empty list"
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            return f"messages[{i}].tool_calls[{j}].function.name: missing or not a string"
    return None


def _bad_unicode(s: str) -> bool:
    """True when ``s`` holds lone surrogates (e.g. from a JSON ``\\udc80`` escape)."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _message_problem(i: int, msg: Any) -> str | None:
    if not isinstance(msg, dict):
        return f"messages[{i}]: wrong type, expected an object, got {_type_name(msg)}"
    role, content = msg.get("role"), msg.get("content")
    if role not in ROLES:
        return f"messages[{i}].role: unknown role {role!r} (expected one of {', '.join(ROLES)})"
    if not isinstance(content, str):
        return f"messages[{i}].content: wrong type, expected a string, got {_type_name(content)}"
    if _bad_unicode(content):
        return f"messages[{i}].content: invalid Unicode (lone surrogate)"
    if "tool_calls" in msg:
        problem = _calls_problem(i, msg)
        if problem:
            return problem
    problem = _reasoning_problem(i, msg)
    if problem:
        return problem
    if not content.strip() and not msg.get("tool_calls"):
        return f"messages[{i}].content: empty"
    return None


def _reasoning_problem(i: int, msg: dict) -> str | None:
    reasoning = msg.get("reasoning_content")
    if reasoning is None:
        return None
    if not isinstance(reasoning, str):
        return f"messages[{i}].reasoning_content: wrong type, expected a string, got {_type_name(reasoning)}"
    if msg["role"] != "assistant":
        return f"messages[{i}].reasoning_content: only assistant messages carry reasoning"
    if _bad_unicode(reasoning):
        return f"messages[{i}].reasoning_content: invalid Unicode (lone surrogate)"
    return None


def _step_problem(i: int, role: str, prev: dict | None) -> str | None:
    """What is wrong with a ``role`` turn at index ``i`` following ``prev`` (None at the start)."""
    if role == "system":
        return f"messages[{i}].role: system message after the first turn (turn order)"
    if prev is None:
        if role != "user":
            return (f"messages[{i}].role: wrong turn order, the conversation must start with a user turn "
                    f"(after an optional system message), got {role!r}")
        return None
    if role == "tool":
        if prev["role"] == "tool" or (prev["role"] == "assistant" and prev.get("tool_calls")):
            return None
        return f"messages[{i}].role: wrong turn order, tool result without a preceding assistant tool call"
    if role == prev["role"]:
        return f"messages[{i}].role: wrong turn order, two consecutive {role} turns"
    return None


def _order_problem(messages: list[dict]) -> str | None:
    start = 1 if messages[0]["role"] == "system" else 0
    prev = None
    for i in range(start, len(messages)):
        problem = _step_problem(i, messages[i]["role"], prev)
        if problem:
            return problem
        prev = messages[i]
    if not any(m["role"] == "assistant" for m in messages):
        return "messages: no assistant turn"
    return None


def _chat_problem(example: dict) -> str | None:
    messages = example.get("messages")
    if not isinstance(messages, list):
        return f"messages: missing or wrong type, expected a list, got {_type_name(messages)}"
    if not messages:
        return "messages: empty"
    if "tools" in example and not isinstance(example["tools"], list):
        return f"tools: wrong type, expected a list, got {_type_name(example['tools'])}"
    for i, msg in enumerate(messages):
        problem = _message_problem(i, msg)
        if problem:
            return problem
    return _order_problem(messages)


def _surrogate_field(value: Any, where: str = "") -> str | None:
    """Path of the first string (key or value) holding a lone surrogate, or None."""
    stack = [(where, value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str):
            if _bad_unicode(item):
                return path or "row"
        elif isinstance(item, dict):
            for k, v in reversed(list(item.items())):
                key = f"{path}.{k}" if path else str(k)
                if isinstance(k, str) and _bad_unicode(k):
                    return f"{path or 'row'} (a key)"
                stack.append((key, v))
        elif isinstance(item, list | tuple):
            stack += [(f"{path}[{i}]", v) for i, v in reversed(list(enumerate(item)))]
    return None


def validate(example: Any) -> str | None:
    """The reason this canonical example is unusable, or None when it is valid."""
    if not isinstance(example, dict):
        return f"row: wrong type, expected an object, got {_type_name(example)}"
    # Anywhere (tool calls, tools, system): a lone surrogate cannot be encoded, tokenised or written.
    bad = _surrogate_field(example)
    if bad is not None:
        return f"{bad}: invalid Unicode (lone surrogate)"
    if "text" in example and "messages" not in example:
        text = example["text"]
        if not isinstance(text, str):
            return f"text: wrong type, expected a string, got {_type_name(text)}"
        if _bad_unicode(text):
            return "text: invalid Unicode (lone surrogate)"
        return None if text.strip() else "text: empty"
    return _chat_problem(example)
