"""Answer checkers: math extraction/normalisation, string checks, and the sandboxed python checker."""

from __future__ import annotations

import json
import os
from fractions import Fraction
from pathlib import Path

import pytest
from keel.eval import checkers
from keel.eval.checkers import extract_answer, get, make_python_checker, parse_number

GSM8K_DATA = Path(__file__).resolve().parents[2].parent / "shared/data/sft/gsm8k_train.jsonl"

# GSM8K-style reference solutions (reasoning, calculator annotations, "#### N").
GSM8K_LIKE = [
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72",
    "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nShe earned 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10",
    "The house costs 800 * 1.5 = <<800*1.5=1200>>1,200 dollars.\n#### 1,200",
    "He loses 3 - 8 = <<3-8=-5>>-5 points.\n#### -5",
    "Each gets 7/2 = <<7/2=3.5>>3.5 pies.\n#### 3.5",
    "So 100 * 0.25 = <<100*0.25=25>>25 percent.\n#### 25",
    "Total is 845,000 - 360 = <<845000-360=844640>>844,640\n#### 844640",
    "There are 0 left.\n#### 0",
]


def _final(reference: str) -> Fraction:
    return parse_number(reference.split("####")[-1])


def _perturb(reference: str, delta: int = 1) -> str:
    head, _, _ = reference.rpartition("####")
    return f"{head}#### {_final(reference) + delta}"


# ---------------------------------------------------------------------------------------- math


@pytest.mark.parametrize("ref", GSM8K_LIKE)
def test_math_reference_scores_itself_and_not_perturbed(ref):
    check = get("math")
    assert check(ref, ref)
    assert check(f"#### {_final(ref)}", ref)
    assert not check(_perturb(ref), ref)
    assert not check(_perturb(ref, -3), ref)
    assert not check(ref, _perturb(ref))


@pytest.mark.parametrize(
    "completion,reference",
    [
        ("#### 72", "72"),
        ("#### 72.0", "72"),
        ("#### 72.00", "72"),
        ("#### $72", "72"),
        ("#### 72 dollars", "$72.00"),
        ("#### 1,000", "1000"),
        ("#### 1000", "1,000"),
        ("#### 50%", "50"),
        ("#### 3/4", "0.75"),
        ("#### 0.75", "3/4"),
        ("#### -5", "-5"),
        ("#### .5", "0.5"),
        ("The final answer is \\boxed{72}.", "72"),
        ("So the result is \\boxed{\\$1{,}000}", "1000"),
        ("\\boxed{\\frac{3}{4}}", "0.75"),
        ("\\boxed{18 \\text{ apples}}", "#### 18"),
        ("We compute 3 + 4 = 7, so the answer is 7.", "7"),
        ("The answer is: $1,250.", "1250"),
        ("First 5 then 10 and finally 15 eggs.", "15"),
        ("It costs 3/4 of a dollar", "0.75"),
    ],
)
def test_math_normalisation_matches(completion, reference):
    assert get("math")(completion, reference)


@pytest.mark.parametrize(
    "completion,reference",
    [
        ("#### 73", "72"),
        ("#### 7.2", "72"),
        ("#### 112", "12"),  # substring of neither kind counts
        ("#### 1,2", "12"),  # not a thousands separator
        ("I don't know.", "72"),
        ("", "72"),
        ("#### -72", "72"),
        ("\\boxed{71} but 72 is also possible", "72"),  # the box wins over the last number
        ("#### 5\nthen 72", "72"),  # the GSM8K marker wins over everything
    ],
)
def test_math_rejects(completion, reference):
    assert not get("math")(completion, reference)


def test_extraction_preference_order():
    assert extract_answer("answer is 3 \\boxed{4} #### 5 then 6") == "5 then 6"
    assert extract_answer("the answer is 3, \\boxed{4}, then 6") == "4"
    assert extract_answer("the answer is 3, then 6") == "3, then 6"
    assert extract_answer("1 and 2 and 6") == "6"
    assert extract_answer("no numbers") is None
    assert parse_number("$1,234.50 total") == Fraction(246_9, 2)
    assert parse_number("1/0") is None


def test_math_non_numeric_answers_compare_as_text():
    check = get("math")
    assert check("\\boxed{Tuesday}", "tuesday")
    assert not check("\\boxed{Monday}", "Tuesday")
    assert not check("\\boxed{Monday}", "3")


def test_math_empty_reference_is_error():
    with pytest.raises(ValueError):
        get("math")("#### 1", "  ")


@pytest.mark.skipif(not GSM8K_DATA.exists(), reason=f"{GSM8K_DATA} not present")
def test_math_on_gsm8k_train_file():
    check = get("math")
    rows = [json.loads(line) for line in GSM8K_DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert rows
    for row in rows:
        answer = row["answer"]
        assert check(answer, answer), answer
        assert not check(_perturb(answer), answer), answer


# ------------------------------------------------------------------------------- string checks


def test_exact():
    check = get("exact")
    assert check("  42\n", "42")
    assert not check("42.0", "42")
    assert not check("4 2", "42")


def test_regex():
    check = get("regex")
    assert check("  answer: 42 ", r"answer: \d+")
    assert not check("answer: 42 and more", r"answer: \d+")  # fullmatch, not search
    with pytest.raises(ValueError):
        check("x", "([unclosed")


def test_contains_and_its_caveat():
    check = get("contains")
    assert check("the answer is 12", "12")
    # Documented over-counting: these pass although the answer is not 12.
    assert check("the answer is 112", "12")
    assert check("maybe 3, 7, 12 or 40", "12")
    assert "over-counts" in checkers.check_contains.__doc__
    assert not check("the answer is 13", "12")
    with pytest.raises(ValueError):
        check("anything", " ")


def test_unknown_checker_lists_valid_names():
    with pytest.raises(ValueError, match="contains, exact, math, python, regex"):
        get("nope")


# ------------------------------------------------------------------------------------ python
# The sandbox itself (attacks, limits, could-not-run) is tested in test_sandbox.py.


@pytest.fixture
def opted_in(monkeypatch):
    monkeypatch.setenv("KEEL_ALLOW_CODE_EXECUTION", "1")


def test_python_passes_and_fails(opted_in):
    check = get("python")
    code = "```python\ndef add(a, b):\n    return a + b\n```\nThis adds."
    assert check(code, "assert add(2, 3) == 5")
    assert not check(code, "assert add(2, 3) == 6")
    assert not check("def add(a, b) return", "assert add(1, 1) == 2")  # syntax error
    assert check("def f():\n    return 1", "assert f() == 1")  # no fence: whole completion is code


def test_python_runs_in_clean_env_and_fresh_dir(opted_in, monkeypatch):
    monkeypatch.setenv("KEEL_FAKE_SECRET", "hunter2")
    check = make_python_checker(timeout_s=5)
    assert check("import os", "assert 'KEEL_FAKE_SECRET' not in os.environ")
    assert check("import os", "assert os.listdir('.') == ['prog.py']")
    assert check("import sys", "assert sys.stdin is None or sys.stdin.read() == ''")
    assert not check("import os", f"assert os.getpid() == {os.getpid()}")  # never in-process


def test_python_refuses_without_opt_in(monkeypatch):
    monkeypatch.delenv("KEEL_ALLOW_CODE_EXECUTION", raising=False)
    with pytest.raises(ValueError, match="KEEL_ALLOW_CODE_EXECUTION"):
        get("python")
    with pytest.raises(ValueError, match="KEEL_ALLOW_CODE_EXECUTION"):
        make_python_checker()("print(1)", "")  # the checker object refuses too, not only the lookup
    monkeypatch.setenv("KEEL_ALLOW_CODE_EXECUTION", "0")
    with pytest.raises(ValueError, match="KEEL_ALLOW_CODE_EXECUTION"):
        get("python")
    assert get("python", allow_code_execution=True)("x = 1", "assert x == 1")  # the flag is an opt-in
    assert get("math")("#### 4", "4")  # the other checkers need none
