"""Replay: mix pretraining-style text into SFT at a fixed share of the tokens trained on.

The share counts real tokens in the planned rows (compute spent), not only supervised
ones: replay text is trained on every token, SFT chats mostly on the assistant turns."""

from __future__ import annotations

from typing import Any

from keel.data.pipeline import mean_lengths
from keel.errors import UserError
from keel.mitigation.base import Mitigation


def replay_weight(weights: list[float], mean_tokens: list[float], replay_tokens: float, ratio: float) -> float:
    """Example-level weight p_r giving the replay source ``ratio`` of the expected tokens.

    With SFT weights p_k (summing to 1) and mean example lengths t_k, the expected token
    share of replay at example weight p_r is p_r·t_r / (p_r·t_r + (1−p_r)·Σ p_k t_k); solving
    for p_r gives p_r = r·T / (t_r·(1−r) + r·T) with T = Σ p_k t_k.
    """
    sft = sum(w * t for w, t in zip(weights, mean_tokens))
    return ratio * sft / (replay_tokens * (1 - ratio) + ratio * sft)


class Replay(Mitigation):
    name = "replay"
    shapes_rows = True

    def extra_sources(self) -> list[Any]:
        return [self.options.source]

    def adjust_weights(self, weights: list[float], sources: list[Any]) -> list[float]:
        """``weights`` cover the SFT sources; the replay source is the last of ``sources``."""
        means = mean_lengths(sources)
        if not sources[-1].input_ids:
            raise UserError("mitigation.replay.source has no usable examples (see rejects.jsonl)")
        p_r = replay_weight(weights, means[:-1], means[-1], self.options.ratio)
        return [w * (1 - p_r) for w in weights] + [p_r]

    def check_data(self, report: dict) -> list[str]:
        src = report["sources"][self.options.source.name]
        share = src["tokens"] / max(1, sum(s["tokens"] for s in report["sources"].values()))
        report["replay_token_share"] = share
        msg = f"replay: {share:.2%} of the tokens in the planned rows (target {self.options.ratio:.2%})"
        if "schedule" in report:  # the overall share then averages a changing mixture
            last = report["schedule"]["segments"][-1]["token_share"][self.options.source.name]
            msg += f", {last:.2%} in the last segment of the mixture schedule"
        print(msg)
        return []
