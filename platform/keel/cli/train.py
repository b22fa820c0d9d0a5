"""``keel train``: compose the Hydra config, validate it, run. ``-v``/``--verbose``: every worker's output on the
console (keel.launch.console)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from keel.choices import CODE_CHECKERS
from keel.config import KeelConfig, require_gpu
from keel.errors import ConfigError, UserError
from keel.eval import checkers, sandbox
from keel.tracking.secrets import load_secret_files, redact

# Hydra's own flags that take a value; `keel train` accepts them anywhere among the overrides.
VALUE_FLAGS = ("--config-dir", "-cd", "--config-name", "-cn", "--config-path", "-cp", "--cfg", "-c",
               "--package", "-p", "--experimental-rerun")
INFO_TOPICS = ("all", "config", "defaults", "defaults-tree", "plugins", "searchpath")


def argv(args: list[str]) -> list[str]:
    """Hydra's flags first, then the overrides: Hydra's parser takes its flags only before the overrides, and
    a launcher such as slurm/sft.sh puts its own overrides before the user's ``--config-dir my_conf
    +experiment=NAME``."""
    flags, overrides, i = [], [], 0
    while i < len(args):
        arg = args[i]
        takes = arg in VALUE_FLAGS or (arg in ("--info", "-i") and i + 1 < len(args) and args[i + 1] in INFO_TOPICS)
        if arg.startswith("-") and takes and i + 1 < len(args):
            flags += args[i:i + 2]
            i += 2
            continue
        (flags if arg.startswith("-") else overrides).append(arg)
        i += 1
    return flags + overrides


def resolve_code_execution(cfg: KeelConfig) -> None:
    """A code-executing checker during training (``eval.passk.checker=python``) needs the opt-in: the config key
    or ``KEEL_ALLOW_CODE_EXECUTION``, resolved into the config here so the Ray workers see it. Only the opt-in
    (keel submit validates on a machine that may lack the sandbox; keel train checks bubblewrap at start)."""
    e = cfg.eval
    if not (e.every_n_steps > 0 and "passk" in e.tasks and e.passk.checker in CODE_CHECKERS):
        return
    e.passk.allow_code_execution = sandbox.code_execution_allowed(e.passk.allow_code_execution)
    try:
        sandbox.require_opt_in(e.passk.allow_code_execution, checkers.OPT_IN_HOW)
    except UserError as err:
        raise ConfigError(f"config error: eval.passk.checker={e.passk.checker}: {err}") from None


def checked(cfg: DictConfig, explicit: set[str] | None = None) -> KeelConfig:
    """The composed config typed and value-checked (raising ConfigError naming the key), with what depends on
    this environment resolved. ``explicit``: the length keys the user set (``keel.cli.explicit``), which
    decide between trainer.epochs and max_steps."""
    from keel.cli.explicit import settle_length

    settle_length(cfg, explicit or set())
    try:
        keel_cfg = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:  # a value missing or of the wrong type: a config error too
        raise ConfigError(f"config error: {err}") from err
    resolve_code_execution(keel_cfg)
    return keel_cfg


def validate(cfg: DictConfig, explicit: set[str] | None = None) -> KeelConfig:
    """:func:`checked`; a user error exits with the offending key named, in one line."""
    try:
        return checked(cfg, explicit)
    except UserError as err:
        sys.exit(f"keel: {err}")


def write_hydra_record(cfg: DictConfig) -> Path:
    """Hydra's record of the run (``config.yaml``, ``hydra.yaml``, ``overrides.yaml``), secrets redacted.

    conf/config.yaml turns Hydra's own writing off (``hydra.output_subdir: null``): it writes
    overrides and config in clear. Keel writes the same files, redacted, to ``.hydra/`` (or over
    Hydra's, where a user set ``hydra.output_subdir`` again).
    """
    hc = HydraConfig.get()
    out = Path(hc.runtime.output_dir) / (hc.output_subdir or ".hydra")
    out.mkdir(parents=True, exist_ok=True)
    records = {"config.yaml": OmegaConf.to_container(cfg, resolve=False),
               "hydra.yaml": {"hydra": OmegaConf.to_container(hc, resolve=False)},
               "overrides.yaml": list(hc.overrides.task)}
    for name, data in records.items():
        (out / name).write_text(OmegaConf.to_yaml(OmegaConf.create(redact(data))), encoding="utf-8")
    return out


def _explicit() -> set[str]:
    """The length keys this run's user set (command line, their own config files)."""
    from keel.cli.explicit import user_keys

    hc = HydraConfig.get()
    return user_keys(hc.job.config_name, [*hc.overrides.hydra, *hc.overrides.task])


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
    try:
        load_secret_files()  # keel submit --secret-file: read here, so redaction knows the values too
    except UserError as err:
        sys.exit(f"keel: {err}")
    write_hydra_record(cfg)
    keel_cfg = validate(cfg, _explicit())
    try:
        require_gpu(keel_cfg)  # before Ray or any model work
    except UserError as err:
        sys.exit(f"keel: {err}")
    if keel_cfg.eval.every_n_steps > 0 and keel_cfg.eval.passk.checker in CODE_CHECKERS:
        try:
            checkers.require_code_execution(keel_cfg.eval.passk.allow_code_execution)  # bubblewrap, before Ray
        except UserError as err:
            sys.exit(f"keel: {err}")
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    keel_cfg.run_dir = str(run_dir)
    from keel.launch.driver import run_training

    try:
        summary = run_training(keel_cfg, run_dir)
    except UserError as err:  # user errors (bad data, unavailable backend): no traceback
        sys.exit(f"keel: {err}")
    if summary.get("preempted"):
        from keel.launch.driver import EXIT_PREEMPTED

        print(f"keel: preempted; checkpoint {summary['checkpoint_dir']}; rerun with the same run dir to resume")
        sys.exit(EXIT_PREEMPTED)
