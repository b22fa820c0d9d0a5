"""Shared fixtures: the tiny tokenizer/model (built offline, cached), W&B offline, and ``compose``: a Keel
config composed through Hydra the way ``keel train`` composes it (``from tests.conftest import compose``)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from collections.abc import Callable
    from contextlib import AbstractContextManager

    from keel.config import KeelConfig
    from omegaconf import DictConfig

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def keel_hydra() -> AbstractContextManager:
    """Hydra initialised on Keel's packaged configs (``pkg://keel.conf``), for code that needs Hydra running
    (e.g. ``keel.cli.explicit.user_keys``); importing keel.config registers the schema they name."""
    import keel.config  # noqa: F401  (registers the ``keel_schema`` node)
    from hydra import initialize_config_module

    return initialize_config_module(config_module="keel.conf", version_base=None)


def compose(*overrides: str, validate: Callable[[DictConfig], Any] | None = None) -> KeelConfig | Any:
    """``conf/config.yaml`` composed with ``overrides`` and typed into the validated ``KeelConfig`` (a bad value
    raises); ``validate``: another step from the composed ``DictConfig`` to the config (e.g. keel.cli.train's
    ``checked``, as ``keel train`` validates it)."""
    from hydra import compose as hydra_compose
    from omegaconf import OmegaConf

    with keel_hydra():
        cfg = hydra_compose(config_name="config", overrides=list(overrides))
        return (validate or OmegaConf.to_object)(cfg)


@pytest.fixture(scope="session")
def tiny_path() -> str:
    from keel.config import TinyModelConfig
    from keel.model.tiny import ensure_tiny

    return str(ensure_tiny(TinyModelConfig()))


@pytest.fixture(scope="session")
def tokenizer(tiny_path):
    from keel.model.build import load_tokenizer

    return load_tokenizer(tiny_path)
