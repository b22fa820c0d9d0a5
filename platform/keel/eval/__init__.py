"""Evaluation: pass@k estimation and answer checkers (stdlib only, so importing is cheap)."""

from keel.eval import checkers
from keel.eval.passk import pass_at_k, pass_at_k_report, rl_viability

__all__ = ["checkers", "pass_at_k", "pass_at_k_report", "rl_viability"]
