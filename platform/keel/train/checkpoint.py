"""Checkpoints: atomic, durable, verified DeepSpeed states of every rank, and a consolidated HF dir.

A checkpoint is written to ``checkpoints/.tmp-step_N-<attempt>`` (the attempt id of the run that
writes it: two runs never share a folder), each rank hashing and fsyncing what it writes
(``keel.train.integrity``). Once every rank has written, rank 0 merges their digests (all of one
attempt) into ``manifest.json``, fsyncs the folder and renames it to ``step_N``; a committed
``step_N`` it replaces is renamed aside first and deleted only after the new one is in place, so a
crash at any point leaves a complete checkpoint. It holds the DeepSpeed ZeRO state (parameters,
optimizer, scheduler), every rank's RNG states and ``keel_state.json`` (step = the data position:
the run resumes with exactly the rows of step N+1, since the row plan is a pure function of the
config; attempt, world size, ZeRO stage). Resuming checks the structure on the driver and the
content on the ranks, each hashing only the files it loads (``keel.train.resume`` decides which).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from keel.train import integrity
from keel.train.integrity import MANIFEST, CheckpointCorruption

PREFIX = "step_"
STATE = "keel_state.json"
UNIVERSAL = "universal"  # checkpoints converted for a resume on another world size
_AT_REST = re.compile(r"^\.(tmp|old)-(step_\d+)(?:-.+)?$")  # a checkpoint being written, or being replaced
__all__ = ["CheckpointCorruption", "MANIFEST"]
BEST = "best"  # checkpoints/best -> step_N: the best val/loss (trainer.save_best), exempt from pruning


def root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def write_manifest(ckpt: Path, attempt: str = "", world: int | None = None, stage: int | None = None) -> None:
    """A manifest of every file in ``ckpt``, hashed now (for checkpoints not written by :func:`save`)."""
    files = integrity.hash_unlisted(ckpt, {})
    _write_manifest(ckpt, files, attempt, world, stage)


def _write_manifest(ckpt: Path, files: dict, attempt: str, world: int | None, stage: int | None) -> None:
    integrity.write_json_durably(ckpt / MANIFEST, {"format": 2, "attempt": attempt, "world_size": world,
                                                   "zero_stage": stage, "files": files})


def manifest(ckpt: Path) -> dict:
    """``ckpt``'s manifest (one written before per-rank digests, a flat file list, is read as one)."""
    path = ckpt / MANIFEST
    if not path.is_file():
        raise CheckpointCorruption(f"checkpoint {ckpt} has no {MANIFEST} (incomplete write)")
    try:
        m = json.loads(path.read_text())
    except ValueError as err:
        raise CheckpointCorruption(f"checkpoint {ckpt}: unreadable {MANIFEST} ({err})") from None
    if m.get("format") != 2:
        m = {"format": 1, "attempt": "", "world_size": None, "zero_stage": None, "files": m}
    return m


def verify_structure(ckpt: Path) -> dict:
    """Without reading content: the manifest, its attempt (that of keel_state.json), every rank's expected
    DeepSpeed and RNG files for the saved world size and ZeRO stage, and each file's size. Returns the manifest."""
    m = manifest(ckpt)
    files = m["files"]
    integrity.check_files(ckpt, files)
    if m["format"] == 2 and STATE in files:
        saved = state(ckpt)
        if saved.get("attempt", "") != m["attempt"]:
            raise CheckpointCorruption(f"checkpoint {ckpt}: {STATE} is from attempt {saved.get('attempt')!r}, its "
                                       f"files from {m['attempt']!r}: the states of two runs are mixed")
    if m["world_size"] and m["zero_stage"] is not None:
        integrity.check_expected(ckpt, files, m["world_size"], m["zero_stage"])
    return m


def verify(ckpt: Path, threads: int = 4) -> None:
    """Structure and the content of every file (``threads`` hashing at once): CheckpointCorruption naming the
    first missing, truncated or altered file."""
    m = verify_structure(ckpt)
    integrity.check_content(ckpt, sorted(m["files"]), m["files"], threads)


def verify_rank(ckpt: Path, rank: int, world: int) -> None:
    """Structure, and the content of the files ``rank`` of ``world`` loads (each file hashed by one rank).
    A checkpoint of another world size is read through its universal conversion, which the driver made
    from a verified checkpoint: then only the conversion's presence is checked."""
    m = verify_structure(ckpt)
    saved = m["world_size"] or saved_world(ckpt)
    if saved not in (None, world):
        if not (universal_dir(ckpt) / "zero" / "optimizer_state.pt").is_file():
            raise CheckpointCorruption(f"checkpoint {ckpt} was written by {saved} workers and has no universal "
                                       "conversion for this world size")
        return
    mine = [rel for rel in sorted(m["files"]) if integrity.loader(rel, world) == rank]
    integrity.check_content(ckpt, mine, m["files"])


def verify_agreed(ckpt: Path, rank: int, world: int) -> None:
    """:func:`verify_rank` on every rank (a collective): all raise one CheckpointCorruption naming every rank's
    finding if any rank found a problem (so rank 0, whose lines reach the console, can say which file)."""
    from keel.core.collectives import all_gather

    err = None
    try:
        verify_rank(ckpt, rank, world)
    except CheckpointCorruption as e:
        err = f"rank {rank}: {e}"
    found = [e for e in all_gather(err) if e is not None]
    if found:
        raise CheckpointCorruption("; ".join(found))


def complete(run_dir: Path) -> list[Path]:
    """Complete checkpoints (renamed, with a manifest), oldest first."""
    d = root(run_dir)
    if not d.is_dir():
        return []
    found = [p for p in d.iterdir() if p.name.startswith(PREFIX) and (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


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
    """Delete all but the newest ``keep`` checkpoints, with their universal conversions; the best checkpoint
    (trainer.save_best) outlives keep_checkpoints."""
    kept = best(run_dir)
    for old in complete(run_dir)[:-keep]:
        if old != kept:
            shutil.rmtree(universal_dir(old), ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)


def clean_stale(run_dir: Path) -> list[str]:
    """Finish or undo what a crashed run left (only while holding the run directory's lock: no other run may be
    writing): a fully written ``.tmp-step_N`` whose ``step_N`` is missing (crash between the two renames of a
    replacement) is committed, a ``step_N`` set aside is restored, other temporaries are deleted, and universal
    conversions whose checkpoint is gone are pruned. Returns what was done."""
    r, done = root(run_dir), []
    if not r.is_dir():
        return done
    for kind in ("tmp", "old"):  # committed temporaries first: a set-aside one is then stale
        for d in sorted(p for p in r.iterdir() if (m := _AT_REST.match(p.name)) and m.group(1) == kind):
            final = r / _AT_REST.match(d.name).group(2)
            if not final.exists() and _restorable(d):
                os.replace(d, final)
                done.append(f"restored {final.name} from {d.name}")
            else:
                shutil.rmtree(d, ignore_errors=True)
                done.append(f"deleted the stale {d.name}")
    done += _clean_universal(r)
    integrity.fsync_dir(r)
    return done


def _restorable(d: Path) -> bool:
    try:
        verify_structure(d)
        return True
    except CheckpointCorruption:
        return False


def _clean_universal(r: Path) -> list[str]:
    u, done = r / UNIVERSAL, []
    if not u.is_dir():
        return done
    for d in sorted(p for p in u.iterdir() if p.is_dir()):  # (ds_to_universal also leaves a latest_universal file)
        if d.name.startswith(".tmp-") or not (r / d.name / MANIFEST).is_file():
            shutil.rmtree(d, ignore_errors=True)
            done.append(f"deleted the stale {UNIVERSAL}/{d.name}")
    return done


def save(engine: Any, run_dir: Path, step: int, rank: int, keep: int, meta: dict) -> Path:
    """Write checkpoint ``step`` atomically and durably on every rank (a collective); ``meta["attempt"]`` names
    the run writing it."""
    r, attempt = root(run_dir), str(meta.get("attempt", ""))
    final = r / f"{PREFIX}{step:06d}"
    tmp_tag = f".tmp-{final.name}-{attempt}" if attempt else f".tmp-{final.name}"
    tmp = r / tmp_tag
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a worker group that restarted mid-save left it
    _barrier()
    with integrity.hashing(engine) as written:  # each rank hashes and fsyncs what it writes, as it writes
        engine.save_checkpoint(str(r), tag=tmp_tag, client_state={"step": step}, save_latest=False)
    rng = tmp / f"rng_rank{rank}.pt"
    written[os.path.abspath(rng)] = integrity.write_file(rng, lambda w: torch.save(_rng_state(), w))
    integrity.write_digest(tmp, rank, attempt, written)
    _barrier()
    if rank == 0:
        stage = engine.zero_optimization_stage() if hasattr(engine, "zero_optimization_stage") else None
        _commit(tmp, final, {"step": step, "attempt": attempt, "zero_stage": stage, **meta}, _world())
        _prune(run_dir, keep)
    _barrier()
    return final


def _commit(tmp: Path, final: Path, saved: dict, world: int) -> None:
    """Rank 0: merge the ranks' digests into the manifest, make the folder durable and swap it in."""
    files = integrity.merge_digests(tmp, world, saved["attempt"])
    files[STATE] = {**integrity.write_bytes(tmp / STATE, json.dumps(saved).encode()), "rank": 0}
    files.update(integrity.hash_unlisted(tmp, files))
    _write_manifest(tmp, files, saved["attempt"], world, saved["zero_stage"])
    integrity.fsync_tree(tmp)
    old = None
    if final.exists():  # set the committed one aside; it goes only once the new one is in place
        old = final.with_name(f".old-{final.name}-{saved['attempt']}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    integrity.fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(universal_dir(final), ignore_errors=True)  # converted from the replaced one
        shutil.rmtree(old)


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
