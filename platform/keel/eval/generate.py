"""Sampling for pass@k: prompts from a data file, n completions each, with per-token entropy.

``keel eval passk`` and ``keel diagnose`` generate on one process from a consolidated Hugging Face
model directory (e.g. a Keel run's ``outputs/.../hf``); during training, ``keel.eval.hook`` samples
from the multi-worker ZeRO-3 model itself with the same :func:`sample_batch` (``synced_gpus``).
Prompts are rendered with the tokenizer's own chat template (``add_generation_prompt=True``),
left-padded into batches, and sampled with ``model.generate``. Per-token predictive entropy is
recorded on the fly by a logits processor (which in transformers runs before the temperature
and top-p warpers, so it is the entropy of the model's own next-token distribution), keeping
memory at one step's logits instead of ``output_scores``' batch x steps x vocab.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from keel.data.sources import Reject, iter_rows
from keel.errors import UserError


@dataclass
class Prompt:
    """A prompt (all turns before the last assistant turn) and its reference answer."""

    messages: list[dict]
    reference: str


@dataclass
class Sample:
    """One sampled completion: decoded text, generated token count and per-token entropies."""

    text: str
    num_tokens: int
    entropies: list[float] = field(default_factory=list)


# ---------------------------------------------------------------- prompts


def split_example(example: dict) -> Prompt | None:
    """Prompt = turns before the last assistant turn; reference = its content. None if unusable."""
    messages = example.get("messages")
    if not messages:
        return None  # plain-text rows have no prompt/answer split
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    reference = messages[last].get("content") if last > 0 else None
    if not isinstance(reference, str) or not reference.strip():
        return None
    prompt = [{"role": m["role"], "content": m.get("content") or ""} for m in messages[:last]]
    return Prompt(prompt, reference)


def load_prompts(path: str, format: str = "auto", limit: int | None = None) -> tuple[list[Prompt], int]:
    """(prompts, number of rows skipped) from a data file; UserError if none is usable."""
    prompts: list[Prompt] = []
    skipped = 0
    for _, _, row in iter_rows(path, format):
        prompt = None if isinstance(row, Reject) else split_example(row)
        if prompt is None:
            skipped += 1
            continue
        prompts.append(prompt)
        if limit is not None and len(prompts) >= limit:
            break
    if not prompts:
        raise UserError(f"{path}: no usable prompts ({skipped} rows skipped: rejected, plain text, or no "
                         "assistant answer after a prompt)")
    return prompts, skipped


def prompt_ids(tokenizer: Any, messages: list[dict]) -> list[int]:
    """Token ids of a prompt rendered with the tokenizer's chat template, ready for the reply."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("the tokenizer has no chat_template; pass a model dir whose tokenizer defines one")
    from keel.data.hf_template import template_ids

    return template_ids(tokenizer, messages, generation_prompt=True)


# ---------------------------------------------------------------- model


def load_eval_model(path: str, device: str = "auto") -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) from an HF dir; bf16 on a capable GPU, else float32."""
    import torch
    from transformers import AutoModelForCausalLM

    from keel.model.build import load_tokenizer

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    use_bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()
    tokenizer = load_tokenizer(path, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.bfloat16 if use_bf16 else torch.float32, trust_remote_code=False)
    return model.to(device).eval(), tokenizer


def stop_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every end-of-sequence id the model's generation config or the tokenizer declares."""
    ids: list[int] = []
    for source in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        for i in source if isinstance(source, list | tuple) else [source]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    if not ids:
        raise UserError("the model declares no eos token id; generation would never stop")
    return ids


# ---------------------------------------------------------------- sampling


class EntropyRecorder:
    """Logits processor that records each step's entropy of softmax(scores) and passes scores on."""

    def __init__(self) -> None:
        self.steps: list[Any] = []

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        """Record one (rows,) entropy tensor; return the scores unchanged."""
        import torch

        logp = torch.log_softmax(scores.float(), dim=-1)
        self.steps.append(torch.special.entr(logp.exp()).sum(-1).cpu())
        return scores


def _left_pad(batch: Sequence[list[int]], pad_id: int, device: Any) -> tuple[Any, Any]:
    """Left-padded input_ids and attention_mask tensors."""
    import torch

    width = max(len(x) for x in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, x in enumerate(batch):
        ids[row, width - len(x) :] = torch.tensor(x)
        mask[row, width - len(x) :] = 1
    return ids.to(device), mask.to(device)


def _valid_length(tokens: list[int], stops: set[int]) -> int:
    """Generated steps up to and including the first stop token (the rest is padding)."""
    for i, t in enumerate(tokens):
        if t in stops:
            return i + 1
    return len(tokens)


def _samples(tokenizer: Any, new_tokens: Any, entropy: Any, stops: list[int]) -> list[Sample]:
    """Decode each generated row, cut at its first stop token, with that row's entropies."""
    out = []
    for row, tokens in enumerate(new_tokens.tolist()):
        length = _valid_length(tokens, set(stops))
        ended = length > 0 and tokens[length - 1] in stops
        text = tokenizer.decode(tokens[: length - 1 if ended else length], skip_special_tokens=True)
        out.append(Sample(text, length, entropy[row, :length].tolist()))
    return out


@dataclass
class SamplingConfig:
    """Sampling settings for :func:`sample_prompts`."""

    n: int = 8
    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int = 256
    batch_size: int = 16
    seed: int = 0


def sample_batch(model: Any, tokenizer: Any, batch: Sequence[list[int]], cfg: SamplingConfig,
                 stops: list[int], synced_gpus: bool = False) -> list[list[Sample]]:
    """n samples for each prompt (token ids) of one batch; ``synced_gpus``: ZeRO-3 ranks keep stepping
    until every rank is done (each forward gathers parameter shards from all of them)."""
    import torch
    from transformers import LogitsProcessorList

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    ids, mask = _left_pad(batch, pad_id, model.device)
    recorder = EntropyRecorder()
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=mask, do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p,
            num_return_sequences=cfg.n, max_new_tokens=cfg.max_new_tokens, pad_token_id=pad_id,
            eos_token_id=stops, logits_processor=LogitsProcessorList([recorder]), return_dict_in_generate=True,
            synced_gpus=synced_gpus)
    new_tokens = out.sequences[:, ids.shape[1] :].cpu()
    entropy = torch.stack(recorder.steps, dim=1) if recorder.steps else torch.zeros((len(new_tokens), 0))
    flat = _samples(tokenizer, new_tokens, entropy, stops)
    # generate returns the n samples of each prompt next to each other
    return [flat[i * cfg.n : (i + 1) * cfg.n] for i in range(len(batch))]


def check_sampling(cfg: SamplingConfig) -> None:
    """Raise UserError on sampling settings generate would reject or misread."""
    if cfg.n < 1 or cfg.batch_size < 1 or cfg.max_new_tokens < 1:
        raise UserError(f"n, batch_size and max_new_tokens must be >= 1, got {cfg.n}, {cfg.batch_size}, "
                         f"{cfg.max_new_tokens}")
    if cfg.temperature <= 0:
        raise UserError(f"temperature must be > 0 for sampling, got {cfg.temperature}")
    if not 0.0 < cfg.top_p <= 1.0:
        raise UserError(f"top_p must be in (0, 1], got {cfg.top_p}")


def sample_prompts(model: Any, tokenizer: Any, prompts: Sequence[Prompt], cfg: SamplingConfig,
                   progress: Any = None) -> list[list[Sample]]:
    """n samples per prompt, in batches of ``cfg.batch_size`` prompts, seeded by ``cfg.seed``."""
    import torch

    check_sampling(cfg)
    stops = stop_ids(model, tokenizer)
    encoded = [prompt_ids(tokenizer, p.messages) for p in prompts]
    torch.manual_seed(cfg.seed)
    results: list[list[Sample]] = []
    for start in range(0, len(encoded), cfg.batch_size):
        results += sample_batch(model, tokenizer, encoded[start : start + cfg.batch_size], cfg, stops)
        if progress is not None:
            progress(len(results), len(encoded))
    return results
