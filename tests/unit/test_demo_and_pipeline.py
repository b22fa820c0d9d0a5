"""Demo data and the packed row plan: deterministic, exact, nothing lost."""

from __future__ import annotations

import json

import numpy as np
import pytest
from keel.data import demo, examples, pipeline
from keel.data.formats import validate
from keel.data.masking import IGNORE
from keel.data.rank_bundles import step_bundles

from tests.conftest import compose


def test_demo_is_deterministic_and_valid():
    for task in demo.DEMO_TASKS:
        a = list(demo.generate(task, 50, seed=3))
        assert a == list(demo.generate(task, 50, seed=3))
        assert a != list(demo.generate(task, 50, seed=4))
        assert all(validate(ex) is None for ex in a)


def test_demo_tasks_have_different_length_profiles():
    def mean_chars(task):
        exs = list(demo.generate(task, 300, seed=0))
        return np.mean([len(json.dumps(e)) for e in exs])
    assert mean_chars("strings") > 1.5 * mean_chars("arithmetic")
    assert mean_chars("text") > mean_chars("strings")


@pytest.fixture(scope="module")
def plan(tokenizer):
    cfg = compose("trainer.max_steps=6")
    return cfg, pipeline.build(cfg, tokenizer)


def test_rows_cover_exactly_the_planned_steps(plan):
    cfg, (rows, rejects) = plan
    assert rows.input_ids.shape == (6 * pipeline.rows_per_step(cfg), 512)
    assert rejects == []
    assert 0.9 < rows.report["packing_efficiency"] <= 1.0


def test_examples_never_leak_into_each_other(plan):
    _, (rows, _) = plan
    for r in range(rows.input_ids.shape[0]):
        pos = rows.position_ids[r]
        starts = np.flatnonzero(pos == 0)
        lens = np.diff(np.append(starts, len(pos)))
        real = rows.seq_lens[r][rows.seq_lens[r] > 0]
        assert list(lens[: len(real)]) == list(real)  # position_ids restart per example
        for s, n in zip(starts, lens):
            assert rows.targets[r, s + n - 1] == IGNORE  # last token never predicts the next example
        assert (rows.targets[r, real.sum():] == IGNORE).all()  # tail padding never trained


def test_plan_is_deterministic(tokenizer, plan):
    cfg, (rows, _) = plan
    again, _ = pipeline.build(cfg, tokenizer)
    assert np.array_equal(rows.input_ids, again.input_ids) and np.array_equal(rows.targets, again.targets)


def test_global_rows_do_not_depend_on_world_size(tokenizer):
    two, _ = pipeline.build(compose("trainer.max_steps=3", "cluster.num_workers=2"), tokenizer)
    one, _ = pipeline.build(compose("trainer.max_steps=3", "cluster.num_workers=1", "trainer.grad_accum=2"),
                            tokenizer)
    assert np.array_equal(two.input_ids, one.input_ids)


def test_bundles_give_every_rank_the_same_steps(plan):
    _, (rows, _) = plan
    bundles = list(step_bundles(rows, world=2, accum=1, micro=2))
    assert [(b["step"], b["slot"]) for b in bundles] == [(s, r) for s in range(6) for r in range(2)]
    assert all(b["input_ids"].shape == (2, 512) for b in bundles)


def test_overlength_rows_are_rejected_not_lost(tokenizer):
    cfg = compose("trainer.max_steps=1", "packing.max_len=64")
    rows, rejects = pipeline.build(cfg, tokenizer)
    assert rejects and all("over-length" in r["reason"] for r in rejects)
    per_source = rows.report["sources"]
    for src in cfg.data.sources:
        s = per_source[src.name]
        assert s["available"] + s["rejected"] == s["rows_read"] == src.num_examples


@pytest.mark.parametrize(("overrides", "expected"), [
    (["mix=explicit"], [0.5, 0.3, 0.2]),
    (["mix=proportional"], [3000 / 5100, 1500 / 5100, 600 / 5100]),
    (["mix=quality", "+data.sources.0.quality=2"], [6000 / 8100, 1500 / 8100, 600 / 8100]),
])
def test_mixture_modes(tokenizer, overrides, expected):
    cfg = compose("trainer.max_steps=1", *overrides)
    sources = [pipeline.load_source(s, cfg, pipeline.TextEncoder(tokenizer)) for s in cfg.data.sources]
    assert pipeline.source_weights(sources, cfg) == pytest.approx(expected)


def test_token_counted_mixture_and_caps(tokenizer):
    cfg = compose("trainer.max_steps=1", "mix=proportional", "mix.count=tokens", "data.sources.2.cap=100")
    sources = [pipeline.load_source(s, cfg, pipeline.TextEncoder(tokenizer)) for s in cfg.data.sources]
    assert len(sources[2].input_ids) == 100
    tokens = [sum(len(x) for x in s.input_ids) for s in sources]
    assert pipeline.source_weights(sources, cfg) == pytest.approx([t / sum(tokens) for t in tokens])


@pytest.mark.parametrize(("overrides", "needle"), [
    (["data.sources.0.quality=2"], "quality"),
    (["mix=explicit", "+mix.weights.extra=1"], "mix.weights"),
    (["mix=explicit", "mix.weights=null"], "mix.weights"),
    (["mix=explicit", "mix.T=2"], "mix.T")])
def test_mixture_fields_that_would_do_nothing_are_errors(overrides, needle):
    with pytest.raises(ValueError, match=needle):
        compose(*overrides)


def test_overlength_truncate_keeps_rows_within_max_len(tokenizer):
    cfg = compose("trainer.max_steps=1", "packing.max_len=64", "data.overlength=truncate")
    src = pipeline.load_source(cfg.data.sources[2], cfg, pipeline.TextEncoder(tokenizer))  # long text
    assert src.truncated > 0 and all(len(x) <= 64 for x in src.input_ids)
    assert all(t[-1] == IGNORE for t in src.targets)
    assert src.truncated + len(src.rejects) + (len(src.input_ids) - src.truncated) == src.rows_read


def test_overlength_split_cuts_chats_at_turn_boundaries(tokenizer):
    from keel.config import SourceConfig

    cfg = compose("trainer.max_steps=1", "packing.max_len=64", "data.overlength=split")
    long_chat = [{"role": "system", "content": "Be brief."}]
    for i in range(6):
        long_chat += [{"role": "user", "content": f"Question {i}: what is {i} + {i}?"},
                      {"role": "assistant", "content": f"{i} + {i} = {2 * i}."}]
    enc = pipeline.TextEncoder(tokenizer)
    ids, targets = examples._encode_example({"messages": long_chat}, enc, cfg, "assistant_only")
    assert len(ids) > 64
    pieces, action = examples._fit({"messages": long_chat}, ids, targets, enc, cfg, "assistant_only")
    assert action == "split" and len(pieces) > 1 and all(len(p[0]) <= 64 for p in pieces)
    trained = "".join(tokenizer.decode([t for t in tg if t != IGNORE]) for _, tg in pieces)
    assert trained == "".join(f"{i} + {i} = {2 * i}.<|eot_id|>" for i in range(6))  # every answer, once
    assert all(tokenizer.decode(p[0]).startswith("<|begin_of_text|><|start_header_id|>system") for p in pieces)
    src = SourceConfig(name="s", kind="demo", task="strings", num_examples=50)
    assert pipeline.load_source(src, cfg, enc).rows_read == 50


def test_on_error_raise_names_source_row_and_reason(tokenizer):
    cfg = compose("trainer.max_steps=1", "packing.max_len=64", "data.on_error=raise")
    with pytest.raises(ValueError, match=r"data source 'strings' \(demo:strings\) row \d+: over-length"):
        pipeline.load_source(cfg.data.sources[1], cfg, pipeline.TextEncoder(tokenizer))
