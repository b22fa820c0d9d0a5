"""Answer checkers: ``check(completion, reference) -> bool``, looked up by name with :func:`get`."""

from __future__ import annotations

import re
from collections.abc import Callable
from fractions import Fraction

from keel.choices import CHECKERS, CODE_CHECKERS  # the names (eval.passk.checker); code-executing: opt-in only
from keel.errors import UserError
from keel.eval import sandbox

Checker = Callable[[str, str], bool]
OPT_IN_HOW = "--allow-code-execution (keel eval passk) or eval.passk.allow_code_execution=true (keel train)"

# ----------------------------------------------------------------------------------------- math

# A number with optional sign, strict thousands grouping ("1,000" yes, "1,2,3" is three numbers),
# optional decimals. The lookbehind stops "3-4" from reading as 3 and -4.
_NUM = r"(?<![\w.])[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?<![\w.])[-+]?\.\d+"
# A simple fraction "3/4" is one number, not two.
_NUM_RE = re.compile(rf"(?:{_NUM})(?:\s*/\s*(?:\d{{1,3}}(?:,\d{{3}})+|\d+)(?:\.\d+)?)?")
_GSM8K_RE = re.compile(r"####\s*([^\n]*)")
_ANSWER_IS_RE = re.compile(r"answer\s+is\s*:?\s*([^\n]*)", re.IGNORECASE)
_LATEX_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_LATEX_TEXT_RE = re.compile(r"\\(?:text|mathrm|textbf|mbox)\s*\{[^{}]*\}")


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (braces balanced), or None."""
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None  # unbalanced: treat as no box


def _delatex(s: str) -> str:
    """Turn the LaTeX that shows up in boxed answers into plain text."""
    s = _LATEX_FRAC_RE.sub(r"\1/\2", s)
    s = _LATEX_TEXT_RE.sub(" ", s)  # units like \text{ dollars}
    s = s.replace("{,}", ",").replace("\\!", "").replace("\\,", "").replace("\\$", "$").replace("\\%", "%")
    return s


def extract_answer(text: str) -> str | None:
    """Final-answer span: GSM8K ``#### N``, else ``\\boxed{}``, else "answer is X", else the last number."""
    marks = _GSM8K_RE.findall(text)
    if marks:
        return marks[-1].strip()
    boxed = _last_boxed(text)
    if boxed is not None:
        return _delatex(boxed).strip()
    said = _ANSWER_IS_RE.findall(text)
    if said:
        return said[-1].strip()
    numbers = _NUM_RE.findall(text)
    return numbers[-1] if numbers else None


def parse_number(span: str) -> Fraction | None:
    """First number in ``span`` as an exact Fraction ("$1,000.00" -> 1000, "3/4" -> 3/4), or None."""
    m = _NUM_RE.search(span)
    if m is None:
        return None
    num, _, den = m.group(0).replace(",", "").replace(" ", "").partition("/")
    # Fraction parses decimals exactly, so "72", "72.0" and "72.00" are equal with no float rounding.
    value = Fraction(num)
    if den:
        if Fraction(den) == 0:
            return None
        value /= Fraction(den)
    return value


def _normalise_text(span: str) -> str:
    """Loose string form for non-numeric answers."""
    return re.sub(r"\s+", " ", span.replace("$", "")).strip().rstrip(".").strip().lower()


def _reference_answer(reference: str) -> str | None:
    """The answer inside a reference: after ``####`` if a full GSM8K solution, else the reference itself."""
    marks = _GSM8K_RE.findall(reference)
    if marks:
        return marks[-1].strip()
    return reference.strip() or None


def check_math(completion: str, reference: str) -> bool:
    """True iff the completion's final answer equals the reference's, numerically when both are numbers."""
    want = _reference_answer(reference)
    if want is None:
        raise UserError("math checker: empty reference")
    got = extract_answer(completion)
    if got is None:
        return False
    want_num, got_num = parse_number(want), parse_number(got)
    if want_num is not None and got_num is not None:
        return want_num == got_num
    if want_num is not None or got_num is not None:
        return False
    return _normalise_text(got) == _normalise_text(want)


# -------------------------------------------------------------------------------- string checks


def check_exact(completion: str, reference: str) -> bool:
    """Equality after stripping surrounding whitespace."""
    return completion.strip() == reference.strip()


def check_regex(completion: str, reference: str) -> bool:
    """The reference is a regex that must fullmatch the stripped completion."""
    try:
        pattern = re.compile(reference)
    except re.error as e:
        raise UserError(f"regex checker: bad reference pattern {reference!r}: {e}") from e
    return pattern.fullmatch(completion.strip()) is not None


def check_contains(completion: str, reference: str) -> bool:
    """Reference (stripped) is a substring of the completion.

    Caveat: substring matching over-counts. "12" is in "112", and a completion that lists many
    candidate answers passes if any one is right, so pass@k computed with it is biased upward
    (this is what inflated the seed document's numbers). Prefer ``math`` or ``exact``.
    """
    needle = reference.strip()
    if not needle:
        raise UserError("contains checker: empty reference would match everything")
    return needle in completion


# ------------------------------------------------------------------------------------- python

_FENCE_RE = re.compile(r"```[ \t]*(python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_code(completion: str) -> str:
    """First ```python fenced block, else the first untagged fenced block, else the whole completion."""
    blocks = _FENCE_RE.findall(completion)
    for tag, body in blocks:
        if tag:
            return body
    for _tag, body in blocks:
        return body
    return completion


class PythonChecker:
    """Runs ``code + "\\n" + tests`` in the bubblewrap sandbox (``keel.eval.sandbox``); passes iff it exits 0.

    Model-generated code runs only with explicit opt-in (``KEEL_ALLOW_CODE_EXECUTION=1``, or
    ``allow_code_execution=True`` from a CLI flag or config key); without it every call raises.
    """

    def __init__(self, limits: sandbox.Limits | None = None, allow_code_execution: bool = False) -> None:
        self.limits = limits or sandbox.Limits()
        self.allow_code_execution = allow_code_execution

    def outcome(self, completion: str, reference: str) -> sandbox.Outcome:
        """passed / failed / could_not_run (with the limit that stopped it) for one completion."""
        sandbox.require_opt_in(self.allow_code_execution, OPT_IN_HOW)
        return sandbox.run(extract_code(completion) + "\n" + reference, self.limits)

    def __call__(self, completion: str, reference: str) -> bool:
        return self.outcome(completion, reference).passed


def make_python_checker(timeout_s: float = 5.0, memory_mb: int = 1024, max_procs: int = 64, fsize_mb: int = 16,
                        allow_code_execution: bool = False) -> PythonChecker:
    """A python checker with these limits (wall seconds, MB per process and in total, tasks, MB of files)."""
    return PythonChecker(sandbox.Limits(timeout_s, memory_mb, max_procs, fsize_mb), allow_code_execution)


def outcome(check: Checker, completion: str, reference: str) -> sandbox.Outcome:
    """The checker's verdict as an Outcome (only the python checker can report ``could_not_run``)."""
    if isinstance(check, PythonChecker):
        return check.outcome(completion, reference)
    return sandbox.Outcome("passed" if check(completion, reference) else "failed")


# ----------------------------------------------------------------------------------- registry

_REGISTRY: dict[str, Checker] = {
    "math": check_math,
    "exact": check_exact,
    "regex": check_regex,
    "contains": check_contains,
    "python": make_python_checker(),
}
assert sorted(_REGISTRY) == list(CHECKERS)  # keel.config validates eval.passk.checker against these names


def names() -> list[str]:
    """Names of the registered checkers."""
    return sorted(_REGISTRY)


def get(name: str, allow_code_execution: bool = False) -> Checker:
    """The checker registered under ``name``; a code-executing one only with opt-in and its sandbox present."""
    try:
        check = _REGISTRY[name]
    except KeyError:
        raise UserError(f"unknown checker {name!r}; valid: {', '.join(names())}") from None
    if name in CODE_CHECKERS:
        require_code_execution(allow_code_execution)
        return PythonChecker(check.limits, allow_code_execution=True)
    return check


def require_code_execution(allow_code_execution: bool = False) -> None:
    """Raise (naming KEEL_ALLOW_CODE_EXECUTION) without opt-in, or when the sandbox is not installed."""
    sandbox.require_opt_in(allow_code_execution, OPT_IN_HOW)
    sandbox.require_sandbox()
