"""trainer.lr_schedule: the shape of each schedule at key steps, the default unchanged, settings that would do
nothing refused, and the LR a pure function of the scheduler step (what resume and rollback rely on)."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from keel.config import TrainerConfig
from keel.train.schedule import describe, lr_factor, lr_lambda

from tests.conftest import compose


def _trainer(*overrides) -> TrainerConfig:
    return compose(*overrides).trainer


def _curve(*overrides) -> list[float]:
    t = _trainer("trainer.max_steps=105", "trainer.warmup_steps=5", *overrides)
    f = lr_lambda(t)
    return [f(s) for s in range(t.max_steps)]


def _old_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Keel's schedule before trainer.lr_schedule existed, verbatim."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def test_default_is_the_old_cosine_to_a_tenth():
    t = _trainer()
    assert t.lr_schedule == "cosine" and t.min_lr_ratio is None and t.decay_fraction is None
    f = lr_lambda(t)
    assert [f(s) for s in range(t.max_steps + 3)] == [
        _old_cosine(s, t.warmup_steps, t.max_steps, 0.1) for s in range(t.max_steps + 3)]
    g = lr_lambda(_trainer("trainer.min_lr_ratio=0.3", "trainer.max_steps=17", "trainer.warmup_steps=0"))
    assert [g(s) for s in range(20)] == [_old_cosine(s, 0, 17, 0.3) for s in range(20)]


def test_warmup_is_shared_and_linear():
    for name in ("cosine", "linear", "constant", "wsd"):
        c = _curve(f"trainer.lr_schedule={name}")
        assert c[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0]), name
        assert c[5] == 1.0, name  # the first post-warmup step trains at the peak


def test_cosine_and_linear_shapes():
    cos, lin = _curve(), _curve("trainer.lr_schedule=linear")
    # p = (s - 5) / 100: the midpoint is step 55, the floor 0.1 is reached at step 105 (one after the last).
    assert cos[55] == pytest.approx(0.55) and lin[55] == pytest.approx(0.55)
    assert cos[30] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lin[30] == pytest.approx(0.1 + 0.9 * 0.75)
    assert lin[104] == pytest.approx(0.1 + 0.9 * 0.01) and lr_factor(105, 5, 105, 0.1, "linear") == pytest.approx(0.1)
    assert all(a > b for a, b in zip(lin[5:], lin[6:])) and all(a > b for a, b in zip(cos[5:], cos[6:]))


def test_constant_holds_the_peak():
    assert _curve("trainer.lr_schedule=constant")[5:] == [1.0] * 100


def test_wsd_is_stable_then_decays_with_one_minus_sqrt():
    c = _curve("trainer.lr_schedule=wsd")  # decay_fraction 0.2: decays over steps 85..104, toward 0.1 at 105
    assert c[5:86] == [1.0] * 81
    assert c[95] == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(0.5)))
    assert all(a > b for a, b in zip(c[85:], c[86:]))
    short = _curve("trainer.lr_schedule=wsd", "trainer.decay_fraction=0.1", "trainer.min_lr_ratio=0")
    assert short[5:96] == [1.0] * 91 and short[100] == pytest.approx(1 - math.sqrt(0.5))
    assert lr_factor(105, 5, 105, 0.0, "wsd", 0.1) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize(("overrides", "needle"), [
    (["trainer.lr_schedule=step"], r"trainer\.lr_schedule must be one of \['cosine', 'linear', 'constant', 'wsd'\]"),
    (["trainer.lr_schedule=constant", "trainer.min_lr_ratio=0.1"], r"trainer\.min_lr_ratio has no effect with "
                                                                    r"trainer\.lr_schedule=constant"),
    (["trainer.decay_fraction=0.1"], r"trainer\.decay_fraction has no effect with trainer\.lr_schedule=cosine"),
    (["trainer.lr_schedule=linear", "trainer.decay_fraction=0.1"], r"trainer\.decay_fraction has no effect"),
    (["trainer.lr_schedule=wsd", "trainer.decay_fraction=0"], r"trainer\.decay_fraction must be in \(0, 1\]"),
    (["trainer.min_lr_ratio=1.5"], r"trainer\.min_lr_ratio must be in \[0, 1\]"),
])
def test_settings_that_would_do_nothing_are_refused(overrides, needle):
    with pytest.raises(ValueError, match=needle):
        _trainer(*overrides)


def test_the_scheduler_is_a_pure_function_of_its_step():
    """Resume loads the scheduler's step; a skipped or rolled-back step steps it by hand: the LR of step s never
    depends on how the scheduler got there, and its saved state holds no schedule settings."""
    t = _trainer("trainer.lr_schedule=wsd", "trainer.max_steps=40")

    def scheduler():
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=t.lr)
        return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t))

    straight, saved = scheduler(), {}
    lrs = []
    for s in range(40):
        if s in (10, 17):
            saved[s] = copy.deepcopy(straight.state_dict())  # what a checkpoint after s steps holds
        lrs.append(straight.get_last_lr()[0])
        straight.step()
    assert lrs == pytest.approx([t.lr * lr_lambda(t)(s) for s in range(40)], rel=1e-12)
    resumed = scheduler()
    resumed.load_state_dict(saved[17])
    rolled = scheduler()
    rolled.load_state_dict(saved[10])
    for _ in range(17 - 10):  # a rollback from step 17 to checkpoint 10 steps the scheduler to the data position
        rolled.step()
    for s in range(17, 40):
        assert resumed.get_last_lr()[0] == rolled.get_last_lr()[0] == pytest.approx(lrs[s], rel=1e-12)
        resumed.step()
        rolled.step()
    assert saved[17]["lr_lambdas"] == [None]  # a plain function: no schedule setting is stored in a checkpoint


def test_describe_names_the_schedule():
    assert describe(_trainer()) == "lr: warmup 5 steps, then cosine from 0.001 to 0.0001 over 60 steps"
    assert describe(SimpleNamespace(lr=1e-4, lr_schedule="constant", warmup_steps=0, max_steps=9, min_lr_ratio=None,
                                    decay_fraction=None)) == "lr: constant 0.0001"
    assert "wsd (decay over the last 0.2 of the steps, 1-sqrt)" in describe(_trainer("trainer.lr_schedule=wsd"))
