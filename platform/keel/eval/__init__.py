"""Evaluation: pass@k, answer checkers and diversity metrics (stdlib only, so importing is cheap).

Torch-using parts are imported on demand: ``keel.eval.generate`` (sampling), ``keel.eval.perplexity``
and ``keel.eval.report`` (the ``keel eval passk`` report).
"""

from keel.eval import checkers
from keel.eval.diversity import (
    distinct_n,
    diversity_report,
    length_stats,
    mode_collapse_warnings,
    repeated_ngram_rate,
)
from keel.eval.passk import pass_at_k, pass_at_k_report, rl_viability

__all__ = ["checkers", "distinct_n", "diversity_report", "length_stats", "mode_collapse_warnings", "pass_at_k",
           "pass_at_k_report", "repeated_ngram_rate", "rl_viability"]
