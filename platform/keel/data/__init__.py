"""Data path: sources -> formats -> template -> masking -> mixing -> packing -> rank bundles.

- ``sources`` reads rows (files, globs, Hugging Face datasets); ``formats`` makes them canonical examples;
  ``demo`` generates the built-in synthetic ones.
- ``template`` (built-in chat templates, and the one place a template is chosen), ``hf_template``
  (``template=tokenizer|jinja``) and ``encoding`` (rendered pieces to token ids) render them;
  ``masking`` labels the trained tokens; ``examples`` does all of it for one row; ``selfcheck``
  checks a sample at start-up.
- ``mixing`` weighs and samples sources, ``packing`` fills rows, ``pipeline`` builds the run's packed
  row plan, ``rank_bundles`` deals each optimizer step's rows out to the ranks.
- ``keel preprocess`` keeps its working columns in ``disk_columns``, writes ``parquet_rows``, and
  ``preprocessed_dir`` reads such a directory back for ``data.preprocessed=DIR``.
- ``inspect`` renders examples for ``keel inspect``.

Nothing in this package imports Ray, DeepSpeed or torch.distributed.
"""

from __future__ import annotations

from typing import Any

from keel.data.encoding import TextEncoder
from keel.data.masking import Encoded, apply_mask
from keel.data.sources import load_conversations
from keel.data.template import get_template, render_chat, render_text
from keel.errors import UserError

__all__ = ["Encoded", "encode", "load_conversations"]


def encode(messages: list[dict] | str, tokenizer: Any, template: str = "llama3",
           masking: str = "assistant_only", train_eot: bool = True, tools: list | None = None,
           train_reasoning: bool = True, template_path: str | None = None) -> Encoded:
    """Render a conversation (or plain text) and mask it in one pass (``template="jinja"`` renders the
    Jinja chat template in the file ``template_path``)."""
    enc = tokenizer if isinstance(tokenizer, TextEncoder) else TextEncoder(tokenizer)
    tpl = get_template(template, template_path)
    if isinstance(messages, str):
        segs = render_text(messages, enc, tpl, tokenizer_eos(tokenizer))
    else:
        segs = render_chat(messages, enc, tpl, tools)
    return apply_mask(segs, masking, train_eot, train_reasoning)


def tokenizer_eos(tokenizer: Any) -> str:
    tok = tokenizer._tok if isinstance(tokenizer, TextEncoder) else tokenizer
    if tok.eos_token is None:
        raise UserError("tokenizer has no eos_token; plain-text sources need one")
    return tok.eos_token
