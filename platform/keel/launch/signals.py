"""Preemption: SIGTERM/SIGUSR1 to the driver ask every rank to finish its step, checkpoint and stop."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

# Exit status of a run stopped by preemption after checkpointing (EX_TEMPFAIL): a launcher
# requeues the job, and the same run directory resumes from that checkpoint.
EXIT_PREEMPTED = 75


def on_preemption(run_dir: Path) -> None:
    """Install the handlers (after ``ray.init``, which installs its own SIGTERM handler): each writes the run
    dir's preemption flag, which every rank reads before its next step."""
    from keel.train.trainer import PREEMPT_FLAG  # here: the trainer's imports are the workers', not the CLI's

    (run_dir / PREEMPT_FLAG).unlink(missing_ok=True)

    def handler(signum: int, frame: Any) -> None:
        print(f"keel: received {signal.Signals(signum).name}: checkpointing after the current step", flush=True)
        (run_dir / PREEMPT_FLAG).write_text(str(signum))

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, handler)
