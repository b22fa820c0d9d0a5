"""Resuming a run: the one place that decides from which checkpoint, and how, a run goes on.

On the driver, before any worker starts (:func:`first_step`): the newest complete checkpoint is chosen by
its structure (:func:`choose`, falling back to the one before with ``trainer.resume_fallback=previous``),
the run's fingerprints (:func:`run_meta`) must match the ones it stores (:func:`check_resumable`), a
checkpoint another world size wrote is converted once to DeepSpeed's universal format
(:func:`to_universal`), and the step whose rows the workers get first is returned. On the workers
(:func:`worker_point`, :func:`load`): the same choice again, each rank hashing the files it loads (a
collective), then the load. A loss-spike rollback reloads the newest checkpoint this worker group loaded
or wrote (:func:`spike_rollback`).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from keel.config import KeelConfig, to_plain
from keel.core.collectives import all_reduce_sum
from keel.core.worker import WorkerInfo
from keel.errors import ConfigError, UserError
from keel.train import checkpoint as ckpt
from keel.train import integrity
from keel.train.integrity import CheckpointCorruption

if TYPE_CHECKING:
    from keel.data.pipeline import RowPlan


@dataclass(frozen=True)
class ResumePoint:
    """A checkpoint to load, and whether through its universal conversion (another world size wrote it)."""

    path: Path
    universal: bool = False


def run_meta(cfg: KeelConfig, plan: RowPlan, tokenizer: Any) -> dict:
    """Fingerprints stored with every checkpoint; a resume must match them."""
    data = hashlib.sha256(plan.input_ids.tobytes() + plan.targets.tobytes()).hexdigest()[:16]
    from keel.data.preprocessed_dir import tokenizer_fingerprint

    tok = tokenizer_fingerprint(tokenizer)
    t = cfg.trainer
    # LoRA adapters are what a LoRA checkpoint holds: another r, alpha or target set cannot load it
    # (merge_export only decides the final export).
    lora = to_plain(cfg)["mitigation"].get("lora")
    lora = {k: v for k, v in lora.items() if k != "merge_export"} if lora else None
    return {"data_fingerprint": data, "tokenizer": tok, "template": cfg.template.name,
            "grad_accum": t.grad_accum, "micro_batch_size": t.micro_batch_size, "max_steps": t.max_steps,
            "lora": lora}


def check_resumable(saved: dict, meta: dict, allowed: list[str]) -> None:
    """Refuse a resume whose data, tokenizer, template, batch geometry or LoRA adapters changed."""
    for key, value in meta.items():
        if key in saved and saved[key] != value and key not in allowed:
            raise ConfigError(f"cannot resume: {key} changed since the checkpoint ({saved[key]!r} -> {value!r}); "
                              f"set trainer.resume_allow_changes=[{key}] to allow it, or trainer.resume=none")


def choose(run_dir: Path, fallback: str = "none", rank: int | None = None, world: int = 1) -> Path | None:
    """The newest complete checkpoint that verifies; with ``fallback="previous"`` a corrupt newest one is skipped
    (and reported) in favour of the one before it. The driver (``rank`` None) checks structure and sizes; the
    ranks (a collective) also hash, each, the files it loads."""
    ckpts = ckpt.complete(run_dir)
    if not ckpts:
        return None

    def check(c: Path) -> None:
        if rank is None:
            ckpt.verify_structure(c)
        else:
            ckpt.verify_agreed(c, rank, world)

    try:
        check(ckpts[-1])
        return ckpts[-1]
    except CheckpointCorruption as err:
        if fallback != "previous" or len(ckpts) < 2:
            raise
        if rank in (None, 0):
            print(f"checkpoint: {err}; trainer.resume_fallback=previous uses {ckpts[-2].name}", flush=True)
        check(ckpts[-2])
        return ckpts[-2]


def other_world(path: Path, world: int) -> bool:
    """Whether another world size wrote ``path`` (resuming it goes through :func:`to_universal`)."""
    return ckpt.saved_world(path) not in (None, world)


def to_universal(path: Path) -> Path:
    """Convert checkpoint ``path`` to DeepSpeed's universal checkpoint (per-parameter fp32 weights and Adam
    moments, independent of the world size) once; returns its directory. Runs on the driver, before the workers."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    out = ckpt.universal_dir(path)
    if (out / "zero" / "optimizer_state.pt").is_file():
        return out
    ckpt.verify(path)  # the conversion reads every file anyway: it is made from a verified checkpoint only
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    ds_to_universal(argparse.Namespace(input_folder=str(path), output_folder=str(tmp), num_extract_workers=1,
                                       num_merge_workers=1, keep_temp_folder=False, no_strict=False,
                                       inject_missing_state=False))
    for rng in path.glob("rng_rank*.pt"):
        shutil.copy2(rng, tmp / rng.name)
    (tmp / ckpt.STATE).write_text((path / ckpt.STATE).read_text())
    integrity.fsync_tree(tmp, files=True)
    os.replace(tmp, out)
    integrity.fsync_dir(out.parent)
    return out


def corruption_error(err: CheckpointCorruption | str) -> UserError:
    """A corrupt checkpoint, as the user's decision to take: its finding and the setting that goes on without it."""
    return UserError(f"{err}; set trainer.resume_fallback=previous to use the checkpoint before it")


def corruption_in(err: BaseException) -> str | None:
    """The CheckpointCorruption message a worker raised, from the error (or its causes) Ray Train reports."""
    seen: BaseException | None = err
    while seen is not None:
        m = re.search(r"CheckpointCorruption: (checkpoint [^\n]+)", str(seen))
        if m:
            return m.group(1)
        seen = seen.__cause__ or seen.__context__
    return None


def first_step(cfg: KeelConfig, run_dir: Path, meta: dict) -> int:
    """The driver's resume: the first step the workers may resume at (their rows are shipped from there on).
    The driver checks the checkpoint's structure and fingerprints and converts it for another world size;
    the workers hash its content, each the files it loads, and may fall back to the one before
    (trainer.resume_fallback=previous), whose step is then returned."""
    if cfg.trainer.resume != "auto":
        return 0
    world = cfg.cluster.num_workers
    try:
        chosen = choose(run_dir, cfg.trainer.resume_fallback)
        if chosen is not None and other_world(chosen, world):
            _check_elastic(cfg, ckpt.state(chosen), world)
            out = to_universal(chosen)  # verifies every file first: the conversion reads them all
    except CheckpointCorruption as err:
        raise corruption_error(err) from err
    if chosen is None:
        return 0
    saved = ckpt.state(chosen)
    check_resumable(saved, meta, cfg.trainer.resume_allow_changes)
    print(f"resume: continuing from {chosen} (step {saved['step']})")
    if other_world(chosen, world):
        print(f"resume: elastic: the checkpoint was written by {saved['world_size']} workers, this run has {world}; "
              f"loading DeepSpeed's universal checkpoint {out} (per-parameter fp32 weights and Adam moments)")
    earlier = [c for c in ckpt.complete(run_dir) if c.name < chosen.name]
    if cfg.trainer.resume_fallback == "previous" and earlier:
        return ckpt.state(earlier[-1])["step"]
    return saved["step"]


def _check_elastic(cfg: KeelConfig, saved: dict, world: int) -> None:
    if cfg.deepspeed.stage not in (1, 2, 3):
        raise ConfigError(f"cannot resume on {world} workers a checkpoint written by {saved['world_size']}: "
                          "deepspeed.stage 0 has no universal checkpoint")


def worker_point(cfg: KeelConfig, info: WorkerInfo) -> ResumePoint | None:
    """The workers' choice (trainer.resume=auto): the newest complete checkpoint, each rank having hashed the
    files it loads (a collective: all agree on the verdict), and whether another world size wrote it."""
    if cfg.trainer.resume != "auto":
        return None
    chosen = choose(info.run_dir, cfg.trainer.resume_fallback, info.rank, info.world_size)
    if chosen is None:
        return None
    return ResumePoint(chosen, other_world(chosen, info.world_size))


def load(engine: Any, info: WorkerInfo, point: ResumePoint | None) -> int:
    """Load ``point`` into the engine; returns its step (0 without one)."""
    if point is None:
        return 0
    step = reload(engine, point, info.rank)
    if info.rank == 0:
        how = (f" (universal checkpoint: written by {ckpt.saved_world(point.path)} workers, "
               f"now {info.world_size})") if point.universal else ""
        print(f"resumed from {point.path} (step {step}){how}")
    return step


def reload(engine: Any, point: ResumePoint, rank: int) -> int:
    """Load ``point`` (its universal conversion when ``point.universal``) into the live engine; returns its step."""
    if engine.load_universal_checkpoint() != point.universal:
        # An elastic start built the engine to read universal checkpoints; the ones this group writes are not.
        engine._config.load_universal_checkpoint = point.universal
    return ckpt.load(engine, ckpt.universal_dir(point.path) if point.universal else point.path, rank)


def spike_rollback(engine: Any, cfg: KeelConfig, info: WorkerInfo, spiked: bool, restore: ResumePoint | None,
                   step: int) -> int | None:
    """Every rank, with trainer.spike_rollback: on rank 0's loss spike at ``step`` reload ``restore`` and keep the
    LR at the data position; returns the checkpoint's step (None: no rollback)."""
    if not cfg.trainer.spike_rollback:
        return None
    (votes,) = all_reduce_sum([float(spiked)])  # only rank 0 runs the detector; every rank must decide alike
    if votes == 0:
        return None
    to = ckpt.state(restore.path)["step"] if restore is not None and restore.path.is_dir() else None
    if to is None or to >= step:
        if info.rank == 0:
            print(f"warning: step {step}: loss spike not rolled back: no complete checkpoint of this run before step "
                  f"{step} (trainer.checkpoint_every={cfg.trainer.checkpoint_every}); training goes on from the spiked "
                  "weights", flush=True)
        return None
    ckpt.verify_agreed(restore.path, info.rank, info.world_size)  # each rank hashes what it reloads
    loaded = reload(engine, restore, info.rank)
    assert loaded == to, f"{restore.path} holds step {loaded}, its {ckpt.STATE} says {to}"
    for _ in range(step - to):  # the LR stays a function of the data position: the next step is step + 1's
        engine.lr_scheduler.step()
    if info.rank == 0:
        print(f"warning: step {step}: loss spike; rolled back to checkpoint step {to} (steps {to + 1}..{step} "
              f"undone; their data is skipped, training goes on with step {step + 1}'s)", flush=True)
    return to
