"""Hydra callbacks of ``keel train`` (registered in ``conf/config.yaml`` under ``hydra.callbacks``)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback


class LockRunDir(Callback):
    """Lock the run directory before Hydra writes ``.hydra/`` into it: a second run there is refused before it
    touches anything (the driver takes the same lock again, idempotently, for the run's life)."""

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        from keel.launch.runlock import DirectoryInUse, acquire

        try:
            acquire(Path(str(config.hydra.run.dir)).absolute(), "keel train")
        except DirectoryInUse as err:
            sys.exit(f"keel: {err}")
