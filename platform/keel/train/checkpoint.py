"""Checkpoints: atomic, verified DeepSpeed states of every rank, and a consolidated HF dir.

A checkpoint is written to ``checkpoints/.tmp-step_N`` and renamed to ``step_N`` by rank 0
only after every rank has finished writing and a manifest of sizes and SHA-256 checksums is
in place, so a crash mid-write leaves the previous checkpoint as the newest complete one.
It holds the DeepSpeed ZeRO state (parameters, optimizer, scheduler), every rank's RNG
states and ``keel_state.json`` (step = the data position: the run resumes with exactly the
rows of step N+1, since the row plan is a pure function of the config).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

PREFIX = "step_"
MANIFEST = "manifest.json"
STATE = "keel_state.json"
UNIVERSAL = "universal"  # checkpoints converted for a resume on another world size
BEST = "best"  # checkpoints/best -> step_N: the best val/loss (trainer.save_best), exempt from pruning


class CheckpointCorruption(RuntimeError):
    """A checkpoint whose files do not match its manifest."""


def root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(ckpt: Path) -> list[Path]:
    return sorted(p for p in ckpt.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(ckpt: Path) -> None:
    entries = {p.relative_to(ckpt).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
               for p in _files(ckpt)}
    (ckpt / MANIFEST).write_text(json.dumps(entries, indent=1))


def verify(ckpt: Path) -> None:
    """Raise CheckpointCorruption naming the first missing, truncated or altered file."""
    manifest = ckpt / MANIFEST
    if not manifest.is_file():
        raise CheckpointCorruption(f"checkpoint {ckpt} has no {MANIFEST} (incomplete write)")
    for rel, meta in json.loads(manifest.read_text()).items():
        path = ckpt / rel
        if not path.is_file():
            raise CheckpointCorruption(f"checkpoint {ckpt}: missing file {rel}")
        if path.stat().st_size != meta["size"] or _sha256(path) != meta["sha256"]:
            raise CheckpointCorruption(f"checkpoint {ckpt}: {rel} is truncated or altered (checksum mismatch)")


def complete(run_dir: Path) -> list[Path]:
    """Complete checkpoints (renamed, with a manifest), oldest first."""
    d = root(run_dir)
    if not d.is_dir():
        return []
    found = [p for p in d.iterdir() if p.name.startswith(PREFIX) and (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def choose(run_dir: Path, fallback: str = "none") -> Path | None:
    """The newest complete checkpoint that verifies; with ``fallback="previous"`` a corrupt
    newest one is skipped (and reported) in favour of the one before it."""
    ckpts = complete(run_dir)
    if not ckpts:
        return None
    try:
        verify(ckpts[-1])
        return ckpts[-1]
    except CheckpointCorruption as err:
        if fallback != "previous" or len(ckpts) < 2:
            raise
        print(f"checkpoint: {err}; trainer.resume_fallback=previous uses {ckpts[-2].name}", flush=True)
        verify(ckpts[-2])
        return ckpts[-2]


def state(ckpt: Path) -> dict:
    return json.loads((ckpt / STATE).read_text())


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
            "python_pos": random.getstate()[2], "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "numpy_pos": int(np_state[2])}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))


def best(run_dir: Path) -> Path | None:
    """The checkpoint ``checkpoints/best`` names (``trainer.save_best``), or None."""
    link = root(run_dir) / BEST
    return root(run_dir) / os.readlink(link) if link.is_symlink() else None


def mark_best(run_dir: Path, step: int, rank: int) -> None:
    """Point ``checkpoints/best`` at checkpoint ``step`` (rank 0; atomic): pruning keeps it from now on."""
    if rank != 0:
        return
    tmp = root(run_dir) / f".tmp-{BEST}"
    tmp.unlink(missing_ok=True)
    os.symlink(f"{PREFIX}{step:06d}", tmp)
    os.replace(tmp, root(run_dir) / BEST)


def _prune(run_dir: Path, keep: int) -> None:
    kept = best(run_dir)  # the best checkpoint outlives keep_checkpoints
    for old in complete(run_dir)[:-keep]:
        if old != kept:
            shutil.rmtree(old, ignore_errors=True)


def save(engine: Any, run_dir: Path, step: int, rank: int, keep: int, meta: dict) -> Path:
    """Write checkpoint ``step`` atomically on every rank (a collective)."""
    r = root(run_dir)
    tmp_tag, final = f".tmp-{PREFIX}{step:06d}", r / f"{PREFIX}{step:06d}"
    engine.save_checkpoint(str(r), tag=tmp_tag, client_state={"step": step}, save_latest=False)
    torch.save(_rng_state(), r / tmp_tag / f"rng_rank{rank}.pt")
    _barrier()
    if rank == 0:
        (r / tmp_tag / STATE).write_text(json.dumps({"step": step, **meta}))
        write_manifest(r / tmp_tag)
        if final.exists():
            shutil.rmtree(final)
        os.replace(r / tmp_tag, final)
        _prune(run_dir, keep)
    _barrier()
    return final


def load(engine: Any, ckpt: Path, rank: int) -> int:
    """Restore engine and RNG states from a verified ``ckpt``; returns its step."""
    engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name)
    rng = ckpt / f"rng_rank{rank}.pt"
    if rng.is_file():  # absent when resuming on more ranks than were saved
        _set_rng_state(torch.load(rng, weights_only=True))
    return json.loads((ckpt / STATE).read_text())["step"]


def universal_dir(ckpt: Path) -> Path:
    """Where ``ckpt`` converted to DeepSpeed's universal format lives (beside the checkpoints, not inside:
    the manifest covers exactly what the ranks wrote)."""
    return ckpt.parent / UNIVERSAL / ckpt.name


def saved_world(ckpt: Path) -> int | None:
    """Data-parallel world size that wrote ``ckpt`` (None for a checkpoint from before it was recorded)."""
    return state(ckpt).get("world_size")


def other_world(ckpt: Path, world: int) -> bool:
    """Whether another world size wrote ``ckpt`` (resuming it goes through :func:`to_universal`)."""
    return saved_world(ckpt) not in (None, world)


def to_universal(ckpt: Path) -> Path:
    """Convert ``ckpt`` to DeepSpeed's universal checkpoint (per-parameter fp32 weights and Adam moments,
    independent of the world size) once; returns its directory. Runs on the driver, before the workers."""
    import argparse

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    out = universal_dir(ckpt)
    if (out / "zero" / "optimizer_state.pt").is_file():
        return out
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    ds_to_universal(argparse.Namespace(input_folder=str(ckpt), output_folder=str(tmp), num_extract_workers=1,
                                       num_merge_workers=1, keep_temp_folder=False, no_strict=False,
                                       inject_missing_state=False))
    for rng in ckpt.glob("rng_rank*.pt"):
        shutil.copy2(rng, tmp / rng.name)
    (tmp / STATE).write_text((ckpt / STATE).read_text())
    os.replace(tmp, out)
    return out


def consolidated_state_dict(engine: Any) -> dict | None:
    """Full state dict on rank 0 (a collective under ZeRO-3: every rank must call it)."""
    if engine.zero_optimization_stage() == 3:
        return engine._zero3_consolidated_16bit_state_dict()
    return engine.module.state_dict()


def save_hf(engine: Any, model_path: str, out: Path, rank: int) -> None:
    """Write safetensors + config + tokenizer that ``from_pretrained`` loads."""
    state = consolidated_state_dict(engine)
    if rank != 0:
        return
    from keel.model.build import load_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    engine.module.save_pretrained(str(out), state_dict=state, safe_serialization=True)
    load_tokenizer(model_path).save_pretrained(str(out))
