"""One rule for what is a secret, and redaction of configs, override strings and URLs by it.

A key (config key, environment variable, query parameter, ``key=value`` override) is secret when
its words (split at ``_``, ``-``, ``.``, spaces and camelCase) contain

- ``password``, ``passwd``, ``passphrase``, ``secret(s)``, ``credential(s)``, ``authorization``,
  ``apikey``, ``cookie``; or
- ``token`` (singular), except a tokenizer's special token (``pad_token``, ``eos_token``...) or
  a token id (``..._token_id``); counts such as ``max_new_tokens`` are plural, so never secret; or
- ``key``/``keys`` as the last word after another one (``api_key``, ``WANDB_API_KEY``,
  ``aws_secret_access_key``, ``private_key``).

Values are redacted where they hold secrets: the value of a secret key (whole), credentials in
a URL (``https://user:pass@host`` keeps the rest: ``https://<redacted>@host``), the value of a
secret ``key=value`` inside a string (query strings, Hydra overrides), a ``Bearer`` token, an
``Authorization:`` header, and any occurrence of the value of a secret environment variable
(8 characters or more).
"""

from __future__ import annotations

import os
import re
from typing import Any

REDACTED = "<redacted>"
SECRET_WORDS = frozenset({"password", "passwd", "passphrase", "secret", "secrets", "credential", "credentials",
                          "authorization", "apikey", "cookie"})
# "<kind>_token" names a tokenizer's special token (a string like "<|eot_id|>"), not a credential.
SPECIAL_TOKEN_KINDS = frozenset({"pad", "eos", "bos", "unk", "sep", "cls", "mask", "eot", "eom", "special", "stop",
                                 "start", "end", "think", "image", "audio", "video", "tool", "added", "fim"})
TOKEN_COUNTS = frozenset({"id", "ids", "count", "counts", "len", "length", "limit", "budget", "index"})

_WORDS = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+")
_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)([^/?#@\s]+)@")
_ASSIGNMENT = re.compile(r"(?<![\w.~+-])([\w.~+-]*[A-Za-z][\w.~+-]*)=([^\s&,;'\"]+)")
_BEARER = re.compile(r"(?i)\b(bearer\s+)[\w.~+/=-]+")
_AUTH_HEADER = re.compile(r"(?i)\b(authorization\s*:\s*)\S+(?:\s+\S+)?")


def key_words(key: Any) -> list[str]:
    """Lower-case words of a key: ``WANDB_API_KEY`` -> wandb, api, key; ``apiKey`` -> api, key."""
    return [w.lower() for w in _WORDS.findall(str(key))]


def is_secret_key(key: Any) -> bool:
    """Whether a key names a secret (see the module docstring for the rule)."""
    words = key_words(key)
    if any(w in SECRET_WORDS for w in words):
        return True
    for i, w in enumerate(words):
        if w == "token":
            before = words[i - 1] if i else ""
            after = words[i + 1] if i + 1 < len(words) else ""
            if before not in SPECIAL_TOKEN_KINDS and after not in TOKEN_COUNTS:
                return True
    return len(words) >= 2 and words[-1] in ("key", "keys")


def _env_secrets() -> list[str]:
    """Values of secret environment variables, longest first (so a longer one is replaced whole)."""
    values = {v for k, v in os.environ.items() if is_secret_key(k) and len(v) >= 8}
    return sorted(values, key=len, reverse=True)


def _assignment(m: re.Match) -> str:
    key = m.group(1).rsplit(".", 1)[-1].lstrip("+~")  # a Hydra override: logger.api_key, +x.token
    return f"{m.group(1)}={REDACTED}" if is_secret_key(key) else m.group(0)


def redact_text(text: str, env_secrets: list[str] | None = None) -> str:
    """``text`` with URL credentials, secret ``key=value`` values, bearer tokens and known secrets replaced."""
    for secret in _env_secrets() if env_secrets is None else env_secrets:
        text = text.replace(secret, REDACTED)
    text = _URL_USERINFO.sub(rf"\1{REDACTED}@", text)
    text = _ASSIGNMENT.sub(_assignment, text)
    text = _AUTH_HEADER.sub(rf"\1{REDACTED}", text)
    return _BEARER.sub(rf"\1{REDACTED}", text)


def redact(obj: Any, env_secrets: list[str] | None = None) -> Any:
    """Copy of a config (dicts, lists, strings) with the values of secret keys and secrets in strings redacted."""
    secrets = _env_secrets() if env_secrets is None else env_secrets
    if isinstance(obj, dict):
        return {k: REDACTED if is_secret_key(k) and v not in (None, "") else redact(v, secrets)
                for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [redact(v, secrets) for v in obj]
    if isinstance(obj, str):
        return redact_text(obj, secrets)
    return obj
