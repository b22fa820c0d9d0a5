"""Shared fixtures: the tiny tokenizer/model (built offline, cached), W&B offline."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_path() -> str:
    from keel.config import TinyModelConfig
    from keel.model.tiny import ensure_tiny

    return str(ensure_tiny(TinyModelConfig()))


@pytest.fixture(scope="session")
def tokenizer(tiny_path):
    from keel.model.build import load_tokenizer

    return load_tokenizer(tiny_path)
