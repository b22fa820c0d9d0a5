"""The training run of one data-parallel worker (engine-agnostic about Ray): the Trainer and the state it owns.

The path of a step: the bundle of step N (this rank's packed rows, in order) -> ``train_step`` (forward and
backward of each micro-batch through the chunked-loss head, the update; ``keel.train.step``) -> the numeric
guards (skipped non-finite steps, loss spikes and their rollback; ``keel.train.guards``, ``keel.train.resume``)
-> the metrics row (rank 0's ``RunLogger``) -> evaluation when due (``keel.train.evaluator``) -> a checkpoint
when due (``keel.train.cadence``) -> an export when due (``keel.train.export``) -> the plugins' ``end_step``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from keel.config import KeelConfig, to_plain
from keel.core.timeline import mark
from keel.core.worker import WorkerInfo
from keel.mitigation import build as build_mitigations
from keel.train import checkpoint as ckpt
from keel.train import export as exports
from keel.train import fault, flops, resume, startup
from keel.train.cadence import CheckpointCadence
from keel.train.engine import attention_calls, build_engine, check_backend, resolve_attention, seed_all
from keel.train.evaluator import Evaluator
from keel.train.guards import StepGuards
from keel.train.resume import ResumePoint
from keel.train.step import StepRequests, train_step
from keel.train.watchdog import Watchdog

if TYPE_CHECKING:
    from keel.tracking.logger import RunLogger

# Written by the driver on SIGTERM/SIGUSR1 (keel.launch.signals); every rank checkpoints after the current step.
PREEMPT_FLAG = "PREEMPT"


def train(cfg: KeelConfig, info: WorkerInfo, bundles: Iterator[dict]) -> dict:
    """Run (or resume) ``trainer.max_steps`` optimizer steps; returns rank 0's results."""
    return Trainer(cfg, info, bundles).run()


class Trainer:
    """One worker's run: the engine, the plugins, rank 0's logger, the guards, the checkpoint cadence, the
    evaluator and the watchdog, built in that order (every rank runs the same collectives in the same order)."""

    def __init__(self, cfg: KeelConfig, info: WorkerInfo, bundles: Iterator[dict]) -> None:
        seed_all(cfg.trainer.seed)
        self.cfg, self.bundles = cfg, bundles
        self.info = replace(info, attention=resolve_attention(cfg, info))
        self._mark("attention")
        self.plugins = [*build_mitigations(cfg), *fault.plugins(cfg.fault, self.info)]
        loaded = resume.worker_point(cfg, self.info)  # a collective: each rank hashes the files it will load
        self.engine, self._hf_ds = self._start_engine(loaded)  # _hf_ds: transformers holds it by a weak reference
        self.plugin_info = self._setup_plugins()
        self.engine.train()
        self.start = resume.load(self.engine, self.info, loaded)
        self._mark("engine")
        self.logger = self._logger()
        self._mark("logger")
        self.flops_of = flops.counter(self.engine.module)
        self.peak = flops.device_peak(cfg.cluster.use_gpu, cfg.trainer.peak_tflops)
        self.t_start = time.perf_counter()
        self.guards = StepGuards(cfg.trainer, self.logger.history if self.logger is not None else None)
        self.checkpoints = CheckpointCadence(cfg, self.info, self.start, loaded)
        self.evaluator = Evaluator(cfg, self.info, self.logger)
        self.dog = Watchdog(cfg.trainer.step_timeout_s, self.info.run_dir, self.info.rank)
        self.end, self.preempted = self.start, False  # end: the last step trained

    def run(self) -> dict:
        """Train from the resumed step to ``trainer.max_steps``, an early stop or a preemption; rank 0's results."""
        self._baseline_evaluation()
        last = self.start if self.evaluator.stopped else self.cfg.trainer.max_steps  # early-stopped, resumed: done
        for step in range(self.start + 1, last + 1):
            going_on = self._iteration(step)
            if step == self.start + 1:
                self._mark("first_step")
            if not going_on:
                break
        self._mark("last_step")
        self.dog.close()
        self.evaluator.say_stopped(self.end)
        return self._finish()

    def _iteration(self, step: int) -> bool:
        """Optimizer step ``step`` (1-based) and what follows it; whether the run goes on."""
        self.dog.arm(step)  # data wait, step, evaluation and checkpoint of this iteration
        m, bad, timed = self._train(step)
        self._guard_and_log(step, m, bad)
        improved = self._evaluate(step)  # before the checkpoint: a resume from it keeps this evaluation
        self.checkpoints.after_step(self.engine, step, self.preempted, timed, improved)
        self.end = step
        if self.preempted or self.evaluator.stopped:
            return False
        self._export_along(step)
        for plugin in self.plugins:
            plugin.end_step(step)
        self.dog.disarm()
        return True

    def _train(self, step: int) -> tuple[dict, bool, bool]:
        """Step ``step``'s bundle through ``train_step``: its metrics with throughput, whether it was skipped
        (non-finite), and whether a timed checkpoint is due; notes a preemption request."""
        t0 = time.perf_counter()
        bundle = next_bundle(self.bundles, step - 1, self.info.rank)
        t_data = time.perf_counter() - t0
        requests = StepRequests(save=self.checkpoints.timed_due(),
                                stop=(self.info.run_dir / PREEMPT_FLAG).exists())
        for plugin in self.plugins:
            plugin.begin_step(step)
        m = train_step(self.engine, bundle, self.cfg, self.info.world_size, self.plugins, requests)
        dt = time.perf_counter() - t0
        if step == self.start + 1:
            check_backend(self.info.attention)
        done = self.flops_of(m["tokens"], m.pop("sum_sq_lengths"))
        self.preempted, timed, bad = m.pop("stop"), m.pop("save"), m.pop("bad")
        return flops.step_metrics(m, dt, t_data, done, self.peak, self.info.world_size), bad, timed

    def _guard_and_log(self, step: int, m: dict, bad: bool) -> None:
        """The numeric guards on step ``step`` (count a skipped step, warn about a loss spike and roll it back),
        rank 0's metrics row, then the stop after too many skipped steps (alike on every rank)."""
        spiked = self.guards.judge(step, m, bad)
        # Before this step's checkpoint: a rollback must never be preceded by saving the spiked weights.
        to = resume.spike_rollback(self.engine, self.cfg, self.info, spiked, self.checkpoints.restore, step)
        rolled = self.guards.rolled(step, to)
        if self.logger is not None:
            sources = dict(zip(self.info.source_names, self.info.step_source_tokens[step - 1]))
            self.logger.log({"step": step, **m, **self.guards.row(bad), **rolled,
                             **{f"data/tokens/{k}": v for k, v in sources.items()}})
        self.guards.bad.check(step)  # same decision on every rank: it rests on all-reduced values

    def _baseline_evaluation(self) -> None:
        if self.evaluator.baseline_due(self.start):
            with self.dog.watch(0, "evaluation"):
                self.evaluator.evaluate(self.engine, 0)  # the model before any update

    def _evaluate(self, step: int) -> bool:
        """Evaluate after step ``step`` when due (not when preempted); whether its val/loss is the best so far."""
        if self.preempted or not self.evaluator.due(step):
            return False
        return self.evaluator.evaluate(self.engine, step)

    def _export_along(self, step: int) -> None:
        t = self.cfg.trainer
        if exports.due(step, t.export_every, t.max_steps):
            exports.save_along(self.info.run_dir, step, self.info.rank, t.keep_exports,
                               lambda out: exports.export_model(self.engine, self.cfg, self.info, self.plugins, out))

    def _finish(self) -> dict:
        """Final checkpoint at the last step trained and model export (both skipped when preempted); rank 0's
        run result."""
        train_s = time.perf_counter() - self.t_start
        exported = {"hf_dir": None}
        if not self.preempted:
            self.checkpoints.final(self.engine, self.end)
            self._mark("checkpoint")
            exported = exports.export_model(self.engine, self.cfg, self.info, self.plugins)
            self._mark("export")
        return self._result(train_s, exported) if self.logger is not None else {}

    def _result(self, train_s: float, exported: dict) -> dict:
        """Rank 0's run result, which its logger writes as the run's final metrics."""
        from keel.model.build import param_counts

        trainable, total = param_counts(self.engine.module)
        result = {**self.logger.totals(), "resumed_from_step": self.start, "train_s": train_s,
                  "preempted": self.preempted, "checkpoint_dir": str(ckpt.complete(self.info.run_dir)[-1]),
                  **exported, "trainable_params": trainable, "total_params": total, "attention": self.info.attention,
                  "attention_calls": attention_calls(), **self.plugin_info, **self.guards.counts(),
                  **self.evaluator.summary()}
        if self.logger.eval_history:
            result["eval"] = self.logger.eval_history[-1]  # the last in-training evaluation
        self.logger.finish(result)
        return result

    def _mark(self, what: str) -> None:
        """A start-up timeline mark (``keel.core.timeline``), from rank 0 only."""
        if self.info.rank == 0:
            mark(what)

    def _start_engine(self, loaded: ResumePoint | None) -> tuple[Any, Any]:
        with startup.watch(self.info.rank, "engine start-up"):  # past a bound, says what it waits on
            return build_engine(self.cfg, self.info, self.plugins, load_universal=bool(loaded and loaded.universal))

    def _setup_plugins(self) -> dict:
        """Each plugin's set-up on the engine, which still holds the base weights (a collective); their facts for
        the run result."""
        return {k: v for p in self.plugins for k, v in p.setup_engine(self.engine, self.cfg, self.info).items()}

    def _logger(self) -> RunLogger | None:
        """Rank 0's metrics logger (metrics.jsonl, eval.jsonl, W&B), carried on from the steps before a resume."""
        if self.info.rank != 0:
            return None
        from keel.tracking.logger import RunLogger

        return RunLogger(self.cfg, self.info.run_dir, to_plain(self.cfg), self.cfg.trainer.max_steps, self.start)


def next_bundle(bundles: Iterator[dict], index: int, rank: int) -> dict:
    """The bundle of step ``index`` (0-based); after an in-place restart the stream may begin earlier."""
    while True:
        bundle = next(bundles)
        if int(np.asarray(bundle["step"]).reshape(-1)[0]) >= index:
            _check_bundle(bundle, index, rank)
            return bundle


def _check_bundle(bundle: dict, index: int, rank: int) -> None:
    got = int(np.asarray(bundle["step"]).reshape(-1)[0])
    slot = int(np.asarray(bundle["slot"]).reshape(-1)[0])
    if (got, slot) != (index, rank):
        raise RuntimeError(f"data order broken: rank {rank} expected its rows of step {index}, "
                           f"got rank {slot}'s rows of step {got}")
