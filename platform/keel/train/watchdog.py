"""Stall watchdog: bounds each iteration of the training loop (``trainer.step_timeout_s``).

A hung collective, a stalled data stream or a deadlock leaves every rank blocked with nothing to
say. Each rank runs a daemon thread that is armed at the start of a loop iteration (data wait,
step, evaluation, checkpoint) and disarmed at its end. If an iteration runs past the timeout,
the thread writes every thread's Python stack (``faulthandler``) to
``<run>/watchdog/rank<r>-step<k>.txt``, prints a line naming the rank and the step, and ends the
worker process; Ray Train then restarts the group from the last checkpoint
(``cluster.max_failures``) or fails the run, and the driver's error names the stalled ranks.
"""

from __future__ import annotations

import faulthandler
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

DIR = "watchdog"
EXIT_STALLED = 70  # EX_SOFTWARE: the worker ended itself after a stall


class Watchdog:
    """Arm around a unit of work; past ``timeout_s`` dump all stacks and call ``on_timeout`` (default: exit)."""

    def __init__(self, timeout_s: float, run_dir: Path, rank: int,
                 on_timeout: Callable[[Path], None] | None = None, poll_s: float = 1.0) -> None:
        self.timeout_s, self.rank, self.run_dir = timeout_s, rank, run_dir
        self.on_timeout = on_timeout or (lambda _path: os._exit(EXIT_STALLED))
        self._deadline: float | None = None
        self._what = ""
        self._step = 0
        self._stop = threading.Event()
        self._thread = None
        if timeout_s > 0:
            self._thread = threading.Thread(target=self._run, args=(min(poll_s, timeout_s / 4),), daemon=True,
                                            name=f"keel-watchdog-rank{rank}")
            self._thread.start()

    def arm(self, step: int, what: str = "training") -> None:
        """Start bounding the work of optimizer step ``step`` (doing ``what``)."""
        self._step, self._what = step, what
        self._deadline = time.monotonic() + self.timeout_s

    def disarm(self) -> None:
        self._deadline = None

    @contextmanager
    def watch(self, step: int, what: str = "training") -> Iterator[None]:
        """Bound the enclosed work by the timeout."""
        self.arm(step, what)
        try:
            yield
        finally:
            self.disarm()

    def close(self) -> None:
        self._stop.set()

    def _run(self, poll_s: float) -> None:
        while not self._stop.wait(poll_s):
            deadline = self._deadline
            if deadline is not None and time.monotonic() > deadline:
                self._fire()
                return

    def _fire(self) -> None:
        out = self.run_dir / DIR / f"rank{self.rank}-step{self._step}.txt"
        out.parent.mkdir(parents=True, exist_ok=True)
        what = (f"rank {self.rank}: step {self._step} ({self._what}) made no progress for {self.timeout_s:g} s "
                "(trainer.step_timeout_s)")
        with out.open("w") as fh:
            fh.write(f"{what}; Python stacks of every thread:\n\n")
            fh.flush()
            faulthandler.dump_traceback(fh, all_threads=True)
        print(f"watchdog: {what}; stacks in {out}", flush=True)
        self.on_timeout(out)


def reports(run_dir: Path, since: float = 0.0) -> list[Path]:
    """Stack dumps written by the watchdog since ``since`` (a ``time.time()``), by rank."""
    d = run_dir / DIR
    if not d.is_dir():
        return []
    return sorted(p for p in d.glob("rank*-step*.txt") if p.stat().st_mtime >= since)


def stalled_message(dumps: list[Path]) -> str:
    """The driver's error for a run whose workers ended themselves after a stall."""
    firsts = [p.read_text().split(";", 1)[0] for p in dumps]
    return ("training stalled: " + "; ".join(firsts) + f". Python stacks of every thread: {', '.join(map(str, dumps))}"
            " (a rank blocked in a collective is usually waiting for the rank that is elsewhere)")
