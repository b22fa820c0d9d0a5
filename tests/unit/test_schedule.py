"""mix=schedule: validation, time-local segments that realise the mixture, the fixed path untouched."""

from __future__ import annotations

import numpy as np
import pytest
from keel.data import pipeline
from keel.data.mixing import Schedule
from keel.mitigation import adjust_hook, schedule_hook
from keel.mitigation import build as build_mitigations

from tests.conftest import compose

FIELDS = ("input_ids", "targets", "position_ids", "seq_lens", "source_ids")
# arithmetic only in the first half of training, strings only in the second.
HALVES = "mix.schedule=[{at:0,weights:{arithmetic:1}},{at:0.5,weights:{strings:1}}]"


def _same_rows(a, b) -> bool:
    return all(np.array_equal(getattr(a, f), getattr(b, f)) for f in FIELDS)


@pytest.mark.parametrize(("overrides", "needle"), [
    (["mix=schedule", "mix.schedule.1.at=0"], r"mix\.schedule\[1\]\.at must be > mix\.schedule\[0\]\.at"),
    (["mix=schedule", "mix.schedule.1.at=1.5"], r"mix\.schedule\[1\]\.at must be a fraction"),
    (["mix=schedule", "mix.schedule.0.weights.text=-1"], r"mix\.schedule\[0\]\.weights must be >= 0"),
    (["mix=schedule", "mix.schedule=[{at:0,weights:{text:0}}]"], r"not all 0"),
    (["mix=schedule", "mix.schedule=[{at:0,weights:{}}]"], r"must name at least one source"),
    (["mix=schedule", "mix.schedule=null"], r"mix\.schedule is required"),
    (["mix=schedule", "mix.interpolation=cubic"], r"mix\.interpolation must be one of"),
    (["mix=schedule", "mix.T=2"], r"mix\.T/mix\.count"),
    (["mix=schedule", "mix.segments=0"], r"mix\.segments"),
    ([HALVES], r"mix\.schedule needs mix=schedule"),
    (["mix.interpolation=step"], r"mix\.interpolation has no effect"),
])
def test_bad_schedules_fail_at_composition(overrides, needle):
    with pytest.raises(ValueError, match=needle):
        compose(*overrides)


def test_schedule_naming_an_unknown_source_lists_the_sources(tokenizer):
    cfg = compose("mix=schedule", "trainer.max_steps=2", "+mix.schedule.1.weights.maths=1")
    with pytest.raises(ValueError, match=r"mix\.schedule\[1\]\.weights names unknown source 'maths'; "
                                         r"the data sources are \['arithmetic', 'strings', 'text'\]"):
        pipeline.build(cfg, tokenizer)


def test_segments_cover_the_steps_in_order():
    for steps, segments in [(100, 20), (7, 3), (3, 20), (1, 1)]:
        cfg = compose(f"trainer.max_steps={steps}", f"mix.segments={segments}")
        segs = pipeline.segment_steps(cfg)
        assert len(segs) == min(steps, segments) and segs[0][0] == 0 and segs[-1][1] == steps
        assert all(hi > lo for lo, hi in segs) and all(a[1] == b[0] for a, b in zip(segs, segs[1:]))


def test_rows_stay_in_their_part_of_training(tokenizer):
    """Packing is time-local: a step schedule of exclusive sources gives rows of one source per half."""
    cfg = compose("mix=schedule", HALVES, "mix.interpolation=step", "mix.segments=4", "trainer.max_steps=8")
    rows, _ = pipeline.build(cfg, tokenizer)
    half = rows.source_ids.shape[0] // 2
    first, second = rows.source_ids[:half], rows.source_ids[half:]
    assert set(np.unique(first)) == {-1, 0} and set(np.unique(second)) == {-1, 1}
    assert rows.report["schedule"]["start"] == {"arithmetic": 1.0, "strings": 0.0, "text": 0.0}
    assert rows.report["schedule"]["end"] == {"arithmetic": 0.0, "strings": 1.0, "text": 0.0}


@pytest.fixture(scope="module")
def scheduled(tokenizer):
    cfg = compose("mix=schedule", "trainer.max_steps=200", "mix.segments=10")
    return cfg, pipeline.build(cfg, tokenizer)[0]


def test_each_segment_realises_its_mixture(scheduled):
    cfg, rows = scheduled
    sched = rows.report["schedule"]
    assert len(sched["segments"]) == 10
    for seg, (lo, hi) in zip(sched["segments"], pipeline.segment_steps(cfg)):
        assert seg["steps"] == [lo, hi]
        n = seg["examples"]
        for name, w in seg["weights"].items():
            # A segment's rows hold a prefix of its evenly interleaved picks: each source's count
            # is within K - 1 = 2 examples of n * w (see test_mixing's prefix property).
            assert abs(seg["example_share"][name] * n - w * n) <= 2 + 1e-9, (seg, name)
    # The mixture moves: text goes from 0.6 of the examples at the start to 0.1 after half of training.
    first, last = sched["segments"][0]["weights"], sched["segments"][-1]["weights"]
    # Segment 0 covers fractions [0, 0.1]: its mean mixture is the one at 0.05, a tenth of the way to 0.1.
    assert first["text"] == pytest.approx(0.6 - (0.6 - 0.1) * 0.05 / 0.5)
    assert last == pytest.approx({"arithmetic": 0.5, "strings": 0.4, "text": 0.1})


def test_report_weights_are_the_mean_mixture_of_the_planned_examples(scheduled):
    _, rows = scheduled
    sources = rows.report["sources"]
    assert sum(s["weight"] for s in sources.values()) == pytest.approx(1.0)
    for s in sources.values():
        assert abs(s["example_share"] - s["weight"]) < 0.02


def test_scheduled_plan_is_deterministic_and_seeded(tokenizer, scheduled):
    cfg, rows = scheduled
    assert _same_rows(rows, pipeline.build(cfg, tokenizer)[0])
    other = pipeline.build(compose("mix=schedule", "trainer.max_steps=200", "mix.segments=10", "data.seed=1"),
                           tokenizer)[0]
    assert not np.array_equal(rows.input_ids, other.input_ids)


def test_without_a_schedule_the_fixed_mixture_path_is_untouched(tokenizer):
    """No schedule: plugins' schedule hooks returning their input leave the plan bit-for-bit the same."""
    cfg = compose("mitigation=replay", "trainer.max_steps=5")
    plugins = build_mitigations(cfg)
    extra = tuple(s for p in plugins for s in p.extra_sources())
    plain, _ = pipeline.build(cfg, tokenizer, extra, adjust_hook(plugins))
    hooked, _ = pipeline.build(cfg, tokenizer, extra, adjust_hook(plugins), schedule_hook(plugins))
    assert _same_rows(plain, hooked) and plain.report == hooked.report and "schedule" not in plain.report

    def same_mixture_rebuilt(sched: Schedule, sources: list) -> Schedule:
        return Schedule(sched.points)  # an equal but new static schedule: its (normalised) weights are used

    rebuilt, _ = pipeline.build(cfg, tokenizer, extra, adjust_hook(plugins), same_mixture_rebuilt)
    assert "schedule" not in rebuilt.report
    assert [s["weight"] for s in rebuilt.report["sources"].values()] == pytest.approx(
        [s["weight"] for s in plain.report["sources"].values()])
