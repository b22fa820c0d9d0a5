"""Canonical conversations and their validation.

A canonical example is either ``{"messages": [{"role", "content"}, ...]}`` (chat) or
``{"text": str}`` (pretraining-style). ``validate`` returns the reason a row cannot be
trained, or ``None``; callers count and write rejected rows, never drop them silently.
"""

from __future__ import annotations

from typing import Any

from keel.data.template import ROLES


def _message_problem(i: int, msg: Any) -> str | None:
    if not isinstance(msg, dict):
        return f"messages[{i}]: not an object"
    role, content = msg.get("role"), msg.get("content")
    if role not in ROLES:
        return f"messages[{i}].role: unknown role {role!r}"
    if not isinstance(content, str):
        return f"messages[{i}].content: not a string"
    if not content.strip():
        return f"messages[{i}].content: empty"
    return None


def _order_problem(messages: list[dict]) -> str | None:
    roles = [m["role"] for m in messages]
    if "system" in roles[1:]:
        return "messages: system message after the first turn"
    turns = roles[1:] if roles[0] == "system" else roles
    if not turns or turns[0] != "user":
        return "messages: conversation must start with a user turn"
    for a, b in zip(turns, turns[1:]):
        if a == b:
            return f"messages: two consecutive {a} turns"
    if "assistant" not in turns:
        return "messages: no assistant turn"
    return None


def validate(example: Any) -> str | None:
    """The reason this example is unusable, or None when it is valid."""
    if not isinstance(example, dict):
        return "row: not an object"
    if "text" in example and "messages" not in example:
        text = example["text"]
        if not isinstance(text, str):
            return "text: not a string"
        return None if text.strip() else "text: empty"
    messages = example.get("messages")
    if not isinstance(messages, list) or not messages:
        return "messages: missing or empty"
    for i, msg in enumerate(messages):
        problem = _message_problem(i, msg)
        if problem:
            return problem
    return _order_problem(messages)
