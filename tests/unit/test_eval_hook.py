"""In-training evaluation (keel.eval.hook) on one process with the tiny model."""

from __future__ import annotations

import keel.model.attention  # noqa: F401  (registers the packed attention backends)
import numpy as np
import pytest
import torch
from keel.config import EvalConfig, PasskEvalConfig
from keel.data import encode
from keel.data.template import BUILT_IN, TextEncoder, end_of_turn_ids, generation_prompt
from keel.eval import hook, pass_at_k
from keel.eval.generate import Prompt, Sample
from keel.eval.perplexity import perplexity

from tests.conftest import compose

CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "2 + 3 = 5."}]


@pytest.fixture(scope="module")
def cfg():
    return compose("eval.every_n_steps=2", "eval.forgetting.source.num_examples=6", "eval.passk.prompts=3",
                   "eval.passk.n=2", "eval.passk.k=[1,2]", "eval.passk.max_new_tokens=4", "eval.batch_size=2")


@pytest.fixture(scope="module")
def model(tiny_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_path, attn_implementation="sdpa_block").eval()


def test_due_at_start_every_n_and_last_step():
    assert [s for s in range(11) if hook.due(s, 4, 10)] == [0, 4, 8, 10]
    assert not any(hook.due(s, 0, 10) for s in range(11))


@pytest.mark.parametrize("override, key", [({"k": [1, 5]}, "eval.passk.k"), ({"k": []}, "eval.passk.k"),
                                           ({"checker": "nope"}, "eval.passk.checker"),
                                           ({"top_p": 0.0}, "eval.passk.top_p")])
def test_config_errors_name_the_key(override, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        EvalConfig(name="x", passk=PasskEvalConfig(**override))
    with pytest.raises(ValueError, match=r"eval\.every_n_steps"):
        EvalConfig(name="x", every_n_steps=-1)


@pytest.mark.parametrize("name", sorted(BUILT_IN))
def test_generation_prompt_is_the_trained_prefix_of_the_answer(tokenizer, name):
    """What the model is asked to continue is exactly what preceded the answer in training."""
    enc = TextEncoder(tokenizer)
    full = encode(CONV, enc, template=name).input_ids
    prompt = generation_prompt(CONV[:-1], enc, BUILT_IN[name])
    assert full[: len(prompt)] == prompt and len(full) > len(prompt)
    eot = end_of_turn_ids(enc, BUILT_IN[name])
    assert eot == [] or eot[0] in full[len(prompt):]


def test_forgetting_equals_perplexity_and_splits_over_ranks(cfg, tokenizer, model):
    sets = hook.load_sets(cfg, tokenizer)
    assert len(sets.sequences) == 6 and len(sets.prompts) == 3
    with torch.no_grad():
        whole = hook.forgetting(model, sets.sequences, 0, 1)
        parts = [hook.forgetting(model, sets.sequences, r, 4) for r in range(4)]  # no process group: local sums
    from keel.eval.diagnose import demo_text

    ref = perplexity(model, tokenizer, demo_text(6), masking="all_tokens", max_len=cfg.packing.max_len)
    assert whole["forgetting/nll"] == pytest.approx(ref["nll"], rel=1e-5)
    assert whole["forgetting/tokens"] == ref["tokens"] == sum(p["forgetting/tokens"] for p in parts)
    total = sum(p["forgetting/nll"] * p["forgetting/tokens"] for p in parts)
    assert total / whole["forgetting/tokens"] == pytest.approx(whole["forgetting/nll"], rel=1e-6)


def test_evaluate_restores_attention_mode_and_rng(cfg, tokenizer, model):
    sets = hook.load_sets(cfg, tokenizer)
    model.train()
    torch.manual_seed(7)
    out = hook.evaluate(model, tokenizer, sets, cfg, step=2, rank=0, world=1)
    after = torch.rand(3)
    torch.manual_seed(7)
    assert torch.equal(after, torch.rand(3)), "evaluation consumed the training RNG stream"
    assert model.training and model.config._attn_implementation == "sdpa_block"
    row, table = out
    assert row["step"] == 2 and {"eval/pass@1", "eval/pass@2", "eval/diversity/distinct_2"} <= set(row)
    assert len(table) == min(cfg.eval.generations, 3) and {"prompt", "completion", "score"} <= set(table[0])
    again = hook.evaluate(model, tokenizer, sets, cfg, step=2, rank=0, world=1)[0]
    assert {k: v for k, v in again.items() if k != "eval/seconds"} == {k: v for k, v in row.items()
                                                                        if k != "eval/seconds"}
    model.eval()


@pytest.mark.parametrize("tasks", [["forgetting"], ["passk"], []])
def test_eval_tasks_choose_what_runs(cfg, tokenizer, model, tasks):
    """eval.tasks: only the listed measures are built and run (a real model on its own data need not be scored on
    demo text and arithmetic); the pass@k keys come with passk, the perplexity with forgetting."""
    import dataclasses

    only = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, tasks=tasks))
    sets = hook.load_sets(only, tokenizer)
    assert (len(sets.sequences) > 0, len(sets.prompts) > 0) == ("forgetting" in tasks, "passk" in tasks)
    row, table = hook.evaluate(model, tokenizer, sets, only, step=2, rank=0, world=1)
    assert ("forgetting/ppl" in row) == ("forgetting" in tasks) and ("eval/pass@1" in row) == ("passk" in tasks)
    assert bool(table) == ("passk" in tasks)
    assert hook.with_rise(row, None).get("forgetting/ppl_rise", 0.0) == 0.0 and hook.warnings(row, row, only) == []
    with pytest.raises(ValueError, match=r"eval\.tasks"):
        EvalConfig(name="x", tasks=["nope"])


def test_score_is_the_unbiased_estimator_over_prompts(cfg):
    sets = hook.EvalSets([], [Prompt([{"role": "user", "content": "q1"}], "5"),
                              Prompt([{"role": "user", "content": "q2"}], "7")], [[1], [2]])
    samples = {0: [Sample("it is 5", 3, [1.0]), Sample("6", 1, [1.0])], 1: [Sample("8", 1, [0.5])] * 2}
    gathered = [[(1, samples[1])], [(0, samples[0])]]  # ranks return their prompts in any order
    row, table = hook.score(sets, gathered, cfg)
    assert row["eval/pass@1"] == pytest.approx((pass_at_k(2, 1, 1) + 0.0) / 2)
    assert row["eval/pass@2"] == pytest.approx(0.5)
    assert row["eval/diversity/mean_entropy"] == pytest.approx((1 + 1 + 0.5 + 0.5) / 4)
    assert table[0] == {"prompt": "q1", "completion": "it is 5", "score": True}
    assert row["eval/could_not_run"] == 0


def test_score_reports_samples_the_sandbox_stopped(cfg):
    import dataclasses

    passk = dataclasses.replace(cfg.eval.passk, checker="python", allow_code_execution=True)
    c = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, passk=passk))
    sets = hook.EvalSets([], [Prompt([{"role": "user", "content": "q"}], "assert x == 1")], [[1]])
    texts = ["x = 1", "x = 2", "x = bytearray(2 * 1024**3)"]  # passes, fails, hits the memory limit
    row, _ = hook.score(sets, [[(0, [Sample(t, 1, [1.0]) for t in texts])]], c)
    assert row["eval/could_not_run"] == 1 and row["eval/pass@1"] == pytest.approx(1 / 3)


def test_warnings_against_the_baseline(cfg):
    base = {"step": 0, "forgetting/ppl": 10.0, "eval/diversity/distinct_2": 0.8, "eval/diversity/mean_entropy": 2.0}
    same = {**base, "step": 5}
    assert hook.warnings(same, base, cfg) == [] and hook.warnings(base, base, cfg) == []
    worse = {**base, "step": 10, "forgetting/ppl": 12.0, "eval/diversity/distinct_2": 0.4}
    msgs = hook.warnings(worse, base, cfg)
    assert len(msgs) == 2 and "rose 20%" in msgs[0] and "distinct_2" in msgs[1]
    assert hook.with_rise(worse, base)["forgetting/ppl_rise"] == pytest.approx(0.2)
    assert hook.with_rise(base, None)["forgetting/ppl_rise"] == 0.0


def test_file_prompts_and_bad_data_errors(cfg, tokenizer, tmp_path):
    import dataclasses
    import json

    data = tmp_path / "gsm.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {i} + 1?", "answer": f"so\n#### {i + 1}"}) + "\n"
                            for i in range(5)))
    c = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, passk=dataclasses.replace(
        cfg.eval.passk, data=str(data), prompts=2)))
    prompts = hook.passk_prompts(c)
    assert [p.reference for p in prompts] == ["so\n#### 1", "so\n#### 2"]
    (tmp_path / "empty.jsonl").write_text(json.dumps({"text": "no prompt here"}) + "\n")
    c = dataclasses.replace(c, eval=dataclasses.replace(c.eval, passk=dataclasses.replace(
        c.eval.passk, data=str(tmp_path / "empty.jsonl"))))
    with pytest.raises(ValueError, match=r"eval\.passk\.data"):
        hook.passk_prompts(c)


def test_sample_pads_rounds_so_every_rank_calls_generate_equally(cfg, tokenizer, model, monkeypatch):
    calls = []

    def fake_batch(model, tok, batch, sampling, stops, synced_gpus=False):
        calls.append((len(batch), synced_gpus))
        return [[Sample("x", 1, [0.0])] * sampling.n for _ in batch]

    monkeypatch.setattr(hook, "sample_batch", fake_batch)
    sets = hook.EvalSets([], [Prompt([], str(i)) for i in range(5)], [[1]] * 5)
    got = [hook.sample(model, tokenizer, sets, cfg, r, 2, seed=0) for r in (0, 1)]
    assert [i for i, _ in got[0]] == [0, 2, 4] and [i for i, _ in got[1]] == [1, 3]
    assert calls == [(2, True), (1, True), (2, True), (1, True)]  # rank 1 pads its last round
    assert np.all([len(g) == cfg.eval.passk.n for _, g in got[0]])
