"""Secrets never reach logged configs; W&B mode follows the environment."""

from __future__ import annotations

from keel.tracking.logger import redact, wandb_mode


def test_redact_keys_and_values(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefghijklmnop")
    cfg = {"logger": {"api_key": "x", "project": "keel"}, "model": {"path": "org/m?token=hf_abcdefghijklmnop"},
           "list": ["hf_abcdefghijklmnop", "ok"], "MY_SECRET_THING": 3}
    out = redact(cfg)
    assert out["logger"] == {"api_key": "<redacted>", "project": "keel"}
    assert out["model"]["path"] == "org/m?token=<redacted>" and out["list"] == ["<redacted>", "ok"]
    assert out["MY_SECRET_THING"] == "<redacted>"
    assert "hf_abcdefghijklmnop" not in repr(out)


def test_wandb_mode(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode("auto") == "disabled" and wandb_mode("offline") == "offline"
