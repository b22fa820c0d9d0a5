"""`keel diagnose` without models: the decision rules on synthetic numbers, few-shot prompts, report files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from keel.cli.diagnose import main, parser, resolve_model
from keel.eval.checkers import check_math
from keel.eval.diagnose import (
    CONTINUE,
    MITIGATION_OVERRIDES,
    PREFIX_WORDS,
    ProbeItem,
    Scores,
    Thresholds,
    classify,
    continuation_prompts,
    demo_probe,
    demo_text,
    few_shot_messages,
    format_markdown,
    load_pretrain,
    mode_collapse,
    paired_stderr,
    scores_from,
    shot_indices,
    signals,
    write_outputs,
)

TH = Thresholds()


def scores(ppl: float = 10.0, zero: float = 0.6, few: float = 0.7, **kw) -> Scores:
    """Synthetic scores with healthy diversity numbers unless overridden."""
    div = {"distinct_2": 0.8, "mean_entropy": 2.0, "repeated_4gram_rate": 0.02}
    return Scores(ppl, zero, few, **{**div, **kw})


# ---------------------------------------------------------------- verdicts


@pytest.mark.parametrize(
    ("tuned", "verdict", "side"),
    [
        (scores(10.5, 0.58, 0.69), "healthy", "healthy"),
        (scores(10.2, 0.30, 0.65), "alignment_tax", "alignment_tax"),
        (scores(15.0, 0.10, 0.20), "catastrophic_forgetting", "forgetting"),
        (scores(15.0, 0.55, 0.70), "forgetting_risk", "forgetting"),
        (scores(10.2, 0.10, 0.20), "skill_forgetting", "forgetting"),
    ],
)
def test_each_verdict(tuned, verdict, side):
    v = classify(scores(), tuned, TH, shots=3)
    assert (v["verdict"], v["side"]) == (verdict, side)
    assert not v["mode_collapse"]["flag"]
    text = "\n".join(v["evidence"])
    assert f"{tuned.ppl:.4g}" in text and "3-shot" in text  # the numbers behind the verdict are listed


def test_healthy_has_no_mitigations_and_forgetting_lists_all_five():
    assert classify(scores(), scores(), TH)["mitigations"] == []
    found = classify(scores(), scores(15.0, 0.1, 0.2), TH)["mitigations"]
    assert [m["name"] for m in found] == ["replay", "ewc", "lora", "conservative_lr", "progressive"]
    assert found[0]["override"] == "keel train mitigation=replay mitigation.replay.ratio=0.1"
    assert all(m["override"].startswith("keel train mitigation=") and m["why"] for m in found)


def test_tax_suggests_skill_replay_not_the_probe_and_mentions_beta():
    v = classify(scores(), scores(10.2, 0.30, 0.65), TH)
    assert [m["name"] for m in v["mitigations"]] == ["conservative_lr", "replay"]
    assert "mitigation.replay.source.path=<training data of the skill>" in v["mitigations"][1]["override"]
    assert "never the probe set" in v["mitigations"][1]["why"]
    assert any("beta" in n for n in v["notes"])


def test_few_shot_recovery_compares_best_of_zero_and_few_shot():
    # tuned is worse few-shot (0.4 vs 0.7) but zero-shot reaches the base's best (0.65 vs 0.7): recovered
    sig = signals(scores(), scores(10.0, 0.65, 0.4), TH)
    assert sig["recovered"] and sig["best_drop"] == pytest.approx(0.05)
    assert classify(scores(), scores(10.0, 0.65, 0.4), TH)["verdict"] == "healthy"


# ---------------------------------------------------------------- edges at thresholds


@pytest.mark.parametrize(("tuned_ppl", "spike"), [(11.0, False), (11.0 + 1e-6, True), (10.0, False), (5.0, False)])
def test_ppl_spike_is_strictly_above_threshold(tuned_ppl, spike):
    sig = signals(scores(10.0), scores(tuned_ppl), TH)
    assert sig["ppl_spike"] is spike


@pytest.mark.parametrize(("zero", "dropped"), [(0.5, False), (0.49, True), (0.6, False), (0.9, False)])
def test_zero_shot_drop_at_threshold(zero, dropped):
    # 0.6 - 0.5 is 0.09999999999999998 in floats: exactly the threshold is not a drop
    assert signals(scores(), scores(zero=zero), TH)["zero_shot_dropped"] is dropped


@pytest.mark.parametrize(("few", "recovered"), [(0.6, True), (0.59, False)])
def test_recovery_at_threshold(few, recovered):
    sig = signals(scores(zero=0.6, few=0.7), scores(zero=0.1, few=few), TH)
    assert sig["recovered"] is recovered
    assert classify(scores(), scores(zero=0.1, few=few), TH)["verdict"] == (
        "alignment_tax" if recovered else "skill_forgetting")


def test_thresholds_are_options():
    tuned = scores(13.0, 0.3, 0.65)  # +30% perplexity
    assert classify(scores(), tuned, TH)["verdict"] == "forgetting_risk"
    assert classify(scores(), tuned, Thresholds(ppl_rise=0.5))["verdict"] == "alignment_tax"
    assert classify(scores(), tuned, Thresholds(ppl_rise=0.5, probe_drop=0.4))["verdict"] == "healthy"


@pytest.mark.parametrize("bad", [Thresholds(ppl_rise=-0.1), Thresholds(probe_drop=math.nan),
                                 Thresholds(collapse_drop=1.0), Thresholds(collapse_drop=0.0)])
def test_bad_thresholds_are_value_errors(bad):
    with pytest.raises(ValueError, match="must be"):
        classify(scores(), scores(), bad)


def test_nonpositive_perplexity_is_a_value_error():
    with pytest.raises(ValueError, match="perplexities must be positive"):
        signals(scores(0.0), scores(), TH)


# ---------------------------------------------------------------- mode collapse


@pytest.mark.parametrize(
    ("tuned_kw", "flag"),
    [
        ({"distinct_2": 0.56}, False),  # exactly 30% below 0.8
        ({"distinct_2": 0.55}, True),
        ({"mean_entropy": 1.3}, True),  # 35% below 2.0
        ({"mean_entropy": 1.5}, False),
        ({"repeated_4gram_rate": 0.12}, False),  # +0.10 exactly
        ({"repeated_4gram_rate": 0.13}, True),
        ({"distinct_2": None, "mean_entropy": None}, False),  # unmeasured: no evidence either way
    ],
)
def test_mode_collapse_flag(tuned_kw, flag):
    got = mode_collapse(scores(), scores(**tuned_kw), TH)
    assert got["flag"] is flag and len(got["reasons"]) == int(flag)


def test_mode_collapse_needs_something_to_fall_from_and_adds_mitigations():
    assert not mode_collapse(scores(distinct_2=0.0), scores(distinct_2=0.0), TH)["flag"]
    v = classify(scores(), scores(distinct_2=0.2), TH)
    assert v["verdict"] == "healthy" and v["mode_collapse"]["flag"]
    assert "mode collapse" in v["summary"] and any("distinct_2 fell 75%" in e for e in v["evidence"])
    assert [m["name"] for m in v["mitigations"]] == ["replay", "conservative_lr"]


# ---------------------------------------------------------------- notes


def test_paired_stderr_by_hand():
    # diffs -1, 0, 0, +1: mean 0, sample variance 2/3, se = sqrt(2/3 / 4)
    assert paired_stderr([1, 1, 0, 0], [0, 1, 0, 1]) == pytest.approx(math.sqrt(1 / 6))
    assert paired_stderr([1], [0]) is None


def test_notes_flag_uninformative_probe_noise_and_tokenizer_mismatch():
    base = scores(zero=0.0, few=0.05, ppl_tokens=100)
    assert any("cannot show a capability loss" in n for n in classify(base, base, TH)["notes"])
    tuned = scores(zero=0.0, few=0.05, ppl_tokens=120)
    assert any("tokenizers differ" in n for n in classify(base, tuned, TH)["notes"])
    # 1 of 4 items lost: a drop of 0.25, but within 2 paired standard errors (2 * 0.25 = 0.5)
    b = scores(zero=1.0, few=1.0, zero_flags=[True] * 4, few_flags=[True] * 4)
    t = scores(zero=0.75, few=1.0, zero_flags=[True, True, True, False], few_flags=[True] * 4)
    assert any("within 2 paired standard errors" in n for n in classify(b, t, TH)["notes"])


# ---------------------------------------------------------------- few-shot prompts

ITEMS = [ProbeItem([{"role": "user", "content": f"q{i}"}], str(i), f"a{i}") for i in range(6)]


def test_shot_indices_exclude_the_item_and_are_deterministic():
    for i in range(len(ITEMS)):
        got = shot_indices(ITEMS, i, 3, seed=0)
        assert i not in got and len(set(got)) == 3
        assert got == shot_indices(ITEMS, i, 3, seed=0)
    assert any(shot_indices(ITEMS, i, 3, 0) != shot_indices(ITEMS, i, 3, 1) for i in range(len(ITEMS)))


def test_shot_indices_exclude_duplicates_of_the_prompt():
    items = ITEMS[:3] + [ProbeItem([{"role": "user", "content": "q0"}], "0", "dup")]
    assert 3 not in shot_indices(items, 0, 2) and shot_indices(items, 0, 2) == [1, 2]
    with pytest.raises(ValueError, match="3-shot prompts need 3 other probe items"):
        shot_indices(items, 0, 3)


def test_few_shot_messages_layout():
    sys_msg = {"role": "system", "content": "Be brief."}
    items = [ProbeItem([sys_msg, {"role": "user", "content": f"q{i}"}], str(i), f"a{i}") for i in range(4)]
    msgs = few_shot_messages(items, 2, 2, seed=0)
    shots = shot_indices(items, 2, 2, seed=0)
    assert msgs[0] == sys_msg and sum(m["role"] == "system" for m in msgs) == 1
    assert msgs[-1] == {"role": "user", "content": "q2"}
    want = [m for j in shots for m in ({"role": "user", "content": f"q{j}"}, {"role": "assistant", "content": f"a{j}"})]
    assert msgs[1:-1] == want
    assert "q2" not in [m["content"] for m in msgs[:-1]] and "a2" not in [m["content"] for m in msgs]


def test_demo_probe_answers_check_and_are_held_out():
    from keel.data import demo

    items = demo_probe(20)
    assert len(items) == 20 and len({it.messages[0]["content"] for it in items}) == 20
    assert all(check_math(it.demonstration, it.reference) for it in items)
    assert all(not check_math(it.demonstration, str(int(it.reference) + 1)) for it in items)
    trained = {ex["messages"][0]["content"] for ex in demo.generate("arithmetic", 3000, 0)}
    assert not trained & {it.messages[0]["content"] for it in items}


# ---------------------------------------------------------------- evaluation sets


def test_pretrain_sets(tmp_path):
    assert len(demo_text(5)) == 5 and all("text" in ex for ex in demo_text(5))
    assert load_pretrain(None, "auto", 3) == demo_text(3)
    data = tmp_path / "pre.jsonl"
    data.write_text("".join(json.dumps({"text": f"line {i} of text"}) + "\n" for i in range(5)))
    assert [ex["text"] for ex in load_pretrain(str(data), "auto", 2)] == ["line 0 of text", "line 1 of text"]
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"nothing": 1}) + "\n")
    with pytest.raises(ValueError, match="no valid examples"):
        load_pretrain(str(empty), "auto", 2)


def test_continuation_prompts():
    long = {"text": " ".join(f"w{i}" for i in range(40))}
    chat = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hello there"},
                         {"role": "assistant", "content": "hi"}]}
    got = continuation_prompts([long, {"text": ""}, chat, long], 2)
    assert got[0] == [{"role": "user", "content": CONTINUE + " ".join(f"w{i}" for i in range(PREFIX_WORDS))}]
    assert got[1] == [{"role": "user", "content": CONTINUE + "hello there"}] and len(got) == 2
    with pytest.raises(ValueError, match="diversity prompts"):
        continuation_prompts([{"text": "  "}], 3)


# ---------------------------------------------------------------- report files


def _measures(ppl: float, zero: list[bool], few: list[bool], distinct_2: float) -> dict:
    """A measurement dict shaped like keel.eval.diagnose_measure.measure's."""
    return {"perplexity": {"ppl": ppl, "nll": math.log(ppl), "tokens": 500, "examples": 4},
            "probe": {"items": len(zero), "zero_shot": sum(zero) / len(zero), "few_shot": sum(few) / len(few),
                      "zero_shot_correct": zero, "few_shot_correct": few, "examples": []},
            "diversity": {"distinct_1": 0.5, "distinct_2": distinct_2, "mean_entropy": math.nan,
                          "repeated_4gram_rate": 0.0}}


def test_report_files(tmp_path):
    base = _measures(10.0, [True, True, False, True], [True, True, True, True], 0.8)
    tuned = _measures(20.0, [False, False, False, False], [False, True, False, False], 0.3)
    verdict = classify(scores_from(base), scores_from(tuned), TH, shots=2)
    d = {"config": {"base": "b", "tuned": "t", "shots": 2}, "thresholds": vars(TH).copy(),
         "data": {"pretrain": "demo", "probe": "demo"}, "base": base, "tuned": tuned, "verdict": verdict}
    md, js = write_outputs(d, tmp_path / "out")
    assert md == tmp_path / "out" / "diagnosis.md" and js == tmp_path / "out" / "diagnosis.json"
    text = js.read_text()
    assert "NaN" not in text  # strict JSON: the NaN entropy is written as null
    got = json.loads(text)
    assert got["verdict"]["verdict"] == "catastrophic_forgetting" and got["verdict"]["mode_collapse"]["flag"]
    assert got["thresholds"] == {"ppl_rise": 0.1, "probe_drop": 0.1, "collapse_drop": 0.3, "repeat_rise": 0.1}
    assert got["tuned"]["diversity"]["mean_entropy"] is None
    page = md.read_text()
    assert page == format_markdown(d)
    assert "| pretraining perplexity | 10 | 20 | +100.0% |" in page
    assert "| probe zero-shot accuracy | 0.75 | 0 | -0.750 |" in page
    assert "| probe 2-shot accuracy | 1 | 0.25 | -0.750 |" in page
    assert "## Verdict: catastrophic_forgetting (forgetting side)" in page
    assert f"`{MITIGATION_OVERRIDES['ewc']}`" in page and "Mode collapse flag: yes" in page


# ---------------------------------------------------------------- CLI (no model loaded)


def test_parser_defaults_match_thresholds():
    args = parser().parse_args(["--base", "b", "--tuned", "t"])
    assert (args.ppl_rise, args.probe_drop, args.collapse_drop, args.repeat_rise) == (0.1, 0.1, 0.3, 0.1)
    assert (args.shots, args.checker, args.limit, args.out) == (3, "math", 64, "diagnose")


def test_resolve_model(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    (tmp_path / "run" / "hf").mkdir(parents=True)
    (tmp_path / "run" / "hf" / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path / "m"), "--base") == str(tmp_path / "m")
    assert resolve_model(str(tmp_path / "run"), "--base") == str(tmp_path / "run" / "hf")
    assert resolve_model("meta-llama/Llama-3.2-1B", "--base") == "meta-llama/Llama-3.2-1B"
    with pytest.raises(ValueError, match="no config.json"):
        resolve_model(str(tmp_path), "--tuned")
    with pytest.raises(ValueError, match="not a model directory"):
        resolve_model(str(tmp_path / "missing" / "x" / "y"), "--tuned")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--shots", "0"], "--shots must be >= 1"),
        (["--collapse-drop", "1.5"], "--collapse-drop must be in (0, 1)"),
        (["--limit", "3", "--shots", "3"], "3-shot prompts need 3 other probe items"),
        (["--template", "foo"], "unknown template 'foo'"),
    ],
)
def test_cli_user_errors_exit_with_one_line(tmp_path, capsys, extra, message):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")  # never loaded: the errors come first
    with pytest.raises(SystemExit) as err:
        main(["--base", str(model), "--tuned", str(model), "--out", str(tmp_path / "o"), *extra])
    assert str(err.value).startswith("keel diagnose: ") and message in str(err.value)
    assert not Path(tmp_path / "o").exists()
