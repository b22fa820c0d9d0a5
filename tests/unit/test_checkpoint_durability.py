"""Durable checkpoints: fsync before the commit, no committed checkpoint deleted before its replacement, stale
temporaries cleaned, each rank's files hashed by that rank as written, each rank's expected files required,
attempts never mixed."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from keel.train import checkpoint as ckpt
from keel.train import integrity, resume


class _TorchEngine:
    """DeepSpeed's TorchCheckpointEngine: ``save(state_dict, path)`` is ``torch.save``."""

    zipfile_serialization = True

    def save(self, state_dict, path):
        torch.save(state_dict, path)


class _Engine:
    """What ckpt.save calls on a DeepSpeed ZeRO engine, writing the files DeepSpeed writes for ``stage``."""

    def __init__(self, rank: int, stage: int = 3, numel: int = 1000) -> None:
        self.rank, self.stage, self.numel = rank, stage, numel
        self.checkpoint_engine = _TorchEngine()

    def zero_optimization_stage(self) -> int:
        return self.stage

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        d = Path(save_dir) / tag
        d.mkdir(parents=True, exist_ok=True)
        sd = {"w": torch.full((self.numel,), float(self.rank)), **client_state}
        if self.stage == 3:
            self.checkpoint_engine.save(sd, str(d / f"zero_pp_rank_{self.rank}_mp_rank_00_model_states.pt"))
        elif self.rank == 0:
            self.checkpoint_engine.save(sd, str(d / "mp_rank_00_model_states.pt"))
        if self.stage > 0:
            self.checkpoint_engine.save(sd, str(d / f"zero_pp_rank_{self.rank}_mp_rank_00_optim_states.pt"))


def _save(run_dir, step, attempt="a1", keep=2, stage=3):
    return ckpt.save(_Engine(0, stage), run_dir, step, 0, keep, {"world_size": 1, "attempt": attempt})


def test_files_and_folders_are_fsynced_before_the_commit(tmp_path, monkeypatch):
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", str(src)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    final = _save(tmp_path, 2)
    commit = max(i for i, e in enumerate(events) if e == ("rename", str(final.parent / ".tmp-step_000002-a1")))
    before = {path for kind, path in events[:commit] if kind == "fsync"}
    tmp = str(final.parent / ".tmp-step_000002-a1")
    for name in os.listdir(final):  # every file (the manifest under its .part name), its folder, before the rename
        assert f"{tmp}/{name}" in before or f"{tmp}/{name}.part" in before, name
    assert tmp in before
    assert ("fsync", str(final.parent)) in events[commit:]


def test_a_committed_checkpoint_survives_a_crash_while_it_is_replaced(tmp_path, monkeypatch):
    _save(tmp_path, 2, attempt="a1")
    real_replace = os.replace

    def crash_on_commit(src, dst):
        if Path(src).name.startswith(".tmp-step_000002"):
            raise OSError("killed between the two renames")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_commit)
    with pytest.raises(OSError, match="killed"):
        _save(tmp_path, 2, attempt="a2")  # the same step again (e.g. after a fallback), by another attempt
    monkeypatch.setattr(os, "replace", real_replace)
    assert ckpt.complete(tmp_path) == []  # step_000002 is set aside, the new one not yet renamed in
    notes = ckpt.clean_stale(tmp_path)  # the next start (under the run directory's lock) finishes the commit
    assert notes == ["restored step_000002 from .tmp-step_000002-a2", "deleted the stale .old-step_000002-a2"]
    chosen = resume.choose(tmp_path, rank=0, world=1)
    assert chosen.name == "step_000002" and ckpt.state(chosen)["attempt"] == "a2"
    ckpt.verify(chosen)


def test_a_set_aside_checkpoint_is_restored_when_its_replacement_is_incomplete(tmp_path):
    _save(tmp_path, 2, attempt="a1")
    r = ckpt.root(tmp_path)
    os.replace(r / "step_000002", r / ".old-step_000002-a2")
    (r / ".tmp-step_000002-a2").mkdir()  # the replacement was still being written
    (r / ".tmp-step_000002-a2" / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"partial")
    assert ckpt.clean_stale(tmp_path) == ["deleted the stale .tmp-step_000002-a2",
                                         "restored step_000002 from .old-step_000002-a2"]
    assert ckpt.state(resume.choose(tmp_path, rank=0, world=1))["attempt"] == "a1"


def test_stale_temporaries_and_orphan_universal_conversions_are_cleaned(tmp_path):
    _save(tmp_path, 2)
    r = ckpt.root(tmp_path)
    for stale in (r / ".tmp-step_000004", r / ".tmp-step_000004-a0", r / "universal" / ".tmp-step_000002",
                  r / "universal" / "step_000001"):
        stale.mkdir(parents=True)
        (stale / "junk.pt").write_bytes(b"x" * 10)
    (r / "universal" / "step_000002").mkdir()  # the conversion of a checkpoint that exists stays
    (r / "universal" / "latest_universal").write_text("step_000001")  # ds_to_universal's pointer file
    notes = ckpt.clean_stale(tmp_path)
    assert sorted(notes) == ["deleted the stale .tmp-step_000004", "deleted the stale .tmp-step_000004-a0",
                             "deleted the stale universal/.tmp-step_000002", "deleted the stale universal/step_000001"]
    assert sorted(p.name for p in r.iterdir()) == ["step_000002", "universal"]
    assert sorted(p.name for p in (r / "universal").iterdir()) == ["latest_universal", "step_000002"]


def test_prune_takes_the_universal_conversion_with_its_checkpoint(tmp_path):
    for step in (2, 4, 6):
        _save(tmp_path, step, keep=10)
        ckpt.universal_dir(ckpt.root(tmp_path) / f"step_{step:06d}").mkdir(parents=True)
    ckpt._prune(tmp_path, keep=1)
    r = ckpt.root(tmp_path)
    assert [p.name for p in ckpt.complete(tmp_path)] == ["step_000006"]
    assert [p.name for p in (r / "universal").iterdir()] == ["step_000006"]


def test_what_a_rank_writes_is_hashed_as_written_never_read_back(tmp_path, monkeypatch):
    def no_reading(path, algorithm=None):
        raise AssertionError(f"{path} was read back to be hashed")

    monkeypatch.setattr(integrity, "file_digest", no_reading)
    final = _save(tmp_path, 2, stage=2)
    m = ckpt.manifest(final)
    assert (m["format"], m["attempt"], m["world_size"], m["zero_stage"]) == (2, "a1", 1, 2)
    assert sorted(m["files"]) == ["keel_state.json", "mp_rank_00_model_states.pt", "rng_rank0.pt",
                                  "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    monkeypatch.undo()
    for rel, meta in m["files"].items():  # the digests taken while writing are those of the files on disk
        assert meta[integrity.ALGORITHM] == integrity.file_digest(final / rel)
        assert meta["size"] == (final / rel).stat().st_size
    assert not list(final.glob(".digest-*"))


def _manifest_of(ckpt_dir: Path, world: int, stage: int, attempt: str = "") -> None:
    state = {"step": 2, "world_size": world, "zero_stage": stage, "attempt": attempt}
    (ckpt_dir / ckpt.STATE).write_text(json.dumps(state))
    ckpt.write_manifest(ckpt_dir, attempt, world, stage)


def _two_rank_files(d: Path, stage: int, skip: str = "") -> None:
    names = ["rng_rank0.pt", "rng_rank1.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
             "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    names += (["zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"]
              if stage == 3 else ["mp_rank_00_model_states.pt"])
    d.mkdir(parents=True)
    for name in names:
        if name != skip:
            (d / name).write_bytes(name.encode())


@pytest.mark.parametrize(("stage", "missing"), [(3, "zero_pp_rank_1_mp_rank_00_model_states.pt"),
                                                (3, "zero_pp_rank_1_mp_rank_00_optim_states.pt"),
                                                (2, "mp_rank_00_model_states.pt"), (1, "rng_rank1.pt")])
def test_each_ranks_expected_files_are_required_not_only_those_listed(tmp_path, stage, missing):
    """A rank that never wrote its file leaves a manifest consistent with the disk: only the expected set for the
    saved world size and ZeRO stage shows the gap."""
    good, bad = tmp_path / "good", tmp_path / "bad"
    _two_rank_files(good, stage)
    _manifest_of(good, 2, stage)
    ckpt.verify(good)
    _two_rank_files(bad, stage, skip=missing)
    _manifest_of(bad, 2, stage)
    rank = integrity.rank_of(missing) or 0
    with pytest.raises(ckpt.CheckpointCorruption, match=f"rank {rank} of 2 \\(ZeRO stage {stage}\\) has no file"):
        ckpt.verify_structure(bad)


def test_states_of_two_attempts_never_pair(tmp_path):
    final = _save(tmp_path, 2, attempt="a1")
    other = _save(tmp_path / "other", 2, attempt="a2")
    shutil.copyfile(other / ckpt.STATE, final / ckpt.STATE)  # a2's state beside a1's weights, sizes equal
    with pytest.raises(ckpt.CheckpointCorruption, match="keel_state.json is from attempt 'a2', its files from 'a1'"):
        ckpt.verify_structure(final)
    tmp = tmp_path / "mixed"
    tmp.mkdir()
    integrity.write_digest(tmp, 0, "a1", {})
    integrity.write_digest(tmp, 1, "a2", {})
    with pytest.raises(RuntimeError, match="rank 1 wrote for attempt a2, rank 0 for a1: two runs"):
        integrity.merge_digests(tmp, 2, "a1")
    (tmp / ".digest-rank1.json").unlink()
    with pytest.raises(RuntimeError, match="rank 1 left no digest"):
        integrity.merge_digests(tmp, 2, "a1")


def test_each_rank_hashes_only_the_files_it_loads(tmp_path, monkeypatch):
    d = tmp_path / "c"
    _two_rank_files(d, 3)
    _manifest_of(d, 2, 3)
    read: list[str] = []
    real = integrity.file_digest
    monkeypatch.setattr(integrity, "file_digest", lambda p, algo: read.append(Path(p).name) or real(p, algo))
    ckpt.verify_rank(d, 1, 2)
    assert sorted(read) == ["rng_rank1.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt",
                            "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    read.clear()
    ckpt.verify_rank(d, 0, 2)
    assert sorted(read) == ["keel_state.json", "rng_rank0.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt",
                            "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    (d / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"Zero_pp_rank_1_mp_rank_00_optim_states.pt")
    ckpt.verify_rank(d, 0, 2)  # not rank 0's to read
    with pytest.raises(ckpt.CheckpointCorruption, match="zero_pp_rank_1_mp_rank_00_optim_states.pt is truncated"):
        ckpt.verify_rank(d, 1, 2)


def test_a_manifest_from_before_per_rank_digests_still_verifies(tmp_path):
    """The flat SHA-256 manifest earlier versions wrote: checked as before, content on the ranks."""
    import hashlib

    d = tmp_path / "c"
    _two_rank_files(d, 3)
    (d / ckpt.STATE).write_text(json.dumps({"step": 2, "world_size": 2}))
    flat = {p.name: {"size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
            for p in sorted(d.iterdir())}
    (d / ckpt.MANIFEST).write_text(json.dumps(flat))
    ckpt.verify(d)
    (d / "rng_rank1.pt").write_bytes(b"Rng_rank1.pt")
    ckpt.verify_structure(d)
    ckpt.verify_rank(d, 0, 2)
    with pytest.raises(ckpt.CheckpointCorruption, match="rng_rank1.pt is truncated or altered"):
        ckpt.verify_rank(d, 1, 2)
