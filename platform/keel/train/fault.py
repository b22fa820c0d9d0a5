"""Test-only fault injection (``fault.*``): a plugin the trainer adds only when a fault is configured.

It kills a rank once per run dir, or hangs one, right after an optimizer step (restart, watchdog and
preemption tests), and poisons rank 0's loss with NaN or multiplies it by 1e3 at given steps (the numeric
guards' tests), in the reported loss and the backward alike, through the plugin hooks every worker runs.
"""

from __future__ import annotations

import os
import threading

import torch

from keel.config import FaultConfig
from keel.core.worker import WorkerInfo
from keel.mitigation.base import Plugin

FIRED = "fault_fired"  # in the run dir: the kill fired once (a restarted group must not fire it again)
KILL_STATUS = 17
SPIKE = 1e3


def plugins(fault: FaultConfig, info: WorkerInfo) -> list[Plugin]:
    """The fault injector when ``fault.*`` asks for a fault, else nothing."""
    wanted = (fault.kill_rank is not None or fault.hang_rank is not None or fault.nan_at_steps
              or fault.spike_at_steps)
    return [FaultInjector(fault, info)] if wanted else []


class FaultInjector(Plugin):
    """``fault.*`` on one worker."""

    name = "fault"

    def __init__(self, fault: FaultConfig, info: WorkerInfo) -> None:
        self.fault, self.info = fault, info
        self.factors: list[float] = []  # what rank 0's first micro-batch loss is multiplied by in this step

    def begin_step(self, step: int) -> None:
        f = self.fault
        rank0 = self.info.rank == 0
        self.factors = ([float("nan")] if rank0 and step in f.nan_at_steps else []) + (
            [SPIKE] if rank0 and step in f.spike_at_steps else [])

    def micro_loss(self, loss: torch.Tensor, micro: int) -> torch.Tensor:
        if micro == 0:
            for factor in self.factors:
                loss = loss * factor
        return loss

    def end_step(self, step: int) -> None:
        """Kill this rank once, or hang it, right after optimizer step ``step``."""
        f, rank = self.fault, self.info.rank
        if f.hang_rank == rank and f.hang_at_step == step:
            print(f"fault injector: rank {rank} hangs after step {step}", flush=True)
            threading.Event().wait()  # forever: the other ranks block in the next collective
        marker = self.info.run_dir / FIRED
        if f.at_step == step and f.kill_rank == rank and not marker.exists():
            marker.write_text(str(step))
            print(f"fault injector: killing rank {rank} after step {step}", flush=True)
            os._exit(KILL_STATUS)
