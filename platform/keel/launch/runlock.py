"""One writer per directory: an exclusive ``flock`` on ``<dir>/keel.lock`` for the life of a run.

``keel train`` locks its run directory (before Hydra writes into it, and again, idempotently, in the
driver), ``keel preprocess`` its ``--out`` folder; ``keel train data.preprocessed=DIR`` takes a shared
lock on DIR while it reads it. A second writer is refused at once with the holder named (host, pid,
start time, attempt, command), which the holder writes into the lock file. The kernel drops the lock
when the holding process ends, however it ends (``kill -9``, node reboot, a Slurm requeue's new job),
so a stale lock file never blocks anyone: only a live holder does.

On NFS, Linux emulates ``flock`` with a whole-file POSIX lock, visible from every client; Lustre needs
the ``flock`` mount option (with ``localflock`` the lock is per node). Where the filesystem refuses
locks, a warning says so and the run goes on unlocked. The lock file is opened once per process and
never closed while held: with POSIX-emulated locks, closing any descriptor of the file would drop it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from keel.errors import UserError

LOCK_FILE = "keel.lock"


class DirectoryInUse(UserError):
    """Another live process holds the directory's lock (a user error: the message names it)."""


@dataclass
class DirLock:
    """A held lock (``fd`` -1: the filesystem does not support locks; nothing is held)."""

    path: Path
    fd: int
    holder: dict = field(default_factory=dict)
    shared: bool = False

    @property
    def attempt(self) -> str:
        """This run's attempt id (every checkpoint it writes carries it)."""
        return self.holder.get("attempt", "")


_HELD: dict[str, DirLock] = {}


def new_attempt() -> str:
    """A unique, readable id for one start of a run: start time, host, pid and a random suffix."""
    return f"{time.strftime('%Y%m%dT%H%M%S')}-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


def acquire(directory: Path, command: str) -> DirLock:
    """Hold ``directory``'s lock exclusively until the process ends (or :func:`release`); a second call from
    the same process returns the same lock. Raises :class:`DirectoryInUse` naming the live holder."""
    key = str(directory.resolve())
    if key in _HELD and not _HELD[key].shared:
        return _HELD[key]
    directory.mkdir(parents=True, exist_ok=True)
    lock = _take(directory, exclusive=True)
    if lock.fd >= 0:
        lock.holder = {"host": socket.gethostname(), "pid": os.getpid(),
                       "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "attempt": new_attempt(), "command": command}
        data = (json.dumps(lock.holder) + "\n").encode()
        os.ftruncate(lock.fd, 0)
        os.pwrite(lock.fd, data, 0)
        os.fsync(lock.fd)
    else:
        lock.holder = {"attempt": new_attempt()}
    _HELD[key] = lock
    return lock


def acquire_shared(directory: Path) -> DirLock:
    """A shared lock while reading ``directory``: refused (naming the writer) while a writer holds it."""
    lock = _take(directory, exclusive=False)
    lock.shared = True
    return lock


def release(lock: DirLock) -> None:
    """Drop ``lock`` (the process's end drops it too)."""
    if lock.fd >= 0:
        fcntl.flock(lock.fd, fcntl.LOCK_UN)
        os.close(lock.fd)
        lock.fd = -1
    key = str(lock.path.parent.resolve())
    if _HELD.get(key) is lock:
        del _HELD[key]


def _take(directory: Path, exclusive: bool) -> DirLock:
    path = directory / LOCK_FILE
    try:
        fd = (os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644) if exclusive
              else os.open(path, os.O_RDONLY | os.O_CLOEXEC))
    except OSError:
        if exclusive:
            raise
        return DirLock(path, -1)  # no lock file (never written by a locking writer) or not ours to open: no writer
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise DirectoryInUse(in_use_message(directory, exclusive)) from None
        print(f"warning: cannot lock {path} ({os.strerror(err.errno or 0)}: the filesystem does not support flock); "
              "a second run in this directory will not be detected", flush=True)
        return DirLock(path, -1)
    return DirLock(path, fd)


def holder(directory: Path) -> dict:
    """What the last exclusive holder wrote into the lock file ({} when unreadable or being written)."""
    for _ in range(10):  # the holder writes right after it locks: give it a moment
        try:
            text = (directory / LOCK_FILE).read_text()
            if text.strip():
                return json.loads(text)
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    return {}


def _alive_here(h: dict) -> bool | None:
    """Whether the recorded holder still runs (None: it ran on another host, which cannot be checked)."""
    if h.get("host") != socket.gethostname() or not isinstance(h.get("pid"), int):
        return None
    try:
        os.kill(h["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def in_use_message(directory: Path, exclusive: bool = True) -> str:
    """Who holds ``directory``'s lock, as far as the lock file tells."""
    h = holder(directory)
    who = (f"{h.get('command', 'keel')} (pid {h.get('pid')} on host {h.get('host')}, started {h.get('started')}, "
           f"attempt {h.get('attempt')})") if h else "another process"
    lock = directory / LOCK_FILE
    if not exclusive:
        return f"{directory} is being written by {who} (lock {lock}); wait for it to end"
    if h and _alive_here(h) is False:  # the last writer ended: a reader holds it (a shared lock writes nothing)
        who = (f"a process reading it (e.g. `keel train data.preprocessed={directory}`); the last writer, {who}, "
               "has ended")
    return (f"{directory} is in use by {who}: it holds the lock {lock}. Wait for it to end or use another directory "
            "(the lock goes with its holder, so there is nothing to delete)")
