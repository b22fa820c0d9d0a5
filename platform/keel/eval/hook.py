"""In-training evaluation (``eval.every_n_steps``): forgetting perplexity, a small pass@k, diversity, samples.

Every data-parallel worker runs it at the same steps (step 0 for the baseline, every n steps, and
the last step), because under ZeRO-3 each forward pass gathers parameter shards from all ranks;
rank 0 logs the result.

- ``forgetting/``: token-weighted perplexity on ``eval.forgetting.source`` (by default held-out
  demo text, i.e. the pretraining distribution of ``model=tiny``), encoded like a training
  source (same template, masking and length policy). The examples are split over the ranks and
  the NLL sums all-reduced. ``forgetting/ppl_rise`` is relative to the first evaluation.
- ``eval/pass@k``: ``passk.n`` sampled completions per prompt, prompts rendered with the
  training template, scored by ``passk.checker``, unbiased estimator (``keel.eval.pass_at_k``);
  ``eval/could_not_run`` counts samples the python checker's sandbox stopped (counted as failures).
  Prompts are split over the ranks; with several ZeRO-3 ranks ``generate`` runs with
  ``synced_gpus`` so a rank that finishes early keeps serving its shards.
- ``eval/diversity/``: distinct-n, repeated 4-gram rate, mean predictive entropy and length of
  those samples; ``eval/generations``: a table of the first ``generations`` prompts with one
  completion each and its score.

Generation swaps the model to standard SDPA attention with a KV cache (the packed backends
need rows whose ``position_ids`` restart per example) and back. Every rank's RNG state is
restored afterwards, so a run trains the same with or without evaluation.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from keel.config import KeelConfig
from keel.core.collectives import all_gather, all_reduce_sum
from keel.core.loss import token_loss_sum
from keel.data.encoding import TextEncoder
from keel.data.masking import IGNORE
from keel.data.template import end_of_turn_ids, from_config, generation_prompt
from keel.errors import ConfigError, UserError
from keel.eval import checkers
from keel.eval.diversity import COLLAPSE_METRICS, diversity_report, mode_collapse_warnings
from keel.eval.generate import Prompt, SamplingConfig, sample_batch, stop_ids
from keel.eval.passk import pass_at_k_report


@dataclass
class EvalSets:
    """What every rank evaluates: encoded forgetting examples and rendered pass@k prompts."""

    sequences: list[tuple[np.ndarray, np.ndarray]]  # (input_ids, shifted targets)
    prompts: list[Prompt]
    prompt_ids: list[list[int]]
    rejected: list[dict] = dataclasses.field(default_factory=list)  # forgetting examples not usable
    eot_ids: list[int] = dataclasses.field(default_factory=list)  # the template's end of an assistant turn


def due(step: int, every: int, max_steps: int) -> bool:
    """Whether optimizer step ``step`` (0 = before training) is an evaluation point."""
    return every > 0 and (step % every == 0 or step == max_steps)


def forgetting_sequences(cfg: KeelConfig, enc: TextEncoder) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[dict]]:
    """``eval.forgetting.source`` encoded like a training source (demo data from the held-out seed), and
    the rejected rows."""
    from keel.data.pipeline import load_source
    from keel.eval.diagnose import HELDOUT_SEED

    src = cfg.eval.forgetting.source
    held_out = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seed=HELDOUT_SEED))
    data = load_source(src, held_out if src.kind == "demo" else cfg, enc)
    if not data.input_ids:
        raise ConfigError(f"config error: eval.forgetting.source has no usable examples ({len(data.rejects)} "
                         f"rejected, e.g. {data.rejects[0]['reason'] if data.rejects else 'none read'})")
    return list(zip(data.input_ids, data.targets)), data.rejects


def passk_prompts(cfg: KeelConfig) -> list[Prompt]:
    """``eval.passk.prompts`` prompts with references: a data file's, or held-out demo arithmetic questions."""
    p = cfg.eval.passk
    if p.data is None:
        from keel.eval.diagnose import demo_probe

        return [Prompt(item.messages, item.reference) for item in demo_probe(p.prompts)]
    from keel.eval.generate import load_prompts

    try:
        return load_prompts(p.data, p.format, p.prompts)[0]
    except UserError as err:
        raise ConfigError(f"config error: eval.passk.data: {err}") from None


def load_sets(cfg: KeelConfig, tokenizer: Any) -> EvalSets:
    """The evaluation sets (the same on every rank: built from the config alone)."""
    from keel.data.pipeline import chat_messages

    enc = TextEncoder(tokenizer)
    template = from_config(cfg.template)
    prompts = passk_prompts(cfg) if "passk" in cfg.eval.tasks else []
    ids = [generation_prompt(chat_messages({"messages": p.messages}, cfg), enc, template) for p in prompts]
    sequences, rejected = forgetting_sequences(cfg, enc) if "forgetting" in cfg.eval.tasks else ([], [])
    return EvalSets(sequences, prompts, ids, rejected, end_of_turn_ids(enc, template))


def _mine(count: int, rank: int, world: int) -> tuple[list[int], int]:
    """This rank's indices (``rank::world``) and the number of rounds every rank runs."""
    return list(range(rank, count, world)), math.ceil(count / world)


def forgetting(model: Any, sequences: list[tuple[np.ndarray, np.ndarray]], rank: int, world: int) -> dict:
    """Token-weighted perplexity over the sequences, split over the ranks (each forward is a collective)."""
    mine, rounds = _mine(len(sequences), rank, world)
    total, count = 0.0, 0
    for r in range(rounds):
        real = r < len(mine)
        ids, targets = sequences[mine[r] if real else 0]  # a spare rank still joins the gathers
        device = next(model.parameters()).device  # ZeRO-3: where the partitions live, as the forward needs
        x = torch.as_tensor(ids, dtype=torch.long, device=device).unsqueeze(0)
        y = torch.as_tensor(targets, dtype=torch.long, device=device).unsqueeze(0)
        logits = model(input_ids=x, position_ids=torch.arange(x.shape[1], device=device).unsqueeze(0)).logits
        if real:
            total += float(token_loss_sum(logits, y))
            count += int((y != IGNORE).sum())
    total, count = all_reduce_sum([total, float(count)])
    nll = total / max(count, 1.0)
    return {"forgetting/ppl": math.exp(nll), "forgetting/nll": nll, "forgetting/tokens": int(count)}


@contextmanager
def generation_attention(model: Any) -> Iterator[None]:
    """Standard SDPA attention (padding mask, KV cache) for ``generate``; the packed backend afterwards."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT wraps the model
    packed = base.config._attn_implementation
    base.set_attn_implementation("sdpa" if base._supports_sdpa else "eager")  # Gemma 2 has no SDPA (softcapping)
    try:
        yield
    finally:
        base.set_attn_implementation(packed)


def sample(model: Any, tokenizer: Any, sets: EvalSets, cfg: KeelConfig, rank: int, world: int, seed: int) -> list:
    """(prompt index, samples) for this rank's prompts; every rank makes the same number of generate calls."""
    p, size = cfg.eval.passk, cfg.eval.batch_size
    sampling = SamplingConfig(n=p.n, temperature=p.temperature, top_p=p.top_p, max_new_tokens=p.max_new_tokens)
    stops = stop_ids(model, tokenizer) + sets.eot_ids
    mine, rounds = _mine(len(sets.prompts), rank, world)
    padded = mine + [0] * (rounds - len(mine))
    torch.manual_seed(seed)
    out: list = []
    for start in range(0, rounds, size):
        batch = padded[start : start + size]
        groups = sample_batch(model, tokenizer, [sets.prompt_ids[i] for i in batch], sampling, sorted(set(stops)),
                              synced_gpus=world > 1 and cfg.deepspeed.stage == 3)
        out += [(i, g) for j, (i, g) in enumerate(zip(batch, groups)) if start + j < len(mine)]
    return out


def score(sets: EvalSets, gathered: list, cfg: KeelConfig) -> tuple[dict, list[dict]]:
    """pass@k, diversity and the generations table from every rank's samples."""
    by_prompt = dict(pair for part in gathered for pair in part)
    check = checkers.get(cfg.eval.passk.checker, cfg.eval.passk.allow_code_execution)
    results, texts, entropies, table, unrun = [], [], [], [], 0
    for i, prompt in enumerate(sets.prompts):
        samples = by_prompt[i]
        outcomes = [checkers.outcome(check, s.text, prompt.reference) for s in samples]
        ok = [o.passed for o in outcomes]
        unrun += sum(o.status == "could_not_run" for o in outcomes)  # counted as not passing, reported apart
        results.append((len(ok), sum(ok)))
        texts += [s.text for s in samples]
        entropies += [e for s in samples for e in s.entropies]
        if i < cfg.eval.generations:
            table.append({"prompt": prompt.messages[-1]["content"], "completion": samples[0].text, "score": ok[0]})
    row = {f"eval/pass@{k}": v["mean"] for k, v in pass_at_k_report(results, cfg.eval.passk.k).items()}
    row["eval/could_not_run"] = unrun
    div = diversity_report(texts, entropies)
    row.update({f"eval/diversity/{k}": div[k] for k in ("distinct_1", "distinct_2", "distinct_3",
                                                          "repeated_4gram_rate", "mean_entropy")})
    row["eval/diversity/mean_length_words"] = div["length_words"]["mean"]
    return row, table


@contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    """No dropout, no autograd, and every RNG stream as it was: training does not see the evaluation."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            yield
    finally:
        model.train(was_training)


def evaluate(model: Any, tokenizer: Any, sets: EvalSets, cfg: KeelConfig, step: int, rank: int,
             world: int) -> tuple[dict, list[dict]] | None:
    """One evaluation on every rank; rank 0 gets (metrics row, generations table), the others None."""
    start, tasks = time.perf_counter(), cfg.eval.tasks
    row, mine = {}, []
    with _eval_mode(model):
        if "forgetting" in tasks:
            row = forgetting(model, sets.sequences, rank, world)
        if "passk" in tasks:
            with generation_attention(model):
                mine = sample(model, tokenizer, sets, cfg, rank, world,
                              seed=cfg.trainer.seed * 1_000_003 + step * 101 + rank)
    gathered = all_gather(mine) if "passk" in tasks else []
    if rank != 0:
        return None
    metrics, table = score(sets, gathered, cfg) if "passk" in tasks else ({}, [])
    return {"step": step, **row, **metrics, "eval/seconds": time.perf_counter() - start}, table


def warnings(row: dict, baseline: dict | None, cfg: KeelConfig) -> list[str]:
    """Forgetting-spike and mode-collapse warnings against the first evaluation of the run."""
    if baseline is None or baseline is row:
        return []
    out = []
    rise = row["forgetting/ppl"] / baseline["forgetting/ppl"] - 1 if "forgetting/ppl" in row else 0.0
    if rise > cfg.eval.forgetting.spike:
        out.append(f"forgetting: held-out pretraining perplexity rose {rise:.0%} since step {baseline['step']} "
                   f"({baseline['forgetting/ppl']:.4g} -> {row['forgetting/ppl']:.4g}; eval.forgetting.spike="
                   f"{cfg.eval.forgetting.spike}); consider mitigation=replay (see keel diagnose)")
    now = {k: row.get(f"eval/diversity/{k}") for k in COLLAPSE_METRICS}
    then = {k: baseline.get(f"eval/diversity/{k}") for k in COLLAPSE_METRICS}
    out += mode_collapse_warnings(now, then, cfg.eval.collapse_drop)
    return out


def with_rise(row: dict, baseline: dict | None) -> dict:
    """The row with ``forgetting/ppl_rise`` (relative to the baseline; 0 for the baseline itself), when the row
    has a perplexity."""
    if "forgetting/ppl" not in row:
        return row
    base = baseline["forgetting/ppl"] if baseline else row["forgetting/ppl"]
    return {**row, "forgetting/ppl_rise": row["forgetting/ppl"] / base - 1}
