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
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n 2`: two test processes share the cores. torch's OpenMP threads spin while they wait, so two
    # processes of two threads each on two cores get through a third of the work one thread each does (measured).
    os.environ.setdefault("OMP_NUM_THREADS", "1")


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


# Test files whose runs depend on the clock (a watchdog, checkpoints by time, a preemption, Slurm's requeue, a worker
# killed mid-run, a second run refused "at once", job submission) or start a Ray instance of their own: under
# pytest-xdist one worker takes them all, one after the other, so no two of them ever overlap.
TIMED = frozenset({"tests/cluster/test_slurm.py", "tests/integration/test_numeric_guards.py",
                   "tests/integration/test_preemption.py", "tests/integration/test_resume.py",
                   "tests/integration/test_ray_jobs.py", "tests/integration/test_ray_local.py"})


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``pytest -n 2``: each test file goes whole to one worker (its module fixtures run once), the TIMED files as
    one unit. (xdist's ``--dist loadgroup`` cannot group them: it renames node ids, which pytest 9 no longer
    reads.)"""
    from xdist.scheduler import LoadScopeScheduling

    class ByFile(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return "timed" if path in TIMED else path

    return ByFile(config, log)
