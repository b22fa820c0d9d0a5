"""Checkpoint integrity: files hashed as they are written, durably, by the rank that writes them.

Each rank routes what it writes (DeepSpeed's files through the engine's checkpoint engine, Keel's RNG
file) through a :class:`HashingWriter`, which hashes the bytes on their way to the file, then fsyncs
its files. The rank leaves a digest file (its attempt id, its files' sizes and checksums); rank 0
merges them into the manifest. Verification is split: the structure (manifest, attempt, each rank's
expected DeepSpeed files, sizes) is checked without reading content; content is hashed only by the
rank that loads it (:func:`loader`).

The checksum is XXH3-128 (``xxhash``): a 128-bit hash built to detect accidental corruption (any
changed, truncated or torn file: a random change escapes it with probability 2^-128, as with
SHA-256) at memory speed, about ten times SHA-256's here, so it hides behind the write. It is no
defence against deliberate tampering, which no checksum stored beside the files is. Manifests from
before it (``sha256``) still verify.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import xxhash

MANIFEST = "manifest.json"
DIGEST = ".digest-rank{rank}.json"
ALGORITHM = "xxh3_128"
_ALGORITHMS: dict[str, Callable[[], Any]] = {"xxh3_128": xxhash.xxh3_128, "sha256": hashlib.sha256}
_CHUNK = 8 << 20
# DeepSpeed's per-rank files: [bf16_]zero_pp_rank_<r>_mp_rank_00_{model,optim}_states.pt
_RANK_FILE = re.compile(r"(?:^|_)zero_pp_rank_(\d+)_")
_RNG_FILE = re.compile(r"^rng_rank(\d+)\.pt$")
SHARED_MODEL = "mp_rank_00_model_states.pt"  # ZeRO stages 0-2: rank 0 writes it, every rank loads it


class CheckpointCorruption(RuntimeError):
    """A checkpoint whose files do not match its manifest."""


class HashingWriter:
    """A write-only file object that hashes every byte it writes (what ``torch.save`` needs: ``write``)."""

    def __init__(self, fh: IO[bytes]) -> None:
        self._fh, self._hash, self.size = fh, _ALGORITHMS[ALGORITHM](), 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self._hash.update(view)
        self._fh.write(view)
        self.size += view.nbytes
        return view.nbytes

    def flush(self) -> None:
        self._fh.flush()

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def write_file(path: Path, fill: Callable[[HashingWriter], None], sync: bool = True) -> dict:
    """Write ``path`` through ``fill(writer)`` (and fsync it, with ``sync``); its ``{"size", ALGORITHM}``."""
    with open(path, "wb") as fh:
        writer = HashingWriter(fh)
        fill(writer)
        fh.flush()
        if sync:
            os.fsync(fh.fileno())
    return {"size": writer.size, ALGORITHM: writer.hexdigest()}


def fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(path: Path, data: bytes) -> dict:
    return write_file(path, lambda w: w.write(data))


def write_json_durably(path: Path, obj: Any) -> None:
    """``path`` holds ``obj`` completely or not at all (written aside, fsynced, renamed, directory fsynced)."""
    part = path.with_name(path.name + ".part")
    write_bytes(part, json.dumps(obj, indent=1).encode())
    os.replace(part, path)
    fsync_dir(path.parent)


def file_digest(path: Path, algorithm: str = ALGORITHM) -> str:
    h, buf = _ALGORITHMS[algorithm](), bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path, files: bool = False) -> None:
    """fsync every directory under ``root`` (and every file, with ``files``), deepest first."""
    for dirpath, _dirs, names in os.walk(root, topdown=False):
        if files:
            for name in names:
                fsync_file(os.path.join(dirpath, name))
        fsync_dir(Path(dirpath))


@contextmanager
def hashing(engine: Any) -> Iterator[dict[str, dict]]:
    """Route the DeepSpeed engine's checkpoint writes through :func:`write_file` while inside; yields
    ``{absolute path: {"size", ALGORITHM}}`` of what this rank wrote, all fsynced on the way out (together:
    the disk writes one file back while the next is written). Engines without a checkpoint engine (test
    fakes) pass through unhashed: the commit then hashes their files."""
    written: dict[str, dict] = {}
    ce = getattr(engine, "checkpoint_engine", None)
    if ce is None or not hasattr(ce, "save"):
        yield written
        return
    zipfile = getattr(ce, "zipfile_serialization", True)

    def save(state_dict: Any, path: str) -> None:
        import torch

        written[os.path.abspath(path)] = write_file(
            Path(path), lambda w: torch.save(state_dict, w, _use_new_zipfile_serialization=zipfile), sync=False)

    ce.save = save  # an instance attribute shadows the class method for this save only
    try:
        yield written
    finally:
        del ce.save
    for path in written:
        fsync_file(path)


def write_digest(ckpt: Path, rank: int, attempt: str, written: dict[str, dict]) -> None:
    """This rank's part of the manifest: what it wrote (relative paths), for its attempt."""
    files = {}
    for path, meta in written.items():
        rel = Path(os.path.relpath(path, os.path.abspath(ckpt))).as_posix()
        if not rel.startswith("../"):  # DeepSpeed writes nothing outside the tag folder; ignore it if it did
            files[rel] = {**meta, "rank": rank}
    write_json_durably(ckpt / DIGEST.format(rank=rank), {"rank": rank, "attempt": attempt, "files": files})


def merge_digests(ckpt: Path, world: int, attempt: str) -> dict[str, dict]:
    """Every rank's digest (all ``world`` of them, all of ``attempt``) merged; the digest files are removed."""
    files: dict[str, dict] = {}
    for rank in range(world):
        path = ckpt / DIGEST.format(rank=rank)
        if not path.is_file():
            raise RuntimeError(f"checkpoint {ckpt}: rank {rank} left no digest: not committing it")
        digest = json.loads(path.read_text())
        if digest["attempt"] != attempt:
            raise RuntimeError(f"checkpoint {ckpt}: rank {rank} wrote for attempt {digest['attempt']}, "
                               f"rank 0 for {attempt}: two runs write this run directory; not committing it")
        files.update(digest["files"])
    for rank in range(world):
        (ckpt / DIGEST.format(rank=rank)).unlink()
    return files


def listed(ckpt: Path) -> list[str]:
    """Every file under ``ckpt`` a manifest covers (relative paths; not the manifest or the digests)."""
    return sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*")
                  if p.is_file() and p.name != MANIFEST and not p.name.startswith(".digest-")
                  and not p.name.endswith(".part"))


def hash_unlisted(ckpt: Path, files: dict[str, dict]) -> dict[str, dict]:
    """Files under ``ckpt`` no rank hashed as it wrote (written another way): hashed now, fsynced."""
    out = {}
    for rel in listed(ckpt):
        if rel not in files:
            path = ckpt / rel
            out[rel] = {"size": path.stat().st_size, ALGORITHM: file_digest(path), "rank": 0}
            fsync_file(path)
    return out


def rank_of(rel: str) -> int | None:
    """The rank a per-rank file belongs to (DeepSpeed's ``zero_pp_rank_<r>`` files, Keel's ``rng_rank<r>``)."""
    name = rel.rsplit("/", 1)[-1]
    m = _RANK_FILE.search(name) or _RNG_FILE.match(name)
    return int(m.group(1)) if m else None


def loader(rel: str, world: int) -> int:
    """The one rank that verifies ``rel`` on a resume at ``world`` ranks: the rank that loads it, rank 0 for
    files every rank loads (the ZeRO 0-2 model file, keel_state.json) or no rank owns."""
    rank = rank_of(rel)
    return rank if rank is not None and rank < world else 0


def expected(world: int, stage: int) -> dict[int, list[re.Pattern]]:
    """Per rank, the files a checkpoint written by ``world`` ranks at ZeRO ``stage`` must hold."""
    out: dict[int, list[re.Pattern]] = {}
    for r in range(world):
        pats = [re.compile(rf"^rng_rank{r}\.pt$")]
        if stage >= 1:
            pats.append(re.compile(rf"^(?:[a-z0-9]+_)?zero_pp_rank_{r}_mp_rank_00_optim_states\.pt$"))
        if stage == 3:
            pats.append(re.compile(rf"^zero_pp_rank_{r}_mp_rank_00_model_states\.pt$"))
        elif r == 0:
            pats.append(re.compile(rf"^{re.escape(SHARED_MODEL)}$"))
        out[r] = pats
    return out


def check_files(ckpt: Path, files: dict[str, dict]) -> None:
    """Each listed file is present with its recorded size (no content read)."""
    for rel, meta in files.items():
        path = ckpt / rel
        if not path.is_file():
            raise CheckpointCorruption(f"checkpoint {ckpt}: missing file {rel}")
        if path.stat().st_size != meta["size"]:
            raise CheckpointCorruption(f"checkpoint {ckpt}: {rel} is truncated or altered "
                                       f"({path.stat().st_size} bytes, the manifest says {meta['size']})")


def check_expected(ckpt: Path, files: dict[str, dict], world: int, stage: int) -> None:
    """Every rank of ``world`` left the files ZeRO ``stage`` writes (not only the files the manifest lists)."""
    for rank, patterns in expected(world, stage).items():
        for pat in patterns:
            if not any(pat.match(rel) for rel in files):
                raise CheckpointCorruption(f"checkpoint {ckpt}: rank {rank} of {world} (ZeRO stage {stage}) has no "
                                           f"file matching {pat.pattern}: incomplete checkpoint")


def check_content(ckpt: Path, rels: list[str], files: dict[str, dict], threads: int = 1) -> None:
    """Hash ``rels`` (``threads`` at a time) against ``files``; raise naming the first that differs."""
    def one(rel: str) -> str | None:
        meta = files[rel]
        algo = next((a for a in _ALGORITHMS if a in meta), None)
        if algo is None or file_digest(ckpt / rel, algo) != meta[algo]:
            return f"checkpoint {ckpt}: {rel} is truncated or altered (checksum mismatch)"
        return None

    with ThreadPoolExecutor(max(1, threads)) as pool:
        for err in pool.map(one, rels):
            if err:
                raise CheckpointCorruption(err)
