"""What the user set, as opposed to a default or a preset: the command line and the user's own config files.

``trainer.epochs`` and ``trainer.max_steps`` both give a run's length. A default or a preset's
``max_steps`` gives way to an ``epochs`` the user set; both set by the user is an error naming
both. "Set by the user" means a command-line override of the key, or a value in a config file the
user brought (``--config-dir`` / ``hydra.searchpath``: an experiment file, their own primary config
or group option), found by walking the defaults list Hydra composed the config from.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from keel.errors import ConfigError

LENGTH_KEYS = ("trainer.max_steps", "trainer.epochs")
# Config sources that hold the user's own files (Keel's package is "main", Hydra's own "hydra").
USER_PROVIDERS = ("command-line", "hydra.searchpath in command-line", "hydra.searchpath in main")


def _sets(node: Any, key: str) -> bool:
    """Whether a config fragment gives ``key`` a value."""
    return isinstance(node, DictConfig) and OmegaConf.select(node, key, default="__absent__") != "__absent__"


def _override_sets(override: Any, key: str) -> bool:
    """Whether one parsed command-line override sets ``key`` (directly, or as part of a dict value)."""
    if override.is_delete() or override.is_hydra_override():
        return False
    name = override.key_or_group
    if name == key:
        return True
    if key.startswith(name + "."):
        value = override.value()
        return isinstance(value, dict) and _sets(OmegaConf.create(value), key[len(name) + 1:])
    return False


def _file_keys(loader: Any, config_name: str, overrides: list[str], keys: tuple[str, ...]) -> set[str]:
    """Which of ``keys`` the user's own config files (in the composed defaults list) set."""
    from hydra._internal.defaults_list import create_defaults_list

    parsed, repo = loader._parse_overrides_and_create_caching_repo(config_name, overrides)
    defaults = create_defaults_list(repo=repo, config_name=config_name, overrides_list=parsed,
                                    prepend_hydra=False, skip_missing=False)
    found: set[str] = set()
    for d in defaults.defaults:
        if d.config_path is None:
            continue
        loaded = repo.load_config(d.config_path)
        if loaded is None or loaded.provider not in USER_PROVIDERS:
            continue
        node = loaded.config
        package = d.package if d.package is not None else loaded.header.get("package")
        if package:
            node = OmegaConf.create()
            OmegaConf.update(node, package, loaded.config, merge=False)
        found |= {k for k in keys if _sets(node, k)}
    return found


def user_keys(config_name: str, overrides: list[str], keys: tuple[str, ...] = LENGTH_KEYS) -> set[str]:
    """Which of ``keys`` the user set, on the command line (``overrides``) or in their own config files.

    Call it while Hydra is initialised (inside ``@hydra.main`` or an ``initialize_*`` block).
    """
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides=list(overrides))
    found = {k for k in keys for o in parsed if _override_sets(o, k)}
    return found | _file_keys(GlobalHydra.instance().config_loader(), config_name, list(overrides), keys)


def settle_length(cfg: DictConfig, explicit: set[str]) -> None:
    """Leave one of ``trainer.epochs`` / ``trainer.max_steps`` in the composed config.

    ``epochs`` set (by anyone) and ``max_steps`` not set by the user: ``max_steps`` (a default or a
    preset's) gives way. Both set by the user: a ConfigError naming both. ``max_steps`` set by the user
    and ``epochs`` only by a preset: the user's ``max_steps`` wins.
    """
    if cfg.trainer.get("epochs") is None or cfg.trainer.get("max_steps") is None:
        return
    if {"trainer.epochs", "trainer.max_steps"} <= explicit:
        raise ConfigError(f"config error: trainer.epochs={cfg.trainer.epochs} and trainer.max_steps="
                         f"{cfg.trainer.max_steps} are both set; the run's length comes from one of them")
    if "trainer.max_steps" in explicit:
        cfg.trainer.epochs = None
    else:
        cfg.trainer.max_steps = None
