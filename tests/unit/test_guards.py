"""Numeric guards (docs/reliability.md): non-finite steps skipped and bounded, loss spikes, timed checkpoints."""

from __future__ import annotations

import math
from types import SimpleNamespace

import keel.cli.train  # noqa: F401  (registers the schema)
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from keel.data.masking import IGNORE
from keel.train.guards import BadStepGuard, NonFiniteError, SpikeDetector, checkpoint_due, is_bad
from keel.train.loop import train_step
from omegaconf import OmegaConf


def _cfg(*overrides):
    with initialize_config_module(config_module="keel.conf", version_base=None):
        return OmegaConf.to_object(compose(config_name="config", overrides=list(overrides)))


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


def test_checkpoint_due():
    assert not checkpoint_due(100.0, 0.0, 0)
    assert checkpoint_due(100.0, 40.0, 60) and not checkpoint_due(99.0, 40.0, 60)


def test_config_validates_guard_fields():
    cfg = _cfg()
    assert (cfg.trainer.max_bad_steps, cfg.trainer.spike_window, cfg.trainer.spike_z) == (5, 50, 6.0)
    assert cfg.trainer.checkpoint_every_s == 0 and cfg.fault.nan_at_steps == []
    for bad in ("trainer.max_bad_steps=-1", "trainer.checkpoint_every_s=-5", "trainer.spike_z=0",
                "trainer.spike_window=-1"):
        with pytest.raises(Exception, match=bad.split("=")[0]):
            _cfg(bad)


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

    def __call__(self, input_ids, position_ids):
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


def test_train_step_skips_a_poisoned_step_and_keeps_the_lr_schedule():
    cfg = _cfg("trainer.grad_accum=2", "trainer.micro_batch_size=1")
    good = _Engine()
    m = train_step(good, _bundle(), cfg, world=1)
    assert not m["bad"] and math.isfinite(m["loss"]) and good.sched_steps == 0
    poisoned = _Engine()
    m = train_step(poisoned, _bundle(), cfg, world=1, poison=True)
    # The first micro-batch is poisoned; the last backward is NaN too, so every rank's update is dropped.
    assert m["bad"] and math.isnan(m["loss"]) and math.isnan(poisoned.backward_losses[-1])
    assert poisoned.sched_steps == 1  # DeepSpeed does not step the scheduler on a skipped update; Keel does
    with pytest.raises(RuntimeError, match="non-finite step was applied"):
        train_step(_Engine(skips=False), _bundle(), cfg, world=1, poison=True)


def test_save_request_rides_on_the_step():
    cfg = _cfg()
    assert train_step(_Engine(), _bundle(), cfg, world=1, save_requested=True)["save"]
    assert not train_step(_Engine(), _bundle(), cfg, world=1)["save"]


def test_counts_and_loss_window_carry_over_a_resume():
    from keel.train.loop import _guards

    cfg = _cfg("trainer.spike_window=20")
    history = [{"loss": 2.0 + 0.01 * (i % 3), "bad_step": False, "bad_steps": 1, "loss_spikes": 2} for i in range(30)]
    history[5] = {"loss": math.nan, "bad_step": True, "bad_steps": 1, "loss_spikes": 2}
    guard, spikes = _guards(cfg, SimpleNamespace(history=history))
    assert guard.total == 1 and guard.consecutive == 0 and guard.max_bad == 5
    assert spikes.total == 2 and len(spikes.losses) == 20 and all(map(math.isfinite, spikes.losses))
    assert spikes.observe(3.0) is not None
    other_rank, none = _guards(cfg, None)
    assert none is None and other_rank.total == 0  # only rank 0 holds the metrics; the total is rank 0's


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
