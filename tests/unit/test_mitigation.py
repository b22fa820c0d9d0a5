"""Mitigation plugins: replay hits its token share; conservative LR presets and warnings."""

from __future__ import annotations

import pytest
from keel.data import pipeline
from keel.mitigation import adjust_hook, build, warnings_for
from keel.mitigation.replay import replay_weight

from tests.conftest import compose


def test_replay_weight_solves_the_token_share():
    weights, means, t_r, r = [0.7, 0.3], [40.0, 100.0], 300.0, 0.05
    p_r = replay_weight(weights, means, t_r, r)
    sft = sum(w * t for w, t in zip(weights, means))
    share = p_r * t_r / (p_r * t_r + (1 - p_r) * sft)
    assert share == pytest.approx(r)


@pytest.mark.parametrize("ratio", [0.05, 0.2])
def test_replay_realised_share_matches_ratio(tokenizer, ratio):
    cfg = compose("mitigation=replay", f"mitigation.replay.ratio={ratio}", "trainer.max_steps=400")
    plugins = build(cfg)
    extra = tuple(s for p in plugins for s in p.extra_sources())
    plan, _ = pipeline.build(cfg, tokenizer, extra, adjust_hook(plugins))
    warnings_for(cfg, plugins, plan.report)
    assert "replay" in plan.report["sources"]
    assert abs(plan.report["replay_token_share"] - ratio) < 0.01


def test_conservative_lr_sets_the_preset_and_full_ft_warns():
    cfg = compose("mitigation=conservative_lr")
    for p in build(cfg):
        p.configure(cfg)
    assert cfg.trainer.lr == 2e-6 and cfg.trainer.warmup_steps == 10
    report = {"sources": {"a": {"epochs": 5.0}, "b": {"epochs": 1.0}}}
    assert any("'a'" in w and "epochs" in w for w in warnings_for(cfg, build(cfg), report))
    plain = compose()
    warns = warnings_for(plain, [], {"sources": {"a": {"epochs": 1.0}}})
    assert any("lr 0.001 > 1e-05" in w for w in warns)
    assert warnings_for(compose("trainer.lr=5e-6"), [], {"sources": {"a": {"epochs": 1.0}}}) == []


def test_conservative_lr_range_is_enforced():
    with pytest.raises(ValueError, match="mitigation.conservative_lr.lr"):
        compose("mitigation=conservative_lr", "mitigation.conservative_lr.lr=1e-4")
