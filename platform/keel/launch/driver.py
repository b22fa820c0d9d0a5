"""The driver of ``keel train``: data path, engine launch, run outputs."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from keel.config import to_plain
from keel.errors import UserError
from keel.tracking.context import write_run_context
from keel.tracking.logger import STARTS, redact


def _write_rejects(run_dir: Path, rejects: list[dict]) -> None:
    with (run_dir / "rejects.jsonl").open("w") as fh:
        for r in rejects:
            fh.write(json.dumps(r, default=str) + "\n")


def _print_mixture(report: dict) -> None:
    print(f"data: {report['rows']} packed rows of {report['max_len']} tokens, "
          f"packing efficiency {report['packing_efficiency']:.1%}")
    print(f"  {'source':<14}{'rows read':>10}{'available':>10}{'rejected':>9}{'weight':>8}{'share':>7}"
          f"{'examples':>9}{'epochs':>7}{'tokens':>10}{'trained':>10}")
    for name, s in report["sources"].items():
        print(f"  {name:<14}{s.get('rows_read', '-'):>10}{s['available']:>10}{s['rejected']:>9}{s['weight']:>8.3f}"
              f"{s['example_share']:>7.3f}{s['examples']:>9}{s['epochs']:>7.2f}{s['tokens']:>10}"
              f"{s['trained_tokens']:>10}")
    if "length" in report:
        _print_length(report["length"])
    if "validation" in report:
        v = report["validation"]
        held = ", ".join(f"{k} {s['examples']} ({s['from']})" for k, s in v["sources"].items())
        print(f"  validation: {v['rows']} packed rows, never trained: {held}")
    if "schedule" in report:
        _print_schedule(report["schedule"])


def _print_length(length: dict) -> None:
    """How long the run is, and, when trainer.epochs sized it, what the epochs came to."""
    asked = length.get("epochs_asked")
    how = f"trainer.epochs={asked:g}: " if asked is not None else ""
    print(f"  length: {how}{length['steps']} steps of {length['rows_per_step']} rows, "
          f"{length['epochs']:.3f} epochs of the sources' natural size ({length['natural_size']} examples)")


def _print_schedule(sched: dict) -> None:
    """The mixture at start and end, then per segment each source's example share, expected weight, token share."""
    def fmt(mix: dict) -> str:
        return ", ".join(f"{k} {v:.3f}" for k, v in mix.items())
    print(f"  mixture schedule ({sched['interpolation']}, {len(sched['segments'])} segments; "
          "weight above = its mean over the planned examples)")
    print(f"    start: {fmt(sched['start'])}")
    print(f"    end:   {fmt(sched['end'])}")
    names = list(sched["start"])
    print(f"    {'steps':<10}" + "".join(f"{n[:15]:>16}" for n in names)
          + "   (per source: example share / expected weight / token share)")
    for seg in sched["segments"]:
        lo, hi = seg["steps"]
        cells = "".join(f"{seg['example_share'][n]:>6.2f}/{seg['weights'][n]:.2f}/{seg['token_share'][n]:.2f}"
                        for n in names)
        print(f"    {f'{lo}-{hi}':<10}{cells}")


def adjust_hook(plugins: list) -> Any:
    """The ``adjust`` of ``keel.data.pipeline.build``: each plugin adjusts the mixture in turn."""
    def adjust(weights: list[float], sources: list) -> list[float]:
        n = len(weights)
        for p in plugins:  # each plugin's extra sources follow the weights it receives
            extra = len(p.extra_sources())
            weights = p.adjust_weights(weights, sources[: n + extra])
            n += extra
        return weights
    return adjust


def schedule_hook(plugins: list) -> Any:
    """The ``schedule`` of ``keel.data.pipeline.build``: each plugin may change the schedule in turn."""
    def schedule(sched: Any, sources: list) -> Any:
        for p in plugins:  # each sees the schedule the previous ones returned
            sched = p.schedule(sched, sources)
        return sched
    return schedule


def prepare_data(cfg: Any, run_dir: Path, plugins: list) -> tuple[str, Any, Any]:
    """Model path, tokenizer and the packed row plan (built, or read from ``data.preprocessed``);
    writes rejects.jsonl."""
    from keel.data import pipeline
    from keel.mitigation import warnings_for
    from keel.model.build import load_tokenizer, model_path

    path = model_path(cfg)
    tokenizer = load_tokenizer(path, cfg.model.trust_remote_code)
    if cfg.data.preprocessed:
        plan, rejects = _preprocessed(cfg, tokenizer, run_dir)
    else:
        extra = tuple(src for p in plugins for src in p.extra_sources())
        plan, rows = pipeline.build(cfg, tokenizer, extra, adjust_hook(plugins), schedule_hook(plugins))
        _write_rejects(run_dir, rows)
        rejects = len(rows)
    pipeline.settle_length(cfg, plan.report)  # trainer.epochs: max_steps is now the planned steps
    # Preprocessed rows already hold (or lack) replay and progressive mixing: those plugins have no rows to check.
    checked = [p for p in plugins if not (cfg.data.preprocessed and p.shapes_rows)]
    for warning in warnings_for(cfg, checked, plan.report):
        print(f"warning: {warning}")
    for note in plan.report["self_check"]["notes"]:
        print(f"note: {note}")
    _print_mixture(plan.report)
    if rejects:
        print(f"data: {rejects} rows rejected, see {run_dir / 'rejects.jsonl'}")
    return path, tokenizer, plan


def _preprocessed(cfg: Any, tokenizer: Any, run_dir: Path) -> tuple[Any, int]:
    """The rows of ``data.preprocessed`` and its reject count; its rejects.jsonl is copied into the run."""
    import shutil

    from keel.data import preprocessed_dir as preprocessed
    from keel.launch import runlock

    reading = runlock.acquire_shared(Path(cfg.data.preprocessed))  # refused while `keel preprocess` writes it
    try:
        plan, notes = preprocessed.load(cfg, tokenizer, redact(to_plain(cfg)))  # as report.json records it
        shutil.copyfile(Path(cfg.data.preprocessed) / "rejects.jsonl", run_dir / "rejects.jsonl")
    finally:
        runlock.release(reading)
    for note in notes:
        print(note)
    return plan, sum(s["rejected"] for s in plan.report["sources"].values())


def _summary_table(summary: dict) -> str:
    keys = ("world_size", "nodes", "zero_stage", "steps", "restarts", "preempted", "bad_steps", "loss_spikes",
            "rollbacks", "rolled_back_steps", "loss_first", "loss_last",
            *(("val_loss_last", "best_step", "best_val_loss", "early_stopped") if "best_step" in summary else ()),
            "tokens_trained", "tokens_per_s", "packing_efficiency", "trainable_params", "total_params", "wall_s",
            "hf_dir")
    lines = ["", "Keel run summary", "-" * 60]
    for k in keys:
        v = summary.get(k)
        lines.append(f"  {k:<20} {v:.4f}" if isinstance(v, float) else f"  {k:<20} {v}")
    lines.append(f"  {'tokens_per_source':<20} {summary['tokens_per_source']}")
    return "\n".join(lines)


def val_batches(val: Any, cfg: Any) -> list[list[dict]] | None:
    """Per rank, its validation micro-batches (``keel.train.validation.micro_batches``); None without validation."""
    if val is None:
        return None
    from keel.train.validation import micro_batches

    return micro_batches(val, cfg.cluster.num_workers, cfg.trainer.micro_batch_size)


def run_meta(cfg: Any, plan: Any, tokenizer: Any) -> dict:
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
            raise UserError(f"cannot resume: {key} changed since the checkpoint ({saved[key]!r} -> {value!r}); "
                             f"set trainer.resume_allow_changes=[{key}] to allow it, or trainer.resume=none")


def _start_step(cfg: Any, run_dir: Path, meta: dict) -> int:
    """The first step the workers may resume at (their rows are shipped from there on). The driver checks the
    checkpoint's structure; the workers hash its content, each the files it loads, and may fall back to the one
    before (trainer.resume_fallback=previous), whose step is then returned."""
    from keel.train import checkpoint as ckpt

    if cfg.trainer.resume != "auto":
        return 0
    try:
        chosen = ckpt.choose(run_dir, cfg.trainer.resume_fallback)
        world = cfg.cluster.num_workers
        if chosen is not None and ckpt.other_world(chosen, world):
            _check_elastic(cfg, ckpt.state(chosen), world)
            out = ckpt.to_universal(chosen)  # verifies every file first: the conversion reads them all
    except ckpt.CheckpointCorruption as err:
        raise UserError(f"{err}; set trainer.resume_fallback=previous to use the checkpoint before it") from err
    if chosen is None:
        return 0
    saved = ckpt.state(chosen)
    check_resumable(saved, meta, cfg.trainer.resume_allow_changes)
    print(f"resume: continuing from {chosen} (step {saved['step']})")
    if ckpt.other_world(chosen, world):
        print(f"resume: elastic: the checkpoint was written by {saved['world_size']} workers, this run has {world}; "
              f"loading DeepSpeed's universal checkpoint {out} (per-parameter fp32 weights and Adam moments)")
    earlier = [c for c in ckpt.complete(run_dir) if c.name < chosen.name]
    if cfg.trainer.resume_fallback == "previous" and earlier:
        return ckpt.state(earlier[-1])["step"]
    return saved["step"]


def _check_elastic(cfg: Any, saved: dict, world: int) -> None:
    if cfg.deepspeed.stage not in (1, 2, 3):
        raise UserError(f"cannot resume on {world} workers a checkpoint written by {saved['world_size']}: "
                         "deepspeed.stage 0 has no universal checkpoint")


def _hold_run_dir(run_dir: Path) -> Any:
    """One run per run directory: its lock (held since Hydra's start for `keel train`, by keel.cli.hydra_callbacks),
    then what a crashed run left in checkpoints/ finished or undone (safe only under the lock)."""
    from keel.launch import runlock
    from keel.train.checkpoint import clean_stale

    lock = runlock.acquire(run_dir, "keel train")
    for note in clean_stale(run_dir):
        print(f"checkpoint: {note}")
    return lock


def _explained(err: Exception, run_dir: Path, started: float) -> Exception:
    """The error to report for a failed worker group: the stalled ranks, a corrupt checkpoint, or ``err`` itself."""
    from keel.train import watchdog

    dumps = watchdog.reports(run_dir, since=started)
    if dumps:  # the workers ended themselves after a stall: say where, not just "actor died"
        return RuntimeError(watchdog.stalled_message(dumps))
    corrupt = corruption_in(err)
    if corrupt:  # found by the ranks hashing what they load: a user decision, not a traceback
        return UserError(f"{corrupt}; set trainer.resume_fallback=previous to use the checkpoint before it")
    return err


def corruption_in(err: BaseException) -> str | None:
    """The CheckpointCorruption message a worker raised, from the error (or its causes) Ray Train reports."""
    import re

    seen: BaseException | None = err
    while seen is not None:
        m = re.search(r"CheckpointCorruption: (checkpoint [^\n]+)", str(seen))
        if m:
            return m.group(1)
        seen = seen.__cause__ or seen.__context__
    return None


# Exit status of a run stopped by preemption after checkpointing (EX_TEMPFAIL): a launcher
# requeues the job, and the same run directory resumes from that checkpoint.
EXIT_PREEMPTED = 75


def _on_preemption(run_dir: Path) -> None:
    """SIGTERM/SIGUSR1 ask every rank to finish its step, checkpoint and stop."""
    import signal

    from keel.train.loop import PREEMPT_FLAG

    (run_dir / PREEMPT_FLAG).unlink(missing_ok=True)

    def handler(signum: int, frame: Any) -> None:
        print(f"keel: received {signal.Signals(signum).name}: checkpointing after the current step", flush=True)
        (run_dir / PREEMPT_FLAG).write_text(str(signum))

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, handler)


def _slurm_job() -> dict:
    """The Slurm job and how often it was requeued, when the driver runs inside one."""
    if "SLURM_JOB_ID" not in os.environ:
        return {}
    return {"slurm_job_id": os.environ["SLURM_JOB_ID"],
            "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0"))}


def run_training(cfg: Any, run_dir: Path) -> dict:
    """Everything ``keel train`` does after the config is composed and validated."""
    from omegaconf import OmegaConf

    from keel.data.rank_bundles import step_bundles, step_source_tokens
    from keel.launch import ray_train
    from keel.model.attention import expected

    t0 = time.perf_counter()
    lock = _hold_run_dir(run_dir)
    print(f"attention backend: {expected(cfg.model.attention, cfg.cluster.use_gpu)}")  # the workers resolve it
    attention = cfg.model.attention
    from keel.mitigation import configured

    plugins = configured(cfg)
    path, tokenizer, plan = prepare_data(cfg, run_dir, plugins)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(redact(to_plain(cfg))))  # as plugins left it
    t = cfg.trainer
    world = cfg.cluster.num_workers
    meta = run_meta(cfg, plan, tokenizer)
    start = _start_step(cfg, run_dir, meta)
    # The plan is a pure function of the config: resuming ships exactly the rows from the
    # checkpoint's step on, nothing re-read or replayed (the last step's rows if already done).
    first = min(start, t.max_steps - 1)
    bundles = [b for b in step_bundles(plan, world, t.grad_accum, t.micro_batch_size) if b["step"] >= first]
    sst = step_source_tokens(plan, world, t.grad_accum, t.micro_batch_size)
    (run_dir / STARTS).unlink(missing_ok=True)
    ray_train.init_ray(cfg)
    write_run_context(run_dir, cfg, plan.report)  # W&B group and data report for the rank-0 logger
    _on_preemption(run_dir)  # after ray.init, which installs its own SIGTERM handler
    started = time.time()
    try:
        result = ray_train.run(cfg, run_dir, path, attention, bundles, sst, plan.source_names,
                               {**meta, "attempt": lock.attempt},  # every checkpoint names the run that wrote it
                               val_batches(plan.val, cfg))
    except Exception as err:
        explained = _explained(err, run_dir, started)
        if explained is err:
            raise
        raise explained from err
    restarts = len((run_dir / STARTS).read_text().splitlines()) - 1
    summary = {"world_size": world, "zero_stage": cfg.deepspeed.stage, **result, "restarts": restarts,
               "packing_efficiency": plan.report["packing_efficiency"],
               "tokens_per_source": {k: v["tokens"] for k, v in plan.report["sources"].items()},
               "mixture": plan.report["sources"], "mixture_schedule": plan.report.get("schedule"),
               "attention": result.get("attention", attention), "model_path": path,
               "wall_s": time.perf_counter() - t0, "pid": os.getpid(), **_slurm_job()}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(_summary_table(summary))
    return summary
