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

import json
import os
import re
from pathlib import Path
from typing import Any

from keel.errors import UserError

REDACTED = "<redacted>"
SECRET_FILES_ENV = "KEEL_SECRET_FILES"  # JSON {ENV_NAME: path}: secrets passed by reference (keel submit --secret-file)
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
    """Values of secret environment variables (by name, or loaded from a secret file), longest first."""
    by_file = set(_secret_files(os.environ.get(SECRET_FILES_ENV, "")))
    values = {v for k, v in os.environ.items() if (is_secret_key(k) or k in by_file) and len(v) >= 8}
    return sorted(values, key=len, reverse=True)


def _secret_files(spec: str) -> dict[str, str]:
    """The ``KEEL_SECRET_FILES`` mapping; UserError when it is not a JSON object of names to paths."""
    if not spec:
        return {}
    try:
        files = json.loads(spec)
    except ValueError:
        files = None
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise UserError(f"{SECRET_FILES_ENV} must be a JSON object mapping environment variable names to file "
                         f"paths, got {spec[:200]!r}")
    return files


def load_secret_files() -> list[str]:
    """Set each variable named in ``KEEL_SECRET_FILES`` from its file (on this node); the names set.

    ``keel submit --secret-file KEY=PATH`` sends only the path: the job's driver and every worker
    read the secret here, from a file the cluster already holds, so it never enters the job's
    ``runtime_env`` (which the Ray GCS stores and the dashboard shows).
    """
    files = _secret_files(os.environ.get(SECRET_FILES_ENV, ""))
    for key, path in files.items():
        try:
            os.environ[key] = Path(path).expanduser().read_text(encoding="utf-8").strip()
        except OSError as err:
            raise UserError(f"secret file for {key} ({SECRET_FILES_ENV}, keel submit --secret-file): cannot read "
                             f"{path} on {os.uname().nodename}: {err.strerror}") from None
    return sorted(files)


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
