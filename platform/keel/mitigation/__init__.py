"""Forgetting-mitigation plugins, selected with ``mitigation=[...]`` (see ``base``)."""

from __future__ import annotations

from typing import Any

from keel.mitigation.base import Mitigation
from keel.mitigation.conservative_lr import MAX_EPOCHS, ConservativeLR, epoch_warnings, lr_warnings
from keel.mitigation.ewc import Ewc
from keel.mitigation.lora import Lora
from keel.mitigation.progressive import Progressive
from keel.mitigation.replay import Replay

PLUGINS: dict[str, type[Mitigation]] = {"replay": Replay, "conservative_lr": ConservativeLR, "lora": Lora,
                                         "progressive": Progressive, "ewc": Ewc}


def build(cfg: Any) -> list[Mitigation]:
    """The enabled plugins, in a fixed order."""
    return [PLUGINS[name](getattr(cfg.mitigation, name)) for name in cfg.mitigation.enabled]


def configured(cfg: Any) -> list[Mitigation]:
    """The enabled plugins, each having adjusted ``cfg`` in turn: what a driver (train, preprocess) starts with."""
    plugins = build(cfg)
    for plugin in plugins:
        plugin.configure(cfg)
    return plugins


def warnings_for(cfg: Any, plugins: list[Mitigation], report: dict) -> list[str]:
    """Plugin checks, plus the general warnings when no LR plugin is active (LoRA: no full-fine-tune LR one)."""
    out = [w for p in plugins for w in (*p.check_config(cfg), *p.check_data(report))]
    names = {p.name for p in plugins}
    if "conservative_lr" not in names:
        out += epoch_warnings(report, MAX_EPOCHS) if "lora" in names else lr_warnings(cfg, report)
    return out
