"""Worker start-up: no JIT-built DeepSpeed op to wait for, and a start-up that says what it waits on.

On CPU, DeepSpeed's communication backend JIT-compiles its shared-memory op (``deepspeed_shm_comm``)
when it starts, under a ``lock`` file (torch's ``FileBaton``) in torch's extensions cache, which every
environment of the user shares. A process killed while building leaves the lock file, and every later
start waits on it forever. Only DeepSpeed's inference all-reduce uses that op; Keel's collectives go
through ``torch.distributed`` (gloo on CPU), so Keel does not build it (:func:`skip_shm_comm_op`).
Other JIT builds, should a configuration need one, go to a folder keyed by the Python, torch and
DeepSpeed versions and install paths under Keel's cache (:func:`extensions_dir`), and a start-up that
takes longer than :data:`NOTICE_S` prints what it waits on (:func:`watch`): a lock file with its path
and age, or the function it is in.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

NOTICE_S = 120.0  # loading an 8B model takes a while; a lock wait lasts forever


def skip_shm_comm_op() -> None:
    """Stop DeepSpeed's torch backend from building (and waiting on the build lock of) its shm op."""
    try:  # by name: `import deepspeed.comm.torch as m` would bind the torch package deepspeed.comm imports
        ds_torch = importlib.import_module("deepspeed.comm.torch")
    except ImportError:
        return
    if hasattr(ds_torch, "build_shm_op"):
        ds_torch.build_shm_op = lambda: None  # TorchBackend then keeps shm_comm_op None: plain torch collectives


def extensions_dir(cache: Path) -> Path:
    """Where torch JIT-builds extensions for this environment: one folder per Python, torch and DeepSpeed
    version and install path, so environments never rebuild in, or wait on, each other's folder."""
    parts = [f"py{sys.version_info.major}{sys.version_info.minor}"]
    where = []
    for pkg in ("torch", "deepspeed"):
        try:
            parts.append(f"{pkg}{importlib.metadata.version(pkg)}")
        except importlib.metadata.PackageNotFoundError:
            continue
        spec = importlib.util.find_spec(pkg)
        where.append(str(spec.origin if spec else ""))
    key = hashlib.sha256("\n".join(where).encode()).hexdigest()[:10]
    return cache / "torch_extensions" / f"{'-'.join(parts)}-{key}".replace("+", "_")


def _lock_waited_on(frame: object) -> str | None:
    """The lock file a ``FileBaton.wait`` in ``frame``'s stack waits on."""
    while frame is not None:
        code = frame.f_code  # type: ignore[attr-defined]
        if code.co_name == "wait" and code.co_filename.endswith("file_baton.py"):
            baton = frame.f_locals.get("self")  # type: ignore[attr-defined]
            return str(getattr(baton, "lock_file_path", "")) or None
        frame = frame.f_back  # type: ignore[attr-defined]
    return None


def waiting_on(thread_id: int) -> str:
    """What the thread ``thread_id`` is waiting on, in words."""
    frame = sys._current_frames().get(thread_id)
    if frame is None:
        return "nothing (the thread ended)"
    lock = _lock_waited_on(frame)
    if lock:
        try:
            age = f", created {time.time() - os.stat(lock).st_mtime:.0f} s ago"
        except OSError:
            age = ""
        return (f"the lock file {lock}{age}, which torch's JIT extension build holds while compiling; a build killed "
                "while holding it (out of memory, Ctrl-C, kill) leaves it behind: if no process is building in "
                f"{os.path.dirname(lock)}, delete it")
    return f"{frame.f_code.co_name} ({frame.f_code.co_filename}:{frame.f_lineno})"


@contextmanager
def watch(rank: int, what: str, notice_s: float = NOTICE_S) -> Iterator[None]:
    """Past ``notice_s`` inside, print once what this thread waits on (it goes on waiting)."""
    done, me = threading.Event(), threading.get_ident()

    def notice() -> None:
        if not done.wait(notice_s):
            print(f"rank {rank}: {what} still running after {notice_s:g} s; waiting on {waiting_on(me)}", flush=True)

    threading.Thread(target=notice, daemon=True, name=f"keel-startup-rank{rank}").start()
    try:
        yield
    finally:
        done.set()
