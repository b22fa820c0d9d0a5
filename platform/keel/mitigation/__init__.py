"""Forgetting-mitigation plugins, selected with ``mitigation=[...]`` (see ``base``), and their hooks composed
for the data pipeline (``keel.data.pipeline.build`` / ``plan_sources``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from keel.config import KeelConfig
from keel.mitigation.base import Mitigation, Plugin
from keel.mitigation.conservative_lr import MAX_EPOCHS, ConservativeLR, epoch_warnings, lr_warnings
from keel.mitigation.ewc import Ewc
from keel.mitigation.lora import Lora
from keel.mitigation.progressive import Progressive
from keel.mitigation.replay import Replay

if TYPE_CHECKING:
    from keel.data.examples import SourceData
    from keel.data.mixing import Schedule

PLUGINS: dict[str, type[Mitigation]] = {"replay": Replay, "conservative_lr": ConservativeLR, "lora": Lora,
                                         "progressive": Progressive, "ewc": Ewc}


def build(cfg: KeelConfig) -> list[Mitigation]:
    """The enabled plugins, in a fixed order."""
    return [PLUGINS[name](getattr(cfg.mitigation, name)) for name in cfg.mitigation.enabled]


def configured(cfg: KeelConfig) -> list[Mitigation]:
    """The enabled plugins, each having adjusted ``cfg`` in turn: what a driver (train, preprocess) starts with."""
    plugins = build(cfg)
    for plugin in plugins:
        plugin.configure(cfg)
    return plugins


def warnings_for(cfg: KeelConfig, plugins: list[Mitigation], report: dict) -> list[str]:
    """Plugin checks, plus the general warnings when no LR plugin is active (LoRA: no full-fine-tune LR one)."""
    out = [w for p in plugins for w in (*p.check_config(cfg), *p.check_data(report))]
    names = {p.name for p in plugins}
    if "conservative_lr" not in names:
        out += epoch_warnings(report, MAX_EPOCHS) if "lora" in names else lr_warnings(cfg, report)
    return out


def adjust_hook(plugins: list[Plugin]) -> Callable[[list[float], list[SourceData]], list[float]]:
    """The ``adjust`` of ``keel.data.pipeline.build``: each plugin adjusts the mixture in turn."""
    def adjust(weights: list[float], sources: list[SourceData]) -> list[float]:
        n = len(weights)
        for p in plugins:  # each plugin's extra sources follow the weights it receives
            extra = len(p.extra_sources())
            weights = p.adjust_weights(weights, sources[: n + extra])
            n += extra
        return weights
    return adjust


def schedule_hook(plugins: list[Plugin]) -> Callable[[Schedule, list[SourceData]], Schedule]:
    """The ``schedule`` of ``keel.data.pipeline.build``: each plugin may change the schedule in turn."""
    def schedule(sched: Schedule, sources: list[SourceData]) -> Schedule:
        for p in plugins:  # each sees the schedule the previous ones returned
            sched = p.schedule(sched, sources)
        return sched
    return schedule
