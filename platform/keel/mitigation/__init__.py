"""Forgetting-mitigation plugins, selected with ``mitigation=[...]`` (see ``base``)."""

from __future__ import annotations

from typing import Any

from keel.mitigation.base import Mitigation
from keel.mitigation.conservative_lr import ConservativeLR, lr_warnings
from keel.mitigation.replay import Replay

PLUGINS: dict[str, type[Mitigation]] = {"replay": Replay, "conservative_lr": ConservativeLR}


def build(cfg: Any) -> list[Mitigation]:
    """The enabled plugins, in a fixed order."""
    return [PLUGINS[name](getattr(cfg.mitigation, name)) for name in cfg.mitigation.enabled]


def warnings_for(cfg: Any, plugins: list[Mitigation], report: dict) -> list[str]:
    """Plugin checks, plus the general full-fine-tune warnings when no LR plugin is active."""
    out = [w for p in plugins for w in p.check_data(report)]
    if not any(p.name == "conservative_lr" for p in plugins):
        out += lr_warnings(cfg, report)
    return out
