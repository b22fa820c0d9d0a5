"""Start-up timeline: with ``KEEL_TIMELINE=FILE`` set, ``keel train``'s driver and rank 0's worker append one JSON
line per phase they finish (``{"t": unix time, "pid", "what"}``) to FILE; unset, :func:`mark` does nothing.

``bench/startup.py`` sets it and turns the marks into the start-up breakdown of docs/benchmarks.md. The variable
reaches the Ray workers with the rest of Keel's environment (``keel.launch.ray_cluster.worker_env``).
"""

from __future__ import annotations

import json
import os
import time

ENV = "KEEL_TIMELINE"


def mark(what: str, at: float | None = None) -> None:
    """Record that the phase ``what`` ends now, or at the unix time ``at`` (one short append; a no-op without
    ``KEEL_TIMELINE``)."""
    path = os.environ.get(ENV)
    if not path:
        return
    line = json.dumps({"t": time.time() if at is None else at, "pid": os.getpid(), "what": what}) + "\n"
    with open(path, "a", encoding="utf-8") as fh:  # O_APPEND: the driver's and rank 0's lines never interleave
        fh.write(line)


def process_started() -> float | None:
    """When this process started (unix time), from ``/proc`` (Linux; None elsewhere)."""
    try:
        stat = open(f"/proc/{os.getpid()}/stat", encoding="ascii").read()
        uptime = float(open("/proc/uptime", encoding="ascii").read().split()[0])
    except OSError:
        return None
    ticks = int(stat[stat.rfind(")") + 2:].split()[19])  # field 22, starttime: clock ticks after boot
    return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
