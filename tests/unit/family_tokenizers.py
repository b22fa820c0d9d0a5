"""Tokenizers with each model family's real pipeline and a vocabulary trained locally (no hub).

Token-exactness of a chat template depends on how the family's tokenizer cuts and merges text,
not on its vocabulary: byte-level BPE behind a regex split (Llama 3, Qwen2.5/3: NFC first), and
SentencePiece-style BPE with byte fallback that prepends "▁" at the start of the input only
(Mistral v0.3: Metaspace, prepend_scheme first, one piece per gap), before every gap between added
tokens (Phi-3: Prepend + Replace normalizers; its chat tokens strip the whitespace after them) or
never (Gemma 2: Replace only; runs of newlines are added tokens). Each builder below reproduces its
family's tokenizer.json pipeline (normalizer, pre-tokenizer, added tokens and their flags, decoder)
as the published files define it; the vocabulary is trained here on Keel's demo corpus.
"""

from __future__ import annotations

import functools
import json

from keel.data import demo
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
EXTRA = ["Grüße aus Köln! ¿Qué tal? 東京は晴れ。 Привет, мир. 🙂👍 naïve café — “quotes” …",
         "  leading spaces\n\n\ttabs\tand\r\nwindows newlines  ", "x = [1, 2, 3]\nprint(sum(x))\n\n\n"]


def _corpus() -> list[str]:
    return list(demo.corpus(seed=0, per_task=600)) + EXTRA * 50


def _byte_level(split: str, specials: list[str], normalizer=None) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1200, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    return tok


@functools.lru_cache(maxsize=1)
def _spm_vocab() -> str:
    """A SentencePiece-style BPE vocabulary (words start with "▁") plus the 256 byte-fallback tokens."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=1200, special_tokens=["<unk>"], show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    data["model"].update(byte_fallback=True, fuse_unk=True)
    data["pre_tokenizer"] = None
    return json.dumps(data)


def _spm(specials: list[str], rstrip: tuple[str, ...] = (), plain: list[str] = ()) -> Tokenizer:
    tok = Tokenizer.from_str(_spm_vocab())
    tok.add_special_tokens([AddedToken(t, rstrip=t in rstrip, normalized=False, special=True) for t in specials])
    if plain:
        tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in plain])
    return tok


def _fast(tok: Tokenizer, **names: str) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tok, **names)


def llama3() -> PreTrainedTokenizerFast:
    tok = _byte_level(LLAMA3_SPLIT, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                     "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"])
    return _fast(tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")


def qwen() -> PreTrainedTokenizerFast:
    tok = _byte_level(QWEN_SPLIT, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], normalizers.NFC())
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in
                    ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>")])
    return _fast(tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")


_SPM_DECODE = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]


def mistral() -> PreTrainedTokenizerFast:
    tok = _spm(["<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                "[TOOL_RESULTS]", "[/TOOL_RESULTS]"])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([*_SPM_DECODE, decoders.Strip(" ", 1, 0)])
    return _fast(tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def phi3() -> PreTrainedTokenizerFast:
    chat = ("<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>")
    tok = _spm(["<s>", "</s>", *chat], rstrip=chat)
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([*_SPM_DECODE, decoders.Strip(" ", 1, 0)])
    return _fast(tok, bos_token="<s>", eos_token="<|endoftext|>", unk_token="<unk>")


def gemma() -> PreTrainedTokenizerFast:
    tok = _spm(["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
               plain=["<mask>", *("\n" * k for k in range(1, 32))])
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tok.decoder = decoders.Sequence(_SPM_DECODE)
    return _fast(tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


BUILDERS = {"llama3": llama3, "qwen": qwen, "mistral": mistral, "phi3": phi3, "gemma": gemma}
