"""Model side of ``keel diagnose``: pretraining perplexity, a greedy zero/few-shot probe and sampled diversity.

One model at a time on one process (CUDA if available, else CPU); the rules that read these
numbers are in ``keel.eval.diagnose``.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from keel.eval import checkers
from keel.eval.diagnose import ProbeItem
from keel.eval.diversity import diversity_report
from keel.eval.generate import (
    Prompt,
    SamplingConfig,
    _left_pad,
    _samples,
    load_eval_model,
    prompt_ids,
    sample_prompts,
    stop_ids,
)

NUM_EXAMPLES = 3  # probe items whose completions are copied into diagnosis.json


@dataclass
class Plan:
    """What to measure on each model, built (and validated) before any model is loaded."""

    pretrain: list[dict]
    probe: list[ProbeItem]
    few_shot_prompts: list[list[dict]]
    diversity_prompts: list[list[dict]]
    checker: str = "math"
    template: str = "llama3"
    masking: str = "all_tokens"
    max_len: int = 1024
    batch_size: int = 8
    max_new_tokens: int = 256
    sampling: SamplingConfig = field(default_factory=SamplingConfig)


def greedy(model: Any, tokenizer: Any, conversations: Sequence[list[dict]], max_new_tokens: int,
           batch_size: int) -> list[str]:
    """Greedy completion of each chat prompt (rendered with the tokenizer's chat template)."""
    import torch

    stops = stop_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    texts: list[str] = []
    for start in range(0, len(conversations), batch_size):
        batch = [prompt_ids(tokenizer, m) for m in conversations[start : start + batch_size]]
        ids, mask = _left_pad(batch, pad_id, model.device)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, temperature=None, top_p=None,
                                 top_k=None, max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=stops)
        new = out[:, ids.shape[1] :].cpu()
        texts += [s.text for s in _samples(tokenizer, new, torch.zeros(new.shape), stops)]
    return texts


def _mean(flags: Sequence[bool]) -> float:
    """Fraction of True."""
    return sum(flags) / len(flags)


def probe(model: Any, tokenizer: Any, plan: Plan) -> dict:
    """Zero-shot and few-shot greedy accuracy on the probe items under the plan's checker."""
    check = checkers.get(plan.checker)
    zero = greedy(model, tokenizer, [it.messages for it in plan.probe], plan.max_new_tokens, plan.batch_size)
    few = greedy(model, tokenizer, plan.few_shot_prompts, plan.max_new_tokens, plan.batch_size)
    zero_ok = [bool(check(t, it.reference)) for t, it in zip(zero, plan.probe)]
    few_ok = [bool(check(t, it.reference)) for t, it in zip(few, plan.probe)]
    examples = [{"prompt": it.messages, "reference": it.reference, "zero_shot": z, "few_shot": f}
                for it, z, f in list(zip(plan.probe, zero, few))[:NUM_EXAMPLES]]
    return {"items": len(plan.probe), "zero_shot": _mean(zero_ok), "few_shot": _mean(few_ok),
            "zero_shot_correct": zero_ok, "few_shot_correct": few_ok, "examples": examples}


def diversity(model: Any, tokenizer: Any, plan: Plan) -> dict:
    """Diversity report of ``sampling.n`` sampled completions per open-ended prompt."""
    prompts = [Prompt(m, "") for m in plan.diversity_prompts]
    samples = [s for group in sample_prompts(model, tokenizer, prompts, plan.sampling) for s in group]
    report = diversity_report([s.text for s in samples], [e for s in samples for e in s.entropies])
    report["examples"] = [s.text for s in samples[:NUM_EXAMPLES]]
    return report


def _release() -> None:
    """Collect freed models and give cached GPU memory back before the next model is loaded."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure_loaded(model: Any, tokenizer: Any, plan: Plan, progress: Any = None) -> dict:
    """Perplexity, probe and diversity of a loaded model."""
    from keel.eval.perplexity import perplexity

    say = progress or (lambda _msg: None)
    say("perplexity")
    ppl = perplexity(model, tokenizer, plan.pretrain, plan.template, plan.masking, plan.batch_size, plan.max_len)
    say("probe (zero-shot and few-shot, greedy)")
    scores = probe(model, tokenizer, plan)
    say("diversity (sampled)")
    return {"device": str(model.device), "perplexity": ppl, "probe": scores,
            "diversity": diversity(model, tokenizer, plan)}


def measure(path: str, plan: Plan, device: str = "auto", progress: Any = None) -> dict:
    """Load the model at ``path``, measure it, and free it."""
    start = time.perf_counter()
    model, tokenizer = load_eval_model(path, device)
    result = measure_loaded(model, tokenizer, plan, progress)
    del model, tokenizer
    _release()
    return {"model": path, **result, "seconds": round(time.perf_counter() - start, 2)}
