"""The training loop run by every data-parallel worker (engine-agnostic about Ray).

One optimizer step consumes one bundle of ``grad_accum * micro_batch_size`` packed rows
per rank. The loss is the sum of token losses divided by the global count of supervised
tokens in the step (all-reduced over ranks and micro-steps).
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from keel.config import to_plain
from keel.core.collectives import all_reduce_sum
from keel.core.loss import backward_scale, token_weights
from keel.data.masking import IGNORE
from keel.eval.hook import due
from keel.train import checkpoint as ckpt
from keel.train import export as exports
from keel.train import startup
from keel.train.deepspeed import ds_config
from keel.train.flops import device_peak, matmul_params, step_flops
from keel.train.forward import micro_loss_sum
from keel.train.guards import BadStepGuard, Rollbacks, SpikeDetector, checkpoint_due, is_bad
from keel.train.head import find as find_loss_head
from keel.train.schedule import lr_lambda
from keel.train.watchdog import Watchdog

# Written by the driver on SIGTERM/SIGUSR1; every rank checkpoints after the current step.
PREEMPT_FLAG = "PREEMPT"


@dataclass
class WorkerInfo:
    """What a worker needs besides the config and its bundles."""

    rank: int
    world_size: int
    run_dir: Path
    model_path: str
    attention: str
    step_source_tokens: list[list[int]]
    source_names: list[str]
    run_meta: dict  # fingerprints stored with every checkpoint (see keel.launch.driver)
    val_batches: list[dict] | None = None  # this rank's validation micro-batches (keel.train.validation)


def _seed_all(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_engine(cfg: Any, info: WorkerInfo, plugins: list, load_universal: bool = False) -> tuple[Any, Any]:
    """Model (as the plugins wrap it), AdamW over its trainable parameters and the LR schedule
    in a DeepSpeed engine."""
    import deepspeed

    from keel.model.build import load_model

    startup.skip_shm_comm_op()  # on CPU DeepSpeed would JIT-build, under a lock file, an op training never uses
    # Joins the process group Ray Train created (gloo on CPU, NCCL on GPU).
    deepspeed.init_distributed(dist_backend="nccl" if cfg.cluster.use_gpu else "gloo")
    ds = ds_config(cfg, info.world_size, load_universal)
    hf_ds = None
    if cfg.deepspeed.stage == 3:
        # Keeps transformers' zero.Init active so weights load already partitioned.
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds = HfDeepSpeedConfig(ds)
    model = load_model(info.model_path, cfg, info.attention)
    for plugin in plugins:
        model = plugin.wrap_model(model, cfg)
    _install_loss_head(model, info.rank)
    t = cfg.trainer
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t))  # trainer.lr_schedule
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds)
    return engine, hf_ds


def _install_loss_head(model: Any, rank: int) -> None:
    """The chunked-loss LM head (keel.train.head), before DeepSpeed hooks the modules; rank 0 says why not."""
    from keel.train.head import install

    _, why = install(model)
    if why and rank == 0:
        print(f"warning: the loss uses full-vocabulary logits (memory grows with tokens x vocabulary): {why}",
              flush=True)


def train_step(engine: Any, bundle: dict, cfg: Any, world: int, stop_requested: bool = False,
               plugins: list | tuple = (), save_requested: bool = False, poison: bool = False,
               spike: bool = False) -> dict:
    """Forward/backward over the bundle's micro-batches and one optimizer step.

    ``stop_requested`` (this rank saw a preemption request) and ``save_requested`` (rank 0's
    clock says a time-based checkpoint is due) ride on the step's all-reduce, so every rank
    agrees to stop or checkpoint after the same step without an extra collective. The
    plugins' ``after_backward`` runs between the last backward and the optimizer step.

    Non-finite steps are skipped on every rank: the step's loss is all-reduced before the last
    backward; when it is not finite, every rank's last backward is scaled by NaN, so the global
    gradient norm (all-reduced by DeepSpeed) is non-finite everywhere and DeepSpeed's ZeRO
    optimizer drops the update and zeroes the gradients (as it does for any non-finite gradient
    norm). The LR scheduler, which DeepSpeed does not advance then, is stepped here so the LR
    stays a function of the data position. ``poison`` (fault.nan_at_steps) NaNs this rank's loss;
    ``spike`` (fault.spike_at_steps) multiplies it by 1e3, in the reported loss and the backward alike.
    """
    batch = _StepBatch.of(bundle, cfg.trainer.loss_norm)
    seq_lens = batch.seq_lens
    norm, supervised, real_global, sum_sq, stop, save = all_reduce_sum(
        [batch.local_norm, float((batch.targets != IGNORE).sum()), float(seq_lens.sum()), float((seq_lens**2).sum()),
         float(stop_requested), float(save_requested)])
    scale = backward_scale(norm, world)
    lr = engine.lr_scheduler.get_last_lr()[0]
    head = find_loss_head(getattr(engine, "module", None))
    micro = cfg.trainer.micro_batch_size
    last = cfg.trainer.grad_accum - 1
    loss_sum, loss_total, extra = 0.0, 0.0, {}
    for a in range(cfg.trainer.grad_accum):
        part = _micro_loss(engine, head, batch, slice(a * micro, (a + 1) * micro))
        if poison and a == 0:
            part = part * float("nan")
        if spike and a == 0:
            part = part * 1e3
        loss_sum += float(part.detach())
        if a == last:
            (loss_total,) = all_reduce_sum([loss_sum])
            if not math.isfinite(loss_total):  # every rank: non-finite gradients, DeepSpeed skips the update
                part = part * float("nan")
        engine.backward(part * scale, scale_wrt_gas=False)
        if a == last:
            extra = {k: v for p in plugins for k, v in p.after_backward(engine).items()}
        engine.step()
    grad_norm = engine.get_global_grad_norm()
    grad_norm = float(grad_norm) if grad_norm is not None else None
    applied = getattr(engine, "was_step_applied", lambda: True)()  # DeepSpeed: False when it skipped the update
    bad = is_bad(loss_total, grad_norm, applied)
    if bad and applied:
        raise RuntimeError(f"a non-finite step was applied to the weights: deepspeed.stage={cfg.deepspeed.stage} "
                           "does not skip non-finite gradients; use deepspeed.stage 1, 2 or 3")
    if bad and engine.lr_scheduler is not None:
        engine.lr_scheduler.step()
    capacity = batch.ids.numel() * world
    return {"loss": loss_total / max(norm, 1.0), "lr": lr, "supervised_tokens": int(supervised),
            "tokens": int(real_global), "sum_sq_lengths": sum_sq, "stop": stop > 0, "save": save > 0,
            "bad": bad, "packing_efficiency": real_global / capacity, "grad_norm": grad_norm, **extra}


@dataclass
class _StepBatch:
    """A bundle's rows as host tensors, with the per-token loss weights."""

    ids: torch.Tensor
    targets: torch.Tensor
    pos: torch.Tensor
    seq_lens: np.ndarray  # [R, D] example lengths per row, 0-padded
    weights: torch.Tensor
    local_norm: float

    @classmethod
    def of(cls, bundle: dict, loss_norm: str) -> _StepBatch:
        ids = torch.tensor(bundle["input_ids"], dtype=torch.long)  # copies: Ray hands out read-only arrays
        targets = torch.tensor(bundle["targets"], dtype=torch.long)
        pos = torch.tensor(bundle["position_ids"], dtype=torch.long)
        weights, local_norm = token_weights(targets, pos, loss_norm)
        return cls(ids, targets, pos, np.asarray(bundle["seq_lens"], dtype=np.int64), weights, local_norm)


def _micro_loss(engine: Any, head: Any, batch: _StepBatch, sl: slice) -> torch.Tensor:
    """Σ w · CE of one micro-batch (rows ``sl``), every input on the engine's device."""
    return micro_loss_sum(engine, batch.ids[sl], batch.pos[sl], batch.targets[sl], batch.weights[sl],
                          batch.seq_lens[sl], head)


def _check_bundle(bundle: dict, step: int, rank: int) -> None:
    got = int(np.asarray(bundle["step"]).reshape(-1)[0])
    slot = int(np.asarray(bundle["slot"]).reshape(-1)[0])
    if (got, slot) != (step, rank):
        raise RuntimeError(f"data order broken: rank {rank} expected its rows of step {step}, "
                           f"got rank {slot}'s rows of step {got}")


def _flops_counter(model: Any, cfg: Any) -> Any:
    params = matmul_params(model)
    layers, d = model.config.num_hidden_layers, model.config.hidden_size
    return lambda tokens, sum_sq: step_flops(params, layers, d, tokens, int(sum_sq))


def _resolve_attention(cfg: Any, info: WorkerInfo) -> str:
    """The attention backend for ``model.attention``, resolved where the worker runs (its GPU, its flash-attn)
    and for what the model's attention needs (softcapping, sliding windows)."""
    from transformers import AutoConfig

    from keel.model.attention import model_features, resolve

    config = AutoConfig.from_pretrained(info.model_path, trust_remote_code=cfg.model.trust_remote_code)
    chosen = resolve(info.attention, cfg.cluster.use_gpu, model_features(config),
                     log=print if info.rank == 0 else None)
    if info.rank == 0:
        print(f"attention backend: {chosen} (model.attention={info.attention}, resolved on the workers)", flush=True)
    return chosen


def _attention_calls() -> dict:
    from keel.model.attention import CALLS

    return {k: v for k, v in CALLS.items() if v}


def _check_backend(name: str) -> None:
    """Fail rather than let a configured attention backend be silently skipped."""
    from keel.model.attention import CALLS

    if CALLS.get(name, 0) == 0:
        raise RuntimeError(f"attention backend {name!r} was configured but never executed")


def _checkpoint_to_resume(cfg: Any, info: WorkerInfo) -> tuple[Path | None, bool]:
    """The newest complete checkpoint (trainer.resume=auto), and whether another world size wrote it."""
    if cfg.trainer.resume != "auto":
        return None, False
    # a collective: each rank hashes the files it will load, and all agree on the verdict
    chosen = ckpt.choose(info.run_dir, cfg.trainer.resume_fallback, info.rank, info.world_size)
    if chosen is None:
        return None, False
    return chosen, ckpt.other_world(chosen, info.world_size)


def _resume(engine: Any, info: WorkerInfo, chosen: Path | None, elastic: bool) -> int:
    """Load ``chosen`` (its universal conversion when ``elastic``); returns its step (0 without one)."""
    if chosen is None:
        return 0
    step = _reload(engine, info, chosen, elastic)
    if info.rank == 0:
        how = f" (universal checkpoint: written by {ckpt.saved_world(chosen)} workers, now {info.world_size})"
        print(f"resumed from {chosen} (step {step}){how if elastic else ''}")
    return step


def _maybe_fault(cfg: Any, info: WorkerInfo, step: int) -> None:
    """Test-only fault injector: kill one rank once, or hang one, right after optimizer step ``step``."""
    f = cfg.fault
    if f.hang_rank == info.rank and f.hang_at_step == step:
        print(f"fault injector: rank {info.rank} hangs after step {step}", flush=True)
        threading.Event().wait()  # forever: the other ranks block in the next collective
    marker = info.run_dir / "fault_fired"
    if f.at_step == step and f.kill_rank == info.rank and not marker.exists():
        marker.write_text(str(step))
        print(f"fault injector: killing rank {info.rank} after step {step}", flush=True)
        os._exit(17)


def _step_metrics(m: dict, dt: float, t_data: float, flops: float, peak: float | None, world: int) -> dict:
    return {**m, "tokens_per_s": m["tokens"] / dt, "step_s": dt, "data_wait_s": t_data,
            "data_wait_share": t_data / dt, "tflops_per_device": flops / dt / world / 1e12,
            "mfu": flops / dt / world / peak if peak else None}


def _save(engine: Any, cfg: Any, info: WorkerInfo, step: int) -> Path:
    meta = {"world_size": info.world_size, **info.run_meta, "model": exports.model_record(cfg, info.model_path)}
    return ckpt.save(engine, info.run_dir, step, info.rank, cfg.trainer.keep_checkpoints, meta)


def _next_bundle(bundles: Iterator[dict], step: int, rank: int) -> dict:
    """The bundle of ``step``; after an in-place restart the stream may begin earlier."""
    while True:
        bundle = next(bundles)
        if int(np.asarray(bundle["step"]).reshape(-1)[0]) >= step:
            _check_bundle(bundle, step, rank)
            return bundle


def train(cfg: Any, info: WorkerInfo, bundles: Iterator[dict]) -> dict:
    """Run (or resume) ``trainer.max_steps`` optimizer steps; returns rank 0's results."""
    from keel.mitigation import build as build_mitigations

    _seed_all(cfg.trainer.seed)
    info = replace(info, attention=_resolve_attention(cfg, info))
    plugins = build_mitigations(cfg)
    chosen, elastic = _checkpoint_to_resume(cfg, info)
    with startup.watch(info.rank, "engine start-up"):  # past a bound, says what it waits on
        engine, _hf_ds = build_engine(cfg, info, plugins, load_universal=elastic)
    plugin_info = {k: v for p in plugins for k, v in p.setup_engine(engine, cfg, info).items()}  # base weights
    engine.train()
    start = _resume(engine, info, chosen, elastic)
    logger = None
    if info.rank == 0:
        from keel.tracking.logger import RunLogger

        logger = RunLogger(cfg, info.run_dir, to_plain(cfg), cfg.trainer.max_steps, start)
    flops_of = _flops_counter(engine.module, cfg)
    peak = device_peak(cfg.cluster.use_gpu, cfg.trainer.peak_tflops)
    t_start, last_saved, preempted = time.perf_counter(), start, False
    guard, spikes = _guards(cfg, logger)
    last_ckpt_t, nan_steps, spike_steps = time.monotonic(), set(cfg.fault.nan_at_steps), set(cfg.fault.spike_at_steps)
    rolls = Rollbacks.carried(logger.history if logger is not None else [])
    restore = (chosen, elastic)  # what a spike rollback reloads: the newest checkpoint this group loaded or wrote
    best = _best(cfg, info, logger)  # the best val/loss (None without validation rows)
    evaluator = _evaluator(cfg, info, logger, best)
    dog = Watchdog(cfg.trainer.step_timeout_s, info.run_dir, info.rank)
    if evaluator and start == 0 and cfg.eval.every_n_steps:
        with dog.watch(0, "evaluation"):
            evaluator(engine, 0)  # the baseline: the model before any update
    stopped, end = best is not None and best.stop, start  # stopped: an early-stopped run, resumed
    for step in range(start, start if stopped else cfg.trainer.max_steps):
        dog.arm(step + 1)  # data wait, step, evaluation and checkpoint of this iteration
        t0 = time.perf_counter()
        bundle = _next_bundle(bundles, step, info.rank)
        t_data = time.perf_counter() - t0
        time_due = info.rank == 0 and checkpoint_due(time.monotonic(), last_ckpt_t, cfg.trainer.checkpoint_every_s)
        m = train_step(engine, bundle, cfg, info.world_size, (info.run_dir / PREEMPT_FLAG).exists(), plugins,
                       save_requested=time_due, poison=info.rank == 0 and step + 1 in nan_steps,
                       spike=info.rank == 0 and step + 1 in spike_steps)
        dt = time.perf_counter() - t0
        if step == start:
            _check_backend(info.attention)
        flops = flops_of(m["tokens"], m.pop("sum_sq_lengths"))
        preempted, timed, bad = m.pop("stop"), m.pop("save"), m.pop("bad")
        guard.update(bad)
        spiked = logger is not None and _warn(step + 1, m, bad, guard, spikes)
        # Before this step's checkpoint below: a rollback must never be preceded by saving the spiked weights.
        rolled_to = _spike_rollback(engine, cfg, info, spiked, restore, step + 1)
        if rolled_to is not None and spikes is not None:
            spikes.forget_last()  # the rolled-back loss stays out of the window the next losses are judged by
        rolled = rolls.record(step + 1, rolled_to)
        if logger is not None:
            src = dict(zip(info.source_names, info.step_source_tokens[step]))
            logger.log({"step": step + 1, **_step_metrics(m, dt, t_data, flops, peak, info.world_size),
                        "bad_step": bad, "bad_steps": guard.total, "loss_spikes": spikes.total, **rolled,
                        **{f"data/tokens/{k}": v for k, v in src.items()}})
        guard.check(step + 1)  # same decision on every rank: it rests on all-reduced values
        improved = False
        if evaluator and not preempted and _eval_due(step + 1, cfg, best):
            improved = evaluator(engine, step + 1)  # before the checkpoint: a resume from it keeps this evaluation
        every = cfg.trainer.checkpoint_every
        periodic = bool(every) and (step + 1) % every == 0
        keep_best = improved and cfg.trainer.save_best  # the best step needs its checkpoint, now
        if preempted or keep_best or ((periodic or timed) and step + 1 < cfg.trainer.max_steps):
            restore = (_save(engine, cfg, info, step + 1), False)
            last_saved, last_ckpt_t = step + 1, time.monotonic()
        if keep_best:
            ckpt.mark_best(info.run_dir, step + 1, info.rank)
        end, stopped = step + 1, best is not None and best.stop
        if preempted or stopped:
            break
        if exports.due(step + 1, cfg.trainer.export_every, cfg.trainer.max_steps):
            exports.save_along(info.run_dir, step + 1, info.rank, cfg.trainer.keep_exports,
                               lambda out: _export(engine, cfg, info, plugins, out))
        _maybe_fault(cfg, info, step + 1)
        dog.disarm()
    dog.close()
    counts = {"bad_steps": guard.total, "loss_spikes": spikes.total if spikes else 0, "rollbacks": rolls.count,
              "rolled_back_steps": rolls.steps}
    if stopped and info.rank == 0:
        print(f"early stopping: val/loss did not improve for {best.since} evaluations "
              f"(trainer.early_stopping_patience={best.patience}); the run ends at step {end}, "
              f"best step {best.step} (val/loss {best.loss:.4f})", flush=True)
    return _finish(engine, cfg, info, logger, plugins, start, last_saved, preempted, time.perf_counter() - t_start,
                   {**plugin_info, **counts, **_best_summary(best, stopped)}, end=end)


def _best_summary(best: Any, stopped: bool) -> dict:
    """``summary.json``'s validation fields: the best step and val/loss, and whether the run stopped early."""
    if best is None:
        return {}
    return {**best.summary(), "early_stopped": stopped}


def _eval_due(step: int, cfg: Any, best: Any) -> bool:
    """Evaluation points: every ``eval.every_n_steps`` and the last step; with validation, the last step too."""
    last = step == cfg.trainer.max_steps
    return due(step, cfg.eval.every_n_steps, cfg.trainer.max_steps) or (best is not None and last)


def _best(cfg: Any, info: WorkerInfo, logger: Any) -> Any:
    """The best-val/loss tracker, carried on from the evaluations before a resume (rank 0 reads them and
    every rank takes its state: a collective); None when the run has no validation rows."""
    if info.val_batches is None:
        return None
    from keel.core.collectives import all_gather
    from keel.train.validation import Best

    t = cfg.trainer
    best = Best(t.early_stopping_patience, t.early_stopping_min_delta)
    if logger is not None:
        best.replay(logger.eval_history)
    best.step, best.loss, best.since, best.last = all_gather((best.step, best.loss, best.since, best.last))[0]
    return best


def _eval_sets(cfg: Any, info: WorkerInfo) -> tuple[Any, Any]:
    """The tokenizer and the sets of keel.eval.hook (forgetting text, pass@k prompts)."""
    from keel.eval import hook
    from keel.model.build import load_tokenizer

    tokenizer = load_tokenizer(info.model_path, cfg.model.trust_remote_code)
    sets = hook.load_sets(cfg, tokenizer)
    if sets.rejected and info.rank == 0:
        reasons = sorted({r["reason"] for r in sets.rejected})
        print(f"warning: eval.forgetting.source: {len(sets.rejected)} rows not evaluated ({'; '.join(reasons)[:300]}); "
              f"perplexity uses the {len(sets.sequences)} others", flush=True)
    return tokenizer, sets


def _evaluator(cfg: Any, info: WorkerInfo, logger: Any, best: Any) -> Any:
    """``evaluator(engine, step) -> improved`` for ``eval.every_n_steps`` and the validation loss (None when
    both are off): every rank measures, rank 0 warns and logs (keel.eval.hook, keel.train.validation);
    ``improved``: this evaluation's val/loss is the best so far (``best`` updated alike on every rank)."""
    hooks = cfg.eval.every_n_steps > 0 and bool(cfg.eval.tasks)
    if not hooks and best is None:
        return None
    from keel.eval import hook
    from keel.train import validation

    tokenizer, sets = _eval_sets(cfg, info) if hooks else (None, None)

    def run(engine: Any, step: int) -> bool:
        val = validation.measure(engine.module, info.val_batches, info.source_names) if best is not None else {}
        improved = bool(val) and step > 0 and best.update(step, val["val/loss"])
        out = hook.evaluate(engine.module, tokenizer, sets, cfg, step, info.rank, info.world_size) if hooks else None
        if logger is None:
            return improved
        row, table = ({"step": step}, []) if out is None else out
        if hooks:
            baseline = next((r for r in logger.eval_history if "forgetting/ppl" in r), None)
            row = hook.with_rise(row, baseline)
            for warning in hook.warnings(row, baseline, cfg):
                print(f"warning: step {step}: {warning}", flush=True)
        if val:
            print(f"validation: step {step}: val/loss {val['val/loss']:.4f}" + (
                f"; best {best.loss:.4f} at step {best.step}" if best.step else ""), flush=True)
        logger.log_eval({**row, **val}, table)
        return improved

    return run


def _guards(cfg: Any, logger: Any) -> tuple[BadStepGuard, SpikeDetector | None]:
    """The bad-step guard (every rank) and, on rank 0, the loss-spike detector, both carried on from
    the metrics of the steps before a resume."""
    t = cfg.trainer
    history = logger.history if logger is not None else []
    last = history[-1] if history else {}
    guard = BadStepGuard(t.max_bad_steps, last.get("bad_steps", 0))
    if logger is None:
        return guard, None
    # As the live detector: skipped steps were never judged, rolled-back spikes were forgotten.
    losses = [r["loss"] for r in history if not r.get("bad_step") and "rolled_back_to" not in r]
    return guard, SpikeDetector(t.spike_window, t.spike_z, losses[-max(t.spike_window, 1):], last.get("loss_spikes", 0))


def _warn(step: int, m: dict, bad: bool, guard: BadStepGuard, spikes: SpikeDetector) -> bool:
    """Rank 0's warnings about a skipped non-finite step or a loss spike; whether the step's loss was a spike."""
    if bad:
        print(f"warning: step {step}: non-finite loss ({m['loss']}) or gradient norm ({m['grad_norm']}); the optimizer "
              f"step was skipped on every rank ({guard.consecutive} in a row, {guard.total} in the run; "
              f"trainer.max_bad_steps={guard.max_bad})", flush=True)
        return False
    z = spikes.observe(m["loss"])
    if z is not None:
        print(f"warning: step {step}: loss spike: loss {m['loss']:.4f} is {z:.1f} standard deviations above the "
              f"mean of the previous losses (trainer.spike_window={spikes.window}, trainer.spike_z={spikes.z}); "
              f"{spikes.total} spikes in the run", flush=True)
    return z is not None


def _spike_rollback(engine: Any, cfg: Any, info: WorkerInfo, spiked: bool, restore: tuple[Path | None, bool],
                    step: int) -> int | None:
    """Every rank, with trainer.spike_rollback: on rank 0's loss spike at ``step`` reload ``restore`` (checkpoint,
    universal) and keep the LR at the data position; returns the checkpoint's step (None: no rollback)."""
    if not cfg.trainer.spike_rollback:
        return None
    (votes,) = all_reduce_sum([float(spiked)])  # only rank 0 runs the detector; every rank must decide alike
    if votes == 0:
        return None
    path, universal = restore
    to = ckpt.state(path)["step"] if path is not None and path.is_dir() else None
    if to is None or to >= step:
        if info.rank == 0:
            print(f"warning: step {step}: loss spike not rolled back: no complete checkpoint of this run before step "
                  f"{step} (trainer.checkpoint_every={cfg.trainer.checkpoint_every}); training goes on from the spiked "
                  "weights", flush=True)
        return None
    ckpt.verify_agreed(path, info.rank, info.world_size)  # each rank hashes what it reloads
    loaded = _reload(engine, info, path, universal)
    assert loaded == to, f"{path} holds step {loaded}, its {ckpt.STATE} says {to}"
    for _ in range(step - to):  # the LR stays a function of the data position: the next step is step + 1's
        engine.lr_scheduler.step()
    if info.rank == 0:
        print(f"warning: step {step}: loss spike; rolled back to checkpoint step {to} (steps {to + 1}..{step} "
              f"undone; their data is skipped, training goes on with step {step + 1}'s)", flush=True)
    return to


def _reload(engine: Any, info: WorkerInfo, path: Path, universal: bool) -> int:
    """Load ``path`` (its universal conversion when ``universal``) into the live engine; returns its step."""
    if engine.load_universal_checkpoint() != universal:
        # An elastic start built the engine to read universal checkpoints; the ones this group writes are not.
        engine._config.load_universal_checkpoint = universal
    return ckpt.load(engine, ckpt.universal_dir(path) if universal else path, info.rank)


def _export(engine: Any, cfg: Any, info: WorkerInfo, plugins: list, out: Path | None = None) -> dict:
    """Model artefacts under ``out`` (None: the final ones, in the run dir): a plugin's own export (LoRA
    adapters) or the full HF model in ``hf/`` (the final one only with trainer.save_hf)."""
    full = out is not None or cfg.trainer.save_hf
    out = info.run_dir if out is None else out
    for plugin in plugins:
        result = plugin.export(engine, cfg, info, out, full)
        if result is not None:
            return result
    if not full:
        return {"hf_dir": None}
    hf_dir = out / "hf"
    ckpt.save_hf(engine, info.model_path, hf_dir, info.rank)
    return {"hf_dir": str(hf_dir)}


def _finish(engine: Any, cfg: Any, info: WorkerInfo, logger: Any, plugins: list, start: int, last_saved: int,
            preempted: bool, train_s: float, plugin_info: dict | None = None, end: int | None = None) -> dict:
    """Final checkpoint at ``end`` (the last step trained; max_steps unless stopped early) and model export
    (skipped when preempted); rank 0's run result."""
    from keel.model.build import param_counts

    exported = {"hf_dir": None}
    end = cfg.trainer.max_steps if end is None else end
    if not preempted:
        if last_saved < end:
            _save(engine, cfg, info, end)
        exported = _export(engine, cfg, info, plugins)
    if logger is None:
        return {}
    trainable, total = param_counts(engine.module)
    result = {**logger.totals(), "resumed_from_step": start, "train_s": train_s, "preempted": preempted,
              "checkpoint_dir": str(ckpt.complete(info.run_dir)[-1]), **exported,
              "trainable_params": trainable, "total_params": total, "attention": info.attention,
              "attention_calls": _attention_calls(),
              **(plugin_info or {})}
    if logger.eval_history:
        result["eval"] = logger.eval_history[-1]  # the last in-training evaluation
    logger.finish(result)
    return result
