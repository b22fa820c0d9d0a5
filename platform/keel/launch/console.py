"""The console of ``keel train``: Keel's own lines and each library warning once; the rest in ``<run>/logs/``.

By default Ray does not stream worker output to the driver (``log_to_driver=False``) and Ray Data
draws no progress bars. Each Ray Train worker sends its stdout and stderr, at the file-descriptor
level (so C++ and library output too), to ``<run>/logs/rank<r>.log``. On rank 0 the lines that
Keel's own modules print (the worker's "what runs where", progress lines, warnings, exports;
``print`` is wrapped and its caller's module decides) and the first occurrence of each Python
warning also go to ``<run>/logs/console.log``, which the driver follows and prints. When the
workers fail, the driver prints the end of every rank's log above the error (Ray's error carries
the worker traceback); at the end the job's Ray worker logs on this node (controller, data,
workers) are copied to ``<run>/logs/ray/``.

``keel train -v`` / ``--verbose`` (or ``KEEL_VERBOSE=1``) streams every worker's output as Ray does.
"""

from __future__ import annotations

import builtins
import os
import shutil
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

VERBOSE_ENV = "KEEL_VERBOSE"
LOGS = "logs"
CONSOLE = "console.log"  # rank 0's console lines, followed by the driver
TAIL_LINES = 8  # per rank, printed when the workers fail
TAIL_RANKS = 8


def verbose() -> bool:
    """``keel train -v``: every worker's output on the console, as Ray streams it."""
    return os.environ.get(VERBOSE_ENV, "").lower() in ("1", "true", "yes")


def logs_dir(run_dir: Path) -> Path:
    return run_dir / LOGS


def worker_env() -> dict[str, str]:
    """Environment of every Ray worker unless verbose: no Ray Data progress bars (they redraw per row), and
    print() left alone by Ray Train (it would route every print through the root logger, a second copy)."""
    return {} if verbose() else {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


def rank_log(run_dir: Path, rank: int) -> Path:
    return logs_dir(run_dir) / f"rank{rank}.log"


def keel_print(original: Callable[..., None], console: TextIO) -> Callable[..., None]:
    """``print`` that also copies to ``console`` what a ``keel.*`` module prints. The caller of print decides,
    whatever wraps ``sys.stdout`` (W&B's console capture does), so no call site changes."""

    def print_(*objects: Any, sep: str | None = " ", end: str | None = "\n", file: Any = None,
               flush: bool = False) -> None:
        original(*objects, sep=sep, end=end, file=file, flush=flush)
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if file in (None, sys.stdout, sys.stderr) and caller.startswith("keel."):
            console.write((" " if sep is None else sep).join(map(str, objects)) + ("\n" if end is None else end))
            console.flush()

    return print_


def warn_once(console: TextIO) -> None:
    """Show each warning as before (into the log), and its first occurrence also on the console."""
    shown = warnings.showwarning
    seen: set[tuple[str, str]] = set()

    def show(message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        shown(message, category, filename, lineno, file, line)
        key = (category.__name__, str(message))
        if key not in seen:
            seen.add(key)
            console.write(f"warning: {category.__name__}: {message} ({filename}:{lineno})\n")
            console.flush()

    warnings.showwarning = show


def setup_worker(run_dir: Path, rank: int) -> None:
    """On a Ray Train worker (quiet console): its output into ``logs/rank<r>.log``; rank 0's Keel lines and
    first warnings also into ``logs/console.log``. Nothing changes when verbose."""
    if verbose():
        return
    logs_dir(run_dir).mkdir(parents=True, exist_ok=True)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    fd = os.open(rank_log(run_dir, rank), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)  # file descriptors: C++ (gloo, NCCL), DeepSpeed op builds and Python alike
    os.dup2(fd, 2)
    os.close(fd)
    if rank == 0 and not getattr(builtins.print, "keel_console", False):  # once per process
        console = open(logs_dir(run_dir) / CONSOLE, "a", encoding="utf-8")  # noqa: SIM115 (the process's lifetime)
        builtins.print = keel_print(builtins.print, console)
        builtins.print.keel_console = True  # type: ignore[attr-defined]
        warn_once(console)


class Follower:
    """The driver's view of ``logs/console.log``: prints what rank 0 appends, line by line, while running."""

    def __init__(self, run_dir: Path, out: TextIO | None = None, every_s: float = 0.3) -> None:
        self.path = logs_dir(run_dir) / CONSOLE
        self.pos = self.path.stat().st_size if self.path.is_file() else 0  # earlier starts' lines are not shown
        self.out, self.every_s = out, every_s
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="keel-console", daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(self.every_s):
            self.drain(whole_lines=True)

    def drain(self, whole_lines: bool = False) -> None:
        if not self.path.is_file():
            return
        with self.path.open("rb") as fh:
            fh.seek(self.pos)
            data = fh.read()
        if whole_lines:
            data = data[: data.rfind(b"\n") + 1]
        if data:
            self.pos += len(data)
            out = self.out or sys.stdout
            out.write(data.decode("utf-8", errors="replace"))
            out.flush()

    def __enter__(self) -> Follower:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join()
        self.drain()


def log_sizes(run_dir: Path) -> dict[Path, int]:
    """The size of every rank log now (what a failure report skips: earlier starts' output)."""
    return {p: p.stat().st_size for p in logs_dir(run_dir).glob("rank*.log")}


def failure_report(run_dir: Path, since: dict[Path, int]) -> str:
    """The last lines every rank wrote to its log since ``since`` (sizes from :func:`log_sizes`)."""
    logs = sorted(logs_dir(run_dir).glob("rank*.log"), key=lambda p: int(p.stem[4:]) if p.stem[4:].isdigit() else 0)
    parts = []
    for path in logs[:TAIL_RANKS]:
        with path.open("rb") as fh:
            fh.seek(since.get(path, 0))
            lines = [ln for ln in fh.read().decode("utf-8", errors="replace").splitlines() if ln.strip()]
        parts += [f"  {path.stem} | {ln}" for ln in lines[-TAIL_LINES:]]
    more = f" ({len(logs) - TAIL_RANKS} more rank logs there)" if len(logs) > TAIL_RANKS else ""
    return f"keel: the workers failed; the end of each worker's log in {logs_dir(run_dir)}{more}:\n" + "\n".join(parts)


@contextmanager
def following(run_dir: Path) -> Iterator[None]:
    """Around the workers' run on the driver: rank 0's console lines printed as they come; on failure the
    end of every rank's log; the job's Ray worker logs kept in ``logs/ray/``. Only the Ray logs when verbose."""
    if verbose():
        try:
            yield
        finally:
            keep_ray_logs(run_dir)
        return
    since = log_sizes(run_dir)
    try:
        with Follower(run_dir):
            yield
    except Exception:
        print(failure_report(run_dir, since), flush=True)
        raise
    finally:
        keep_ray_logs(run_dir)


def keep_ray_logs(run_dir: Path) -> None:
    """Copy this job's Ray worker logs on this node (controller, data, train workers) to ``logs/ray/``."""
    try:
        import ray

        # Private: Ray has no public API for the session's log directory.
        src = Path(ray._private.worker._global_node.get_logs_dir_path())
        job = ray.get_runtime_context().get_job_id()
    except Exception:  # Ray Client or no local node: the logs stay with Ray
        return
    dst = logs_dir(run_dir) / "ray"
    for path in src.glob(f"worker-*-{job}-*"):
        if path.is_file() and path.stat().st_size:
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dst / path.name)
