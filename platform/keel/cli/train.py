"""``keel train``: compose the Hydra config, validate it, run. ``-v``/``--verbose``: every worker's output on the
console (keel.launch.console)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from keel.config import KeelConfig

ConfigStore.instance().store(name="keel_schema", node=KeelConfig)


def validate(cfg: DictConfig) -> KeelConfig:
    """Typed, value-checked config; a user error exits with the offending key named."""
    try:
        return OmegaConf.to_object(cfg)
    except ValueError as err:
        sys.exit(f"keel: {err}")


VERBOSE_FLAGS = ("-v", "--verbose")


def main() -> None:
    """``keel train [-v] [hydra options and overrides]``."""
    if any(a in VERBOSE_FLAGS for a in sys.argv[1:]):
        from keel.launch.console import VERBOSE_ENV

        os.environ[VERBOSE_ENV] = "1"
        sys.argv = [a for a in sys.argv if a not in VERBOSE_FLAGS]
    _main()


@hydra.main(version_base=None, config_path="pkg://keel.conf", config_name="config")
def _main(cfg: DictConfig) -> None:
    keel_cfg = validate(cfg)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    keel_cfg.run_dir = str(run_dir)
    from keel.launch.driver import run_training

    try:
        summary = run_training(keel_cfg, run_dir)
    except ValueError as err:  # user errors (bad data, unavailable backend): no traceback
        sys.exit(f"keel: {err}")
    if summary.get("preempted"):
        from keel.launch.driver import EXIT_PREEMPTED

        print(f"keel: preempted; checkpoint {summary['checkpoint_dir']}; rerun with the same run dir to resume")
        sys.exit(EXIT_PREEMPTED)
