"""Start-up self-checks of rendering and masking on a sample of each source; a mismatch stops the run.

Two checks run on the first ``SAMPLE`` valid chat rows of every source, before any worker starts:

1. **Built-in template == the tokenizer's own.** When the tokenizer's Jinja ``chat_template``
   renders a fixed probe conversation exactly as the built-in template does, it carries the same
   template, and then every sampled conversation must render to the same token ids both ways (a
   difference is a bug in one of them, and training would teach a layout inference will not
   use). A tokenizer whose template differs already on the probe (e.g. Llama 3.1's, which adds a
   dated system header) is not the same template: that is reported once as a note, with the first
   difference, and not compared further. Rows with tools are not compared (tool syntax differs
   between templates of the same family).
   A template that refuses the probe's system message (Gemma's) is probed without it.
2. **Trained spans.** The trained tokens of each sampled conversation decode to exactly the text
   the template writes for each trained answer: its reasoning block (``masking.train_reasoning``),
   content, and end-of-turn markup (``masking.train_eot``), up to whitespace at the run's edges
   that the tokenizer itself absorbs (SentencePiece's leading space, Phi-3's stripped newlines);
   ``all_tokens`` sources and ``template=tokenizer|jinja`` (whose spans come from the Jinja
   template, checked when it is rendered) are skipped.
"""

from __future__ import annotations

from typing import Any

from keel.data.encoding import Renderer, TextEncoder
from keel.data.hf_template import template_ids
from keel.data.masking import IGNORE
from keel.data.template import ChatTemplate, render_chat, render_pieces, uses_jinja
from keel.errors import UserError

SAMPLE = 8  # valid chat rows checked per source
PROBE = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Hi there!"},
         {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "Tell me a joke."},
         {"role": "assistant", "content": "Why did the chicken cross the road?"}]


def _ours(messages: list[dict], enc: TextEncoder, template: ChatTemplate) -> list[int]:
    return [i for seg in render_chat(messages, enc, template) for i in seg.ids]


def first_difference(ours: list[int], theirs: list[int], tokenizer: Any, context: int = 6) -> str:
    """Where two id sequences part, shown as decoded text around that point."""
    i = next((k for k, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    lo = max(0, i - context)

    def show(ids: list[int]) -> str:
        return repr(tokenizer.decode(ids[lo:i])) + " | " + repr(tokenizer.decode(ids[i : i + context]))

    return (f"first difference at token {i} of {len(ours)} vs {len(theirs)}: built-in {show(ours)}; "
            f"tokenizer {show(theirs)}")


def same_template(enc: TextEncoder, template: Renderer) -> tuple[bool, str]:
    """Whether the tokenizer's chat_template renders the probe conversation exactly like ``template``."""
    tokenizer = enc.tokenizer
    if uses_jinja(template) or not getattr(tokenizer, "chat_template", None):
        return False, "" if uses_jinja(template) else "no tokenizer chat_template to compare with"
    probe = PROBE
    try:
        theirs = template_ids(tokenizer, probe)
    except Exception:  # a Jinja template may refuse a system turn (Gemma's): probe without it
        probe = PROBE[1:]
        try:
            theirs = template_ids(tokenizer, probe)
        except Exception as err:
            return False, f"the tokenizer's chat_template cannot render the probe conversation ({err})"
    ours = _ours(probe, enc, template)
    if ours == theirs:
        return True, ""
    return False, first_difference(ours, theirs, tokenizer)


def _expected_runs(messages: list[dict], template: ChatTemplate, masking: str, train_eot: bool,
                   train_reasoning: bool = True) -> list[str]:
    """The text each run of trained tokens must decode to: what the template writes for each trained answer."""
    kinds = {"content"} | ({"eot"} if train_eot else set()) | ({"reasoning"} if train_reasoning else set())
    runs: dict[int, str] = {}
    for p in render_pieces(messages, template):
        if p.role == "assistant" and p.kind in kinds:
            runs[p.message] = runs.get(p.message, "") + p.text
    answers = [runs[i] for i in sorted(runs) if runs[i]]
    return answers[-1:] if masking == "last_turn" else answers


def same_text(got: str, want: str) -> bool:
    """A decoded run equals the text, up to whitespace at its edges that a tokenizer absorbs (SentencePiece
    drops the space opening a decode; Phi-3's chat tokens swallow the whitespace after them)."""
    return got == want or got.strip() == want.strip()


def trained_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    """Maximal runs of consecutive trained tokens (one per trained assistant turn)."""
    runs: list[list[int]] = []
    prev = False
    for tok, label in zip(ids, labels):
        if label != IGNORE:
            if not prev:
                runs.append([])
            runs[-1].append(tok)
        prev = label != IGNORE
    return runs


def _checkable(example: dict) -> bool:
    """Plain chats only: tools and tool calls render per template and are checked by the template tests."""
    messages = example.get("messages")
    return bool(messages) and not example.get("tools") and all(
        m["role"] in ("system", "user", "assistant") and not m.get("tool_calls") for m in messages)


def check_example(example: dict, ids: list[int], labels: list[int], enc: TextEncoder, template: ChatTemplate,
                  masking: str, train_eot: bool, compare: bool, train_reasoning: bool = True) -> str | None:
    """The first failed check of one encoded example, or None."""
    tokenizer = enc.tokenizer
    messages = example["messages"]
    if compare:
        theirs = template_ids(tokenizer, messages)
        if list(ids) != theirs:
            return ("the built-in template and the tokenizer's chat_template render it differently: "
                    + first_difference(list(ids), theirs, tokenizer))
    if masking == "all_tokens":
        return None
    # each run on its own: sentencepiece tokenizers drop the space that opens a decoded sequence
    got = [tokenizer.decode(run, clean_up_tokenization_spaces=False) for run in trained_runs(ids, labels)]
    want = _expected_runs(messages, template, masking, train_eot, train_reasoning)
    if len(got) != len(want) or not all(same_text(g, w) for g, w in zip(got, want)):
        return f"the trained tokens decode to {str(got)[:300]}, expected the assistant contents {str(want)[:300]}"
    return None


def not_same_note(template_name: str, why: str) -> str:
    """The note printed when the tokenizer carries another template than the built-in one."""
    return (f"self-check: the tokenizer's chat_template is not the built-in {template_name!r} ({why}); training "
            f"uses the built-in (template=tokenizer would use the tokenizer's)")


def check_source(name: str, samples: list[tuple[int, dict, list[int], list[int]]], enc: TextEncoder,
                 template: Renderer, masking: str, train_eot: bool, compare: bool,
                 train_reasoning: bool = True) -> None:
    """Run the checks on (row, example, input_ids, labels) samples of a source; UserError naming the source
    and row on the first failure. ``compare``: the tokenizer carries the same template (``same_template``)."""
    if uses_jinja(template):
        return
    for row, example, ids, labels in samples:
        if not _checkable(example):
            continue
        failure = check_example(example, ids, labels, enc, template, masking, train_eot, compare, train_reasoning)
        if failure:
            raise UserError(f"self-check failed: data source {name!r} row {row} (template={template.name}, "
                             f"masking={masking}): {failure}")
