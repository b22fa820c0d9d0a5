"""Numeric guards (docs/reliability.md): non-finite steps skipped and bounded, loss spikes, timed checkpoints."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from keel.data.masking import IGNORE
from keel.train.guards import BadStepGuard, NonFiniteError, Rollbacks, SpikeDetector, checkpoint_due, is_bad
from keel.train.step import StepRequests, train_step

from tests.conftest import compose


def test_is_bad():
    assert not is_bad(1.0, 2.0, True) and not is_bad(1.0, None, True)
    assert is_bad(math.nan, 2.0, True) and is_bad(1.0, math.inf, True) and is_bad(1.0, 2.0, False)


def test_guard_stops_after_max_bad_consecutive_steps():
    g = BadStepGuard(3)
    for step, bad in enumerate([True, True, False, True, True], start=1):  # a good step resets the run
        g.update(bad)
        g.check(step)
    assert (g.total, g.consecutive) == (4, 2)
    g.update(True)
    with pytest.raises(NonFiniteError, match=r"trainer.max_bad_steps=3") as err:
        g.check(6)
    assert "weights are those of step 3" in str(err.value)
    never = BadStepGuard(0)
    for step in range(1, 50):
        never.update(True)
        never.check(step)
    assert never.total == 49


def test_spike_detector():
    rng = np.random.default_rng(0)
    history = list(2.0 + 0.01 * rng.standard_normal(30))
    d = SpikeDetector(window=20, z=6.0, history=history)
    assert d.observe(2.01) is None and d.observe(math.nan) is None
    z = d.observe(2.5)
    assert z is not None and z > 6 and d.total == 1
    assert d.observe(1.5) is None  # a drop is no spike
    assert len(d.losses) == 20
    young = SpikeDetector(window=50, z=6.0, history=[2.0] * 5)  # needs 10 losses before it judges
    assert young.observe(100.0) is None and young.total == 0
    assert SpikeDetector(window=0, z=6.0, history=[2.0] * 30).observe(100.0) is None


def test_forgetting_a_rolled_back_spike_restores_the_window():
    d = SpikeDetector(window=10, z=6.0, history=[2.0 + 0.01 * (i % 3) for i in range(12)])
    before = list(d.losses)  # full: the spike pushes the oldest loss out
    assert d.observe(50.0) is not None and d.losses[-1] == 50.0 and list(d.losses)[:-1] == before[1:]
    d.forget_last()
    assert list(d.losses) == before and d.total == 1  # the window as before the spike; the spike stays counted
    assert d.observe(50.0) is not None and d.total == 2  # judged against the clean window, so a spike again
    young = SpikeDetector(window=10, z=6.0, history=[2.0] * 3)  # not full: nothing was evicted
    young.observe(9.0)
    young.forget_last()
    assert list(young.losses) == [2.0] * 3


def test_rollback_counts_and_their_resume():
    r = Rollbacks()
    assert r.record(3, None) == {"rollbacks": 0, "rolled_back_steps": 0}
    assert r.record(7, 4) == {"rollbacks": 1, "rolled_back_steps": 3, "rolled_back_to": 4}
    assert r.record(9, 8) == {"rollbacks": 2, "rolled_back_steps": 4, "rolled_back_to": 8}
    with pytest.raises(AssertionError):
        r.record(9, 9)  # a checkpoint of the spike step itself is never a rollback target
    rows = [{"step": 9, "rollbacks": 2, "rolled_back_steps": 4}]
    assert Rollbacks.carried(rows) == Rollbacks(2, 4) and Rollbacks.carried([]) == Rollbacks()
    assert Rollbacks.carried([{"step": 1}]) == Rollbacks()  # metrics.jsonl from before rollbacks were counted


def test_checkpoint_due():
    assert not checkpoint_due(100.0, 0.0, 0)
    assert checkpoint_due(100.0, 40.0, 60) and not checkpoint_due(99.0, 40.0, 60)


def test_config_validates_guard_fields():
    cfg = compose()
    assert (cfg.trainer.max_bad_steps, cfg.trainer.spike_window, cfg.trainer.spike_z) == (5, 50, 6.0)
    assert cfg.trainer.checkpoint_every_s == 0 and cfg.fault.nan_at_steps == []
    for bad in ("trainer.max_bad_steps=-1", "trainer.checkpoint_every_s=-5", "trainer.spike_z=0",
                "trainer.spike_window=-1"):
        with pytest.raises(Exception, match=bad.split("=")[0]):
            compose(bad)


class _Engine:
    """Stands in for DeepSpeed's ZeRO engine: skips the update when a backward loss is not finite."""

    def __init__(self, skips: bool = True) -> None:
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(8, 8)
        self.backward_losses: list[float] = []
        self.skips, self.sched_steps = skips, 0
        self.lr_scheduler = SimpleNamespace(get_last_lr=lambda: [0.1], step=self._sched_step)

    def _sched_step(self):
        self.sched_steps += 1

    device = torch.device("cpu")

    def __call__(self, input_ids, position_ids, **attention_kwargs):
        return SimpleNamespace(logits=self.emb(input_ids))

    def backward(self, loss, scale_wrt_gas):
        self.backward_losses.append(float(loss.detach()))

    def step(self):
        pass

    def get_global_grad_norm(self):
        return math.inf if not all(map(math.isfinite, self.backward_losses)) else 1.0

    def was_step_applied(self):
        return not (self.skips and not all(map(math.isfinite, self.backward_losses)))


def _bundle():
    ids = np.array([[0, 1, 2, 3]] * 2)
    return {"input_ids": ids, "targets": np.array([[1, 2, 3, IGNORE]] * 2),
            "position_ids": np.tile(np.arange(4), (2, 1)), "seq_lens": [[4]] * 2}


def _fault(**steps):
    """The test-only fault injector (keel.train.fault) of rank 0, at step 1 of ``fault.nan_at_steps=[1]`` or
    ``fault.spike_at_steps=[1]``."""
    from pathlib import Path

    from keel.config import FaultConfig
    from keel.core.worker import WorkerInfo
    from keel.train.fault import FaultInjector

    injector = FaultInjector(FaultConfig(**steps), WorkerInfo(0, 1, Path("."), "", "sdpa", [], [], {}))
    injector.begin_step(1)
    return injector


def test_train_step_skips_a_poisoned_step_and_keeps_the_lr_schedule():
    cfg = compose("trainer.grad_accum=2", "trainer.micro_batch_size=1")
    good = _Engine()
    m = train_step(good, _bundle(), cfg, world=1)
    assert not m["bad"] and math.isfinite(m["loss"]) and good.sched_steps == 0
    poisoned = _Engine()
    m = train_step(poisoned, _bundle(), cfg, world=1, plugins=[_fault(nan_at_steps=[1])])
    # The first micro-batch is poisoned; the last backward is NaN too, so every rank's update is dropped.
    assert m["bad"] and math.isnan(m["loss"]) and math.isnan(poisoned.backward_losses[-1])
    assert poisoned.sched_steps == 1  # DeepSpeed does not step the scheduler on a skipped update; Keel does
    with pytest.raises(RuntimeError, match="non-finite step was applied"):
        train_step(_Engine(skips=False), _bundle(), cfg, world=1, plugins=[_fault(nan_at_steps=[1])])


def test_spike_fault_multiplies_the_loss_and_its_backward():
    cfg = compose()
    plain, spiked = _Engine(), _Engine()
    m = train_step(plain, _bundle(), cfg, world=1)
    s = train_step(spiked, _bundle(), cfg, world=1, plugins=[_fault(spike_at_steps=[1])])
    assert not s["bad"] and s["loss"] == pytest.approx(1e3 * m["loss"], rel=1e-6)
    assert spiked.backward_losses[0] == pytest.approx(1e3 * plain.backward_losses[0], rel=1e-6)


def test_save_request_rides_on_the_step():
    cfg = compose()
    assert train_step(_Engine(), _bundle(), cfg, world=1, requests=StepRequests(save=True))["save"]
    assert not train_step(_Engine(), _bundle(), cfg, world=1)["save"]


def test_counts_and_loss_window_carry_over_a_resume():
    from keel.train.guards import StepGuards

    def _guards(cfg, logger):  # the guards of rank 0 (logger: its metrics history) or of another rank (None)
        guards = StepGuards(cfg.trainer, logger.history if logger is not None else None)
        return guards.bad, guards.spikes

    cfg = compose("trainer.spike_window=20")
    history = [{"loss": 2.0 + 0.01 * (i % 3), "bad_step": False, "bad_steps": 1, "loss_spikes": 2} for i in range(30)]
    history[5] = {"loss": math.nan, "bad_step": True, "bad_steps": 1, "loss_spikes": 2}
    guard, spikes = _guards(cfg, SimpleNamespace(history=history))
    assert guard.total == 1 and guard.consecutive == 0 and guard.max_bad == 5
    assert spikes.total == 2 and len(spikes.losses) == 20 and all(map(math.isfinite, spikes.losses))
    assert spikes.observe(3.0) is not None
    other_rank, none = _guards(cfg, None)
    assert none is None and other_rank.total == 0  # only rank 0 holds the metrics; the total is rank 0's
    history[-1] = {"loss": 40.0, "bad_step": False, "bad_steps": 1, "loss_spikes": 3, "rolled_back_to": 20}
    _, spikes = _guards(cfg, SimpleNamespace(history=history))
    assert 40.0 not in spikes.losses and spikes.total == 3  # a rolled-back spike was forgotten, as in the live run


class _Reloadable:
    """Stands in for a DeepSpeed engine that loads checkpoints and steps its LR scheduler."""

    def __init__(self, universal: bool = False) -> None:
        self._config = SimpleNamespace(load_universal_checkpoint=universal)
        self.loaded: list[tuple[str, str, bool]] = []
        self.lr_scheduler = SimpleNamespace(step=lambda: setattr(self, "sched_steps", self.sched_steps + 1))
        self.sched_steps = 0

    def load_universal_checkpoint(self) -> bool:
        return self._config.load_universal_checkpoint

    def load_checkpoint(self, load_dir: str, tag: str) -> None:
        self.loaded.append((load_dir, tag, self._config.load_universal_checkpoint))


def _checkpoint(run_dir, step):
    import json

    from keel.train import checkpoint as ckpt

    d = ckpt.root(run_dir) / f"step_{step:06d}"
    for where in (d, ckpt.universal_dir(d)):
        where.mkdir(parents=True)
        (where / ckpt.STATE).write_text(json.dumps({"step": step}))
    ckpt.write_manifest(d)
    return d


def test_spike_rollback_reloads_the_checkpoint_and_keeps_the_lr_at_the_data_position(tmp_path, capsys):
    from keel.core.worker import WorkerInfo
    from keel.train.resume import ResumePoint, spike_rollback

    def _spike_rollback(engine, cfg, info, spiked, restore, step):  # restore: (checkpoint or None, universal)
        point = ResumePoint(*restore) if restore[0] is not None else None
        return spike_rollback(engine, cfg, info, spiked, point, step)

    info = WorkerInfo(0, 1, tmp_path, "", "sdpa", [], [], {})
    on, off = compose("trainer.spike_rollback=true"), compose()
    saved = _checkpoint(tmp_path, 4)
    assert _spike_rollback(_Reloadable(), off, info, True, (saved, False), 7) is None  # off: the spike only warns
    assert _spike_rollback(_Reloadable(), on, info, False, (saved, False), 7) is None  # no spike
    e = _Reloadable()
    assert _spike_rollback(e, on, info, True, (saved, False), 7) == 4
    assert e.loaded == [(str(saved.parent), "step_000004", False)]
    assert e.sched_steps == 3  # the scheduler, restored at step 4, goes on to step 7: the next step gets step 8's LR
    assert "rolled back to checkpoint step 4 (steps 5..7 undone; their data is skipped" in capsys.readouterr().out
    elastic = _Reloadable(universal=False)
    assert _spike_rollback(elastic, on, info, True, (saved, True), 5) == 4  # the checkpoint an elastic start loaded
    assert elastic.loaded == [(str(saved.parent / "universal"), "step_000004", True)]
    for restore, step in (((None, False), 3), ((saved, False), 4), ((tmp_path / "gone", False), 6)):
        e = _Reloadable()
        assert _spike_rollback(e, on, info, True, restore, step) is None and not e.loaded and e.sched_steps == 0
        assert f"step {step}: loss spike not rolled back: no complete checkpoint" in capsys.readouterr().out


def test_watchdog_dumps_every_stack_and_names_the_rank(tmp_path):
    import time

    from keel.train import watchdog

    fired = []
    dog = watchdog.Watchdog(0.3, tmp_path, rank=1, on_timeout=fired.append, poll_s=0.02)
    with dog.watch(7):
        time.sleep(0.05)  # done in time: nothing happens
    time.sleep(0.4)
    assert not fired and watchdog.reports(tmp_path) == []
    dog.arm(8)
    deadline = time.monotonic() + 10
    while not fired and time.monotonic() < deadline:
        time.sleep(0.02)  # this frame is in the dump: the main thread is here when it fires
    dog.close()
    assert fired == [tmp_path / "watchdog" / "rank1-step8.txt"]
    text = fired[0].read_text()
    assert text.startswith("rank 1: step 8 (training) made no progress for 0.3 s") and "test_watchdog_dumps" in text
    message = watchdog.stalled_message(watchdog.reports(tmp_path))
    assert message.startswith("training stalled: rank 1: step 8 (training) made no progress")
    assert "rank1-step8" in message
    off = watchdog.Watchdog(0, tmp_path, rank=0)
    assert off._thread is None  # step_timeout_s=0: no thread at all


def test_fault_injection_is_a_plugin_only_when_a_fault_is_set(tmp_path):
    """fault.* leaves the step: the trainer adds the injector (keel.train.fault) only when a fault is configured."""
    from keel.core.worker import WorkerInfo
    from keel.train import fault

    info = WorkerInfo(0, 2, tmp_path, "", "sdpa", [], [], {})
    assert fault.plugins(compose().fault, info) == []
    for setting in ("fault.nan_at_steps=[3]", "fault.spike_at_steps=[3]", "fault.hang_rank=1 fault.hang_at_step=2",
                    "fault.kill_rank=1 fault.at_step=2"):
        (injector,) = fault.plugins(compose(*setting.split()).fault, info)
        assert isinstance(injector, fault.FaultInjector), setting
    info = WorkerInfo(1, 2, tmp_path, "", "", [], [], {})
    injector = fault.FaultInjector(compose("fault.nan_at_steps=[3]").fault, info)
    injector.begin_step(3)  # only rank 0's loss is poisoned
    assert injector.micro_loss(torch.ones(()), 0) == 1.0
