"""mitigation=progressive: the text share starts at start_share and reaches the target mix at the ramp."""

from __future__ import annotations

import numpy as np
import pytest
from keel.data import pipeline
from keel.data.mixing import Schedule
from keel.mitigation import adjust_hook, build, configured, schedule_hook, warnings_for
from keel.mitigation.progressive import Progressive, start_mixture

from tests.conftest import compose


def _run(tokenizer, *overrides):
    """The driver's data path: configure, extra sources, adjust, schedule, data checks."""
    cfg = compose(*overrides)
    plugins = configured(cfg)
    extra = tuple(s for p in plugins for s in p.extra_sources())
    rows, _ = pipeline.build(cfg, tokenizer, extra, adjust_hook(plugins), schedule_hook(plugins))
    warnings_for(cfg, plugins, rows.report)
    return cfg, rows


def _token_share(cfg, rows, name: str, first_step: int, last_step: int) -> float:
    per = pipeline.rows_per_step(cfg)
    ids = rows.source_ids[first_step * per:last_step * per]
    return float((ids == rows.source_names.index(name)).sum() / (ids >= 0).sum())


def test_start_mixture_solves_the_token_share():
    target, means, share = [0.5, 0.3, 0.2, 0.0], [40.0, 90.0, 300.0, 250.0], 0.4
    start = start_mixture(target, means, 3, share)
    assert sum(start) == pytest.approx(1.0)
    tokens = [w * t for w, t in zip(start, means)]
    assert tokens[3] / sum(tokens) == pytest.approx(share)
    assert [w / sum(start[:3]) for w in start[:3]] == pytest.approx(target[:3])  # the rest keeps its proportions


ALONE = ("mitigation=progressive", "mitigation.progressive.interpolation=step",
         "mitigation.progressive.start_share=0.5",
         "mitigation.progressive.ramp=0.3", "trainer.max_steps=400", "mix.segments=10")


@pytest.fixture(scope="module")
def alone(tokenizer):
    return _run(tokenizer, *ALONE)


def test_alone_starts_at_start_share_and_ends_without_the_text(alone):
    cfg, rows = alone
    assert rows.source_names == ["arithmetic", "strings", "text", "progressive"]
    segments = rows.report["schedule"]["segments"]
    # step: segments before the ramp (0.3 of 400 steps = 120) hold the start mixture exactly.
    assert abs(segments[0]["token_share"]["progressive"] - 0.5) < 0.03
    assert abs(_token_share(cfg, rows, "progressive", 0, 120) - 0.5) < 0.02
    assert _token_share(cfg, rows, "progressive", 120, 400) == 0.0  # the target mix has no progressive text
    assert segments[-1]["weights"]["progressive"] == 0.0
    assert rows.report["progressive_token_share"]["first_segment"] == segments[0]["token_share"]["progressive"]
    # The other sources keep the target's proportions throughout.
    for seg in segments:
        rest = {k: w for k, w in seg["weights"].items() if k != "progressive"}
        assert [w / sum(rest.values()) for w in rest.values()] == pytest.approx(
            list(segments[-1]["weights"].values())[:3])


def test_with_replay_ramps_replay_down_to_its_ratio(tokenizer):
    cfg, rows = _run(tokenizer, "mitigation=[replay,progressive]", "mitigation.progressive.ramp=0.5",
                     "mitigation.progressive.start_share=0.5",
                     "trainer.max_steps=400", "mix.segments=20")
    assert rows.source_names == ["arithmetic", "strings", "text", "replay"]  # no source of its own
    segments = rows.report["schedule"]["segments"]
    # linear: segment 0 (fractions [0, 0.05]) holds the mixture at 0.025, 5% of the way down the ramp.
    assert abs(segments[0]["token_share"]["replay"] - 0.5) < 0.04
    assert abs(_token_share(cfg, rows, "replay", 200, 400) - cfg.mitigation.replay.ratio) < 0.015
    shares = [seg["weights"]["replay"] for seg in segments]
    assert all(a > b for a, b in zip(shares[:10], shares[1:11])) and len(set(shares[10:])) == 1


def test_progressive_refuses_a_configured_schedule():
    cfg = compose("mitigation=progressive", "mix=schedule")
    (plugin,) = build(cfg)
    with pytest.raises(ValueError, match="mitigation=progressive cannot combine with mix=schedule"):
        plugin.configure(cfg)
    changing = Schedule(((0.0, (1.0, 0.0)), (1.0, (0.0, 1.0))))
    with pytest.raises(ValueError, match="cannot combine with mix=schedule"):
        Progressive(cfg.mitigation.progressive).schedule(changing, [])


@pytest.mark.parametrize(("overrides", "needle"), [
    (["mitigation.progressive.start_share=0"], r"mitigation\.progressive\.start_share must be in \(0, 1\)"),
    (["mitigation.progressive.start_share=1"], r"mitigation\.progressive\.start_share"),
    (["mitigation.progressive.ramp=0"], r"mitigation\.progressive\.ramp must be in \(0, 1\]"),
    (["mitigation.progressive.ramp=1.5"], r"mitigation\.progressive\.ramp"),
    (["mitigation.progressive.interpolation=cubic"], r"mitigation\.progressive\.interpolation"),
    (["mitigation.progressive.source.task=null"], r"mitigation\.progressive\.source\.task"),
])
def test_progressive_options_are_validated(overrides, needle):
    with pytest.raises(ValueError, match=needle):
        compose("mitigation=progressive", *overrides)


def test_with_replay_the_start_share_must_exceed_the_ratio():
    with pytest.raises(ValueError, match=r"start_share must be > mitigation\.replay\.ratio=0\.05"):
        compose("mitigation=[replay,progressive]", "mitigation.progressive.start_share=0.05")
    assert compose("mitigation=[replay,progressive]").mitigation.enabled == ["replay", "progressive"]


def test_plan_is_deterministic(tokenizer, alone):
    cfg, rows = alone
    _, again = _run(tokenizer, *ALONE)
    assert np.array_equal(rows.input_ids, again.input_ids) and np.array_equal(rows.source_ids, again.source_ids)
