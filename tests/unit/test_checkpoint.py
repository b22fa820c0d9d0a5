"""Checkpoint manifests catch truncated or altered files; incomplete writes are never picked."""

from __future__ import annotations

import json

import pytest
from keel.train import checkpoint as ckpt
from keel.train import resume

from tests.conftest import compose


def _fake(run_dir, step, complete=True):
    d = ckpt.root(run_dir) / (f"step_{step:06d}" if complete else f".tmp-step_{step:06d}")
    d.mkdir(parents=True)
    (d / "shard.pt").write_bytes(b"x" * 100)
    (d / ckpt.STATE).write_text(json.dumps({"step": step}))
    if complete:
        ckpt.write_manifest(d)
    return d


def test_newest_complete_checkpoint_wins(tmp_path):
    _fake(tmp_path, 2)
    _fake(tmp_path, 10)
    _fake(tmp_path, 12, complete=False)  # crashed mid-write
    assert [p.name for p in ckpt.complete(tmp_path)] == ["step_000002", "step_000010"]
    assert ckpt.state(resume.choose(tmp_path))["step"] == 10


def test_corrupt_newest_fails_or_falls_back(tmp_path):
    _fake(tmp_path, 2)
    newest = _fake(tmp_path, 4)
    (newest / "shard.pt").write_bytes(b"z" * 100)  # same size: only hashing sees it, on the rank that loads it
    assert resume.choose(tmp_path).name == "step_000004"  # the driver checks structure and sizes only
    with pytest.raises(ckpt.CheckpointCorruption, match="step_000004"):
        resume.choose(tmp_path, rank=0, world=1)
    assert resume.choose(tmp_path, fallback="previous", rank=0, world=1).name == "step_000002"
    (newest / "shard.pt").write_bytes(b"z" * 99)  # a truncation the driver sees without reading content
    with pytest.raises(ckpt.CheckpointCorruption, match="shard.pt is truncated"):
        resume.choose(tmp_path)


def test_resume_refuses_changed_fingerprints():
    from keel.train.resume import check_resumable

    saved = {"step": 2, "data_fingerprint": "aa", "micro_batch_size": 2, "template": "llama3"}
    check_resumable(saved, {"data_fingerprint": "aa", "micro_batch_size": 2, "template": "llama3"}, [])
    with pytest.raises(ValueError, match="micro_batch_size"):
        check_resumable(saved, {"data_fingerprint": "aa", "micro_batch_size": 4, "template": "llama3"}, [])
    check_resumable(saved, {"data_fingerprint": "bb", "micro_batch_size": 2, "template": "llama3"},
                    ["data_fingerprint"])


def test_resume_refuses_other_lora_adapters(tokenizer):
    """A LoRA checkpoint holds adapters of one shape: a resume with another r (or LoRA switched on) is refused."""
    import numpy as np
    from keel.data.pipeline import RowPlan
    from keel.train.resume import check_resumable, run_meta

    def meta(*overrides):
        cfg = compose(*overrides)
        rows = RowPlan(*(np.zeros((1, 4), np.int32) for _ in range(5)), source_names=[], report={})
        return json.loads(json.dumps(run_meta(cfg, rows, tokenizer)))  # as a checkpoint stores it

    saved = meta("mitigation=lora")
    check_resumable(saved, meta("mitigation=lora", "mitigation.lora.merge_export=false"), [])  # export only
    for other in (meta("mitigation=lora", "mitigation.lora.r=8"), meta()):
        with pytest.raises(ValueError, match="lora changed since the checkpoint"):
            check_resumable(saved, other, [])
    check_resumable(saved, meta("mitigation=lora", "mitigation.lora.r=8"), ["lora"])


def test_truncated_or_altered_shards_are_caught(tmp_path):
    d = _fake(tmp_path, 4)
    ckpt.verify(d)
    (d / "shard.pt").write_bytes(b"x" * 99)
    with pytest.raises(ckpt.CheckpointCorruption, match="shard.pt"):
        ckpt.verify(d)
    (d / "shard.pt").write_bytes(b"y" * 100)
    with pytest.raises(ckpt.CheckpointCorruption, match="checksum"):
        ckpt.verify(d)
    (d / "shard.pt").unlink()
    with pytest.raises(ckpt.CheckpointCorruption, match="missing"):
        ckpt.verify(d)


def test_prune_keeps_the_newest(tmp_path):
    for s in (2, 4, 6):
        _fake(tmp_path, s)
    ckpt._prune(tmp_path, keep=1)
    assert [p.name for p in ckpt.complete(tmp_path)] == ["step_000006"]


def test_corruption_found_by_a_rank_is_reported_as_a_user_error():
    """Ray Train reports a worker's CheckpointCorruption inside its own error: the driver names the file and the fix."""
    from keel.train.resume import corruption_in

    worker = RuntimeError("Traceback (most recent call last):\n  ...\nkeel.train.integrity.CheckpointCorruption: "
                          "checkpoint /r/checkpoints/step_000004: x.pt is truncated or altered (checksum mismatch)\n")
    try:
        try:
            raise worker
        except RuntimeError as err:
            raise RuntimeError("Training failed due to worker errors") from err
    except RuntimeError as reported:
        assert corruption_in(reported) == "checkpoint /r/checkpoints/step_000004: x.pt is truncated or altered " \
                                          "(checksum mismatch)"
    assert corruption_in(ValueError("something else")) is None
