"""A slow start-up says what it waits on; JIT builds go to a folder of their own per environment (that a stale
build lock no longer stops a run: tests/integration/test_resume.py's reference run starts beside one)."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

from keel.train import startup


def _stale_build_lock(extensions: Path) -> Path:
    """What a build killed while compiling leaves: FileBaton's lock file in the op's build folder."""
    lock = extensions / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    os.close(os.open(lock, os.O_CREAT | os.O_EXCL))  # exactly FileBaton.try_acquire; the killed holder never removes it
    return lock


def test_a_slow_start_up_names_the_lock_it_waits_on(tmp_path, capsys):
    from torch.utils.file_baton import FileBaton

    lock = _stale_build_lock(tmp_path / "ext")

    def waiter() -> None:
        with startup.watch(3, "engine start-up", notice_s=0.2):
            FileBaton(str(lock), wait_seconds=0.02).wait()  # what torch's JIT build does behind a held lock

    t = threading.Thread(target=waiter)
    t.start()
    seen, deadline = "", time.monotonic() + 30
    while "still running" not in seen and time.monotonic() < deadline:
        time.sleep(0.05)
        seen += capsys.readouterr().out
    lock.unlink()  # what the message tells the user to do
    t.join(timeout=30)
    assert not t.is_alive()
    assert seen.startswith(f"rank 3: engine start-up still running after 0.2 s; waiting on the lock file {lock}, "
                           "created "), seen
    assert f"if no process is building in {lock.parent}, delete it" in seen


def test_jit_builds_get_a_folder_per_environment(monkeypatch, tmp_path):
    from types import SimpleNamespace

    from keel.launch import ray_cluster

    cfg = SimpleNamespace(cluster=SimpleNamespace(use_gpu=False))
    monkeypatch.setenv("KEEL_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    folder = Path(ray_cluster.worker_env(cfg)["TORCH_EXTENSIONS_DIR"])
    import deepspeed
    import torch

    assert folder.parent == tmp_path / "torch_extensions"
    v = sys.version_info
    assert folder.name.startswith(f"py{v.major}{v.minor}-torch{torch.__version__}-deepspeed{deepspeed.__version__}-"
                                  .replace("+", "_"))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/elsewhere")  # the user's choice stands
    assert ray_cluster.worker_env(cfg)["TORCH_EXTENSIONS_DIR"] == "/elsewhere"
