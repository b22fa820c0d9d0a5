"""Conservative learning rate: the seed's preset against forgetting, and its warnings."""

from __future__ import annotations

from keel.config import KeelConfig
from keel.mitigation.base import Mitigation

FULL_FT_MAX_LR = 1e-5
MAX_EPOCHS = 3.0


def epoch_warnings(report: dict, max_epochs: float) -> list[str]:
    """Sources seen more than ``max_epochs`` times in the planned rows."""
    out = []
    for name, s in report["sources"].items():
        if s.get("epochs", 0) > max_epochs:
            out.append(f"source {name!r} is seen {s['epochs']:.1f} times (> {max_epochs:g} epochs): "
                       "repeated passes accelerate forgetting and overfitting")
    return out


def lr_warnings(cfg: KeelConfig, report: dict) -> list[str]:
    """Warnings for a full fine-tune that risks forgetting (issued without this plugin too)."""
    out = []
    if cfg.trainer.lr > FULL_FT_MAX_LR:
        out.append(f"full fine-tune at lr {cfg.trainer.lr:g} > {FULL_FT_MAX_LR:g} risks catastrophic "
                   "forgetting of a pretrained model (see mitigation=conservative_lr)")
    return out + epoch_warnings(report, MAX_EPOCHS)


class ConservativeLR(Mitigation):
    name = "conservative_lr"

    def configure(self, cfg: KeelConfig) -> None:
        o = self.options
        print(f"conservative_lr: trainer.lr {cfg.trainer.lr:g} -> {o.lr:g}, "
              f"warmup_steps {cfg.trainer.warmup_steps} -> {o.warmup_steps}")
        cfg.trainer.lr = o.lr
        cfg.trainer.warmup_steps = o.warmup_steps

    def check_data(self, report: dict) -> list[str]:
        return epoch_warnings(report, self.options.max_epochs)
