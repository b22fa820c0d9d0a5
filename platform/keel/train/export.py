"""Hugging Face exports: along the way (``trainer.export_every``) and of any checkpoint (``keel export``).

During training every ``export_every`` optimizer steps the live engine is exported (a collective) to
``<run>/exports/step_N/`` (the name of that step's checkpoint): ``hf/`` with the full model, or for a
LoRA run ``adapter/`` and, with ``mitigation.lora.merge_export``, the merged ``hf/``. An export is
written aside and renamed when whole; ``trainer.keep_exports`` keeps the newest ones (all by default),
independently of ``trainer.keep_checkpoints``: an export outlives its pruned checkpoint.

:func:`export_checkpoint` turns a Keel checkpoint (any ZeRO stage and world size, full or LoRA) into a
model directory offline, on the CPU, without Ray or a process group: it verifies the checkpoint against
its manifest, rebuilds the fp32 weights from the rank shards (DeepSpeed's ``zero_to_fp32``) and writes
safetensors in the run's dtype, the config, generation config and tokenizer of the base model that
``keel_state.json`` records (the run's ``config.yaml`` for checkpoints written before it did).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from keel.errors import UserError
from keel.train import checkpoint as ckpt

EXPORTS = "exports"
DTYPES = ("float32", "bfloat16")


def export_dir(run_dir: Path, step: int) -> Path:
    """Where the export of ``step`` goes: beside the checkpoint of that step, under the same name."""
    return run_dir / EXPORTS / f"{ckpt.PREFIX}{step:06d}"


def due(step: int, every: int, max_steps: int) -> bool:
    """Whether step ``step`` (1-based) exports: every ``every`` steps; the last step's model is ``hf/``."""
    return every > 0 and step % every == 0 and step < max_steps


def completed(run_dir: Path) -> list[Path]:
    """The run's whole exports, oldest first."""
    d = run_dir / EXPORTS
    found = [p for p in d.iterdir() if p.name.startswith(ckpt.PREFIX)] if d.is_dir() else []
    return sorted(found, key=lambda p: int(p.name[len(ckpt.PREFIX):]))


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def save_along(run_dir: Path, step: int, rank: int, keep: int | None, write: Callable[[Path], dict]) -> Path:
    """Export step ``step`` on every rank (a collective): ``write(tmp)`` fills a scratch dir that rank 0
    renames to ``exports/step_N`` once it is whole, then prunes to the newest ``keep`` (None: all)."""
    final = export_dir(run_dir, step)
    tmp = final.with_name(f".tmp-{final.name}")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a crash's leftover
        tmp.mkdir(parents=True)
    _barrier()
    write(tmp)
    _barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)  # the same step again after a resume
        os.replace(tmp, final)
        for old in completed(run_dir)[:-keep] if keep else []:
            shutil.rmtree(old, ignore_errors=True)
        print(f"export: step {step} -> {final}", flush=True)
    _barrier()
    return final


def model_record(cfg: Any, model_path: str) -> dict:
    """What ``keel export`` needs about the model, stored in every checkpoint's ``keel_state.json``."""
    return {"path": model_path, "dtype": cfg.model.dtype, "trust_remote_code": cfg.model.trust_remote_code}


def _record_from_run(path: Path) -> dict:
    """The model record from the run's ``config.yaml``, for checkpoints written before Keel stored it."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from keel.config import ModelConfig
    from keel.model.build import model_path

    run_config = path.parent.parent / "config.yaml"
    if not run_config.is_file():
        raise UserError(f"{path}: its {ckpt.STATE} does not record the model and the run's config "
                         f"{run_config} is missing")
    model = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(run_config).model))
    cfg = SimpleNamespace(model=model)  # only the model group: the rest may not validate in this Keel version
    return model_record(cfg, model_path(cfg))


def checked(path: Path) -> dict:
    """The state of the complete Keel checkpoint ``path``, verified against its manifest; ValueError naming
    the path otherwise."""
    if not path.is_dir():
        raise UserError(f"{path} is not a directory (expected a Keel checkpoint, e.g. outputs/RUN/checkpoints/"
                         f"{ckpt.PREFIX}000100)")
    if not (path / ckpt.MANIFEST).is_file():
        run_dir = path.parent if path.name == "checkpoints" else path  # a run dir or its checkpoints/ was given
        inside = ckpt.complete(run_dir)
        hint = f"; the complete checkpoints there: {', '.join(str(p) for p in inside)}" if inside else ""
        raise UserError(f"{path} is not a complete Keel checkpoint: no {ckpt.MANIFEST} (an interrupted write, "
                         f"or not a checkpoint directory){hint}")
    try:
        ckpt.verify(path)
    except ckpt.CheckpointCorruption as err:
        raise UserError(str(err)) from err
    return ckpt.state(path)


def fp32_weights(path: Path) -> dict:
    """The full fp32 state dict of a checkpoint: rebuilt from the ZeRO shards of every rank (any stage and
    world size), or read whole from a ZeRO-0 checkpoint."""
    import torch

    if list(path.glob("*_optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(io.StringIO()):  # its progress prints
            return get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    module = torch.load(path / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    return {k: v.float() for k, v in module.items()}


def _skeleton(record: dict) -> Any:
    """The base model's architecture in the run's dtype on the meta device (no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(record["path"], trust_remote_code=record["trust_remote_code"])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, record["dtype"]),
                                                 trust_remote_code=record["trust_remote_code"])
    with contextlib.suppress(OSError):  # the base's sampling defaults and stop ids, when it has them
        model.generation_config = GenerationConfig.from_pretrained(record["path"])
    return model


def _write_full(weights: dict, record: dict, out: Path, source: Path) -> None:
    """The full model: the checkpoint's weights in the run's dtype, the base's config and generation config."""
    import torch

    model = _skeleton(record)
    expected = set(model.state_dict())
    missing, unexpected = expected - set(weights), set(weights) - expected
    if missing or unexpected:
        raise UserError(f"{source} does not match the model at {record['path']}: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    dtype = getattr(torch, record["dtype"])
    model.save_pretrained(str(out), state_dict={k: v.to(dtype) for k, v in weights.items()}, safe_serialization=True)


def _write_lora(weights: dict, record: dict, lora: dict, out: Path, merge: bool, source: Path) -> None:
    """A LoRA checkpoint: the adapter (PEFT's files), or with ``merge`` the base with it merged in."""
    import torch
    from transformers import AutoModelForCausalLM

    from keel.config import LoraConfig
    from keel.mitigation.lora import wrap

    dtype = getattr(torch, record["dtype"])
    base = AutoModelForCausalLM.from_pretrained(record["path"], dtype=dtype,
                                                trust_remote_code=record["trust_remote_code"])
    model = wrap(base, LoraConfig(**lora), seed=0)  # the adapters' shapes; their values come from the checkpoint
    adapters = {k for k, p in model.named_parameters() if p.requires_grad}
    if not adapters <= set(weights):
        raise UserError(f"{source} lacks LoRA weights of this model: {sorted(adapters - set(weights))[:5]}")
    model.load_state_dict({k: weights[k].to(dtype) for k in adapters}, strict=False)
    if merge:
        model.merge_and_unload().save_pretrained(str(out), safe_serialization=True)
    else:
        model.save_pretrained(str(out), safe_serialization=True)


def export_checkpoint(path: Path, out: Path, merge: bool = False) -> dict:
    """Write checkpoint ``path`` as a model ``from_pretrained`` loads into ``out`` (new or empty): the full
    model; for a LoRA run the adapter, or with ``merge`` the merged model. Returns what was written."""
    state = checked(path)
    lora = state.get("lora")
    if merge and not lora:
        raise UserError(f"--merge merges LoRA adapters, but {path} is a full fine-tune's checkpoint "
                         "(exported whole without it)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} exists and is not an empty directory")
    record = state.get("model") or _record_from_run(path)
    weights = fp32_weights(path)
    out.mkdir(parents=True, exist_ok=True)
    if lora:
        _write_lora(weights, record, lora, out, merge, path)
    else:
        _write_full(weights, record, out, path)
    from keel.model.build import load_tokenizer

    load_tokenizer(record["path"], record["trust_remote_code"]).save_pretrained(str(out))
    kind = "merged model" if merge else "LoRA adapter" if lora else "full model"
    result = {"checkpoint": str(path), "step": state["step"], "world_size": state.get("world_size"), "kind": kind,
              "dtype": record["dtype"], "base_model": record["path"], "out": str(out)}
    (out / "keel_export.json").write_text(json.dumps(result, indent=1))
    return result
