"""What the configuration's keys may be: the names (and a data format's fields) that ``keel.config``
validates against, defined here once; the implementations import them from here.

A leaf: standard library and ``keel.errors`` only, so the data path, the checkers (run under a bare
system Python by the sandbox tests) and the config schema can all import it cheaply.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import PurePath

from keel.errors import ConfigError

# data.sources[*].format: the canonical formats (detection order matters: the first format whose required
# fields a row has wins), aliases, each format's field names (renamable with ``fields``) and required fields.
FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "gsm8k", "text")
FORMAT_ALIASES = {"openai": "messages", "hf": "messages", "conversations": "sharegpt"}
_CHAT_FIELDS = ("messages", "role", "content", "tool_calls", "tools", "system", "reasoning_content")
DEFAULT_FIELDS: dict[str, dict[str, str]] = {
    "messages": {k: k for k in _CHAT_FIELDS},
    "sharegpt": {"messages": "conversations", "role": "from", "content": "value", "tool_calls": "tool_calls",
                 "tools": "tools", "system": "system", "reasoning_content": "reasoning_content"},
    "alpaca": {k: k for k in ("instruction", "input", "output", "system", "history")},
    "prompt_completion": {k: k for k in ("prompt", "completion", "system")},
    "gsm8k": {k: k for k in ("question", "answer")},
    "text": {"text": "text"},
}
REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "messages": ("messages",), "sharegpt": ("messages",), "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"), "gsm8k": ("question", "answer"), "text": ("text",),
}
# A source path names a Hugging Face dataset (not data files) by its spelling: this prefix, or no suffix of a
# data file Keel reads (keel.data.sources has a reader for each).
HF_PREFIX = "hf:"
DATA_FILE_SUFFIXES = (".json", ".jsonl", ".ndjson", ".parquet", ".csv")
# template.name: the built-in chat templates (keel.data.template), then the Jinja ones (keel.data.hf_template).
BUILT_IN_TEMPLATES = ("llama3", "llama3.1", "chatml", "qwen2.5", "qwen3", "mistral", "gemma", "phi3")
TEMPLATES = (*BUILT_IN_TEMPLATES, "tokenizer", "jinja")
MASKINGS = ("assistant_only", "last_turn", "all_tokens")  # masking.name (keel.data.masking)
MIXES = ("temperature", "proportional", "quality", "explicit", "schedule")  # mix.name (keel.data.pipeline)
INTERPOLATIONS = ("linear", "step")  # between mixture schedule points (keel.data.mixing.Schedule)
PACKING_STRATEGIES = ("bfd", "ffd", "first_fit", "pad")  # packing.strategy (keel.data.packing)
MODEL_DTYPES = ("float32", "bfloat16")  # model.dtype
# model.attention: Keel's packed-attention backends (keel.model.attention), or auto (the best available);
# deprecated names are still accepted, mapped with a warning.
ATTENTION_BACKENDS = ("sdpa_block", "flex", "torch_varlen", "fa_varlen")
ATTENTION_ALIASES = {"flash_attn": "fa_varlen"}
LR_SCHEDULES = ("cosine", "linear", "constant", "wsd")  # trainer.lr_schedule (keel.train.schedule)
LOSS_NORMS = ("token", "sequence")  # trainer.loss_norm (the loss's normaliser, keel.core.loss)
# eval.passk.checker: the answer checkers (keel.eval.checkers); those that execute model output need opt-in.
CHECKERS = ("contains", "exact", "math", "python", "regex")
CODE_CHECKERS = ("python",)
# What eval.every_n_steps measures besides the validation loss: held-out pretraining perplexity, and pass@k
# with diversity and sample generations (keel.eval.hook).
EVAL_TASKS = ("forgetting", "passk")


def check_format(fmt: str) -> str:
    """The canonical name of ``fmt`` ("auto" or a known format); ConfigError otherwise."""
    name = FORMAT_ALIASES.get(fmt, fmt)
    if name != "auto" and name not in FORMATS:
        raise ConfigError(f"unknown data format {fmt!r}; choose 'auto' or one of {list(FORMATS)}")
    return name


def check_fields(fmt: str, fields: Mapping[str, str] | None) -> None:
    """Raise ConfigError if ``fields`` renames a field that ``fmt`` (or no format, for auto) has."""
    if not fields:
        return
    known = set().union(*DEFAULT_FIELDS.values()) if fmt == "auto" else set(DEFAULT_FIELDS[fmt])
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError(f"fields: {unknown} not used by format {fmt!r}; known fields: {sorted(known)}")
    bad = [k for k, v in fields.items() if not isinstance(v, str) or not v]
    if bad:
        raise ConfigError(f"fields: the names given for {bad} must be non-empty strings")


def names_dataset(path: str) -> bool:
    """Whether ``path`` names a Hugging Face dataset (``hf:`` or a folder) rather than data files; by its
    spelling alone, so a config checks the same on every node."""
    return str(path).startswith(HF_PREFIX) or PurePath(str(path)).suffix.lower() not in DATA_FILE_SUFFIXES
