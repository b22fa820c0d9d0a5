"""The offline tiny model: a byte-level BPE tokenizer trained locally from the demo
corpus and a random-init Llama-architecture causal LM, cached under the user cache dir.

Built once per shape (a content hash names the cache entry) and written atomically, so
concurrent runs never see a half-written model. Nothing here touches the network.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from keel.data import demo
from keel.data.encoding import SPECIAL_TOKENS

if TYPE_CHECKING:
    from keel.config import TinyModelConfig

CORPUS_VERSION = 1  # bump when the demo corpus or tokenizer recipe changes

# A Llama-3-style Jinja template so apply_chat_template and generation work on the tiny model.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def cache_root() -> Path:
    from platformdirs import user_cache_dir

    return Path(os.environ.get("KEEL_CACHE_DIR") or user_cache_dir("keel"))


def _key(spec: TinyModelConfig) -> str:
    blob = json.dumps({"spec": asdict(spec), "corpus": CORPUS_VERSION, "specials": SPECIAL_TOKENS}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def train_tokenizer(vocab_size: int) -> Any:
    """Train a byte-level BPE tokenizer with the chat templates' special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2,
                                  show_progress=False)
    tok.train_from_iterator(demo.corpus(seed=0, per_task=4000), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                   eos_token="<|end_of_text|>", pad_token="<|pad|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _build(spec: TinyModelConfig, out: Path) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = train_tokenizer(spec.vocab_size)
    stop_ids = tokenizer.convert_tokens_to_ids(["<|eot_id|>", "<|im_end|>", "<|end_of_text|>"])
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads, max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False, rope_theta=10000.0,
    )
    torch.manual_seed(spec.init_seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=stop_ids,
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def ensure_tiny(spec: TinyModelConfig) -> Path:
    """Path of the cached tiny model directory for ``spec``, building it if missing."""
    final = cache_root() / "tiny" / _key(spec)
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=final.parent))
    try:
        _build(spec, tmp)
        try:
            os.replace(tmp, final)
        except OSError:  # another process won the race; its copy is identical
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
