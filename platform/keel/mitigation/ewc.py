"""Elastic weight consolidation (EWC): a Fisher-weighted pull of the weights back to the base model.

The SFT objective of an optimizer step becomes ``loss + (λ/2)·Σ_i F_i (θ_i − θ*_i)²`` where θ*
are the base weights and F their diagonal empirical Fisher on a reference set (``mitigation.ewc``):

- F is the mean, over ``samples`` reference sequences, of the squared gradient of each
  sequence's token-mean NLL at θ* (per sequence, not per micro-batch: a batch-mean gradient
  squared would shrink with the batch, and with it λ's meaning). It is estimated once, at
  step 0, under the run's DeepSpeed engine, before a checkpoint is resumed (so on the base
  weights): every rank runs the same sequence, so the ZeRO-3 reduce-scatter leaves exactly
  that sequence's gradient in each rank's partition; nothing is stepped, and the gradients
  are zeroed afterwards.
- F and θ* stay partitioned like the parameters: each rank keeps its own flat fp32 partition
  of each trainable parameter (``safe_get_local_grad`` / ``safe_get_local_fp32_param``), saved
  as ``<run>/ewc/rank_NNNNN.pt`` with a fingerprint (base model path, reference tokens, world
  size, parameter layout, samples) and reused when it matches (a resume, a restarted worker group).
- The penalty's gradient ``λ·F·(θ − θ*)`` is added to each rank's local fp32 gradient partition
  after the step's last backward and before the optimizer step, so clipping and AdamW see the
  whole objective. The SFT loss is already the mean over the step's supervised tokens, so
  the penalty is added once per step, unscaled; its value is summed over ranks for logging
  (``ewc_penalty``), the logged ``loss`` stays the SFT loss alone.

Scale of λ: the empirical Fisher approximates the Hessian of the reference set's mean
per-sequence loss, so ``½·Σ F_i (θ_i − θ*_i)²`` is the diagonal quadratic estimate of how
much the fine-tune raises that loss. λ = 1 (the default) weighs that estimate like the SFT
loss itself; larger λ holds the base closer.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from keel.data.masking import IGNORE
from keel.errors import ConfigError
from keel.mitigation.base import Mitigation
from keel.train.collectives import all_reduce_sum
from keel.train.loss import token_loss_sum

EWC_DIR = "ewc"
META = "meta.json"
REFUSE_STAGE = ("config error: mitigation.ewc needs deepspeed.stage=3 (it keeps the Fisher and the anchor "
                "in each rank's ZeRO-3 partitions), got stage {stage}")

Sequence = tuple[np.ndarray, np.ndarray]  # input_ids, targets (pre-shifted, -100 not trained)


def sequence_nll(model: Any, ids: np.ndarray, targets: np.ndarray) -> torch.Tensor:
    """Token-mean NLL of one sequence over its trained targets."""
    device = next(model.parameters()).device
    x = torch.as_tensor(ids, dtype=torch.long, device=device).unsqueeze(0)
    y = torch.as_tensor(targets, dtype=torch.long, device=device).unsqueeze(0)
    pos = torch.arange(x.shape[1], device=device).unsqueeze(0)
    logits = model(input_ids=x, position_ids=pos).logits
    return token_loss_sum(logits, y) / max(1, int((y != IGNORE).sum()))


def dot64(a: torch.Tensor, b: torch.Tensor, chunk: int = 1 << 22) -> float:
    """Σ a·b accumulated in float64, a chunk at a time (no float64 copy of a whole partition)."""
    a, b = a.reshape(-1), b.reshape(-1)
    return sum(float(torch.dot(a[i:i + chunk].double(), b[i:i + chunk].double())) for i in range(0, a.numel(), chunk))


def penalty_terms(fisher: list[torch.Tensor], theta: list[torch.Tensor], anchor: list[torch.Tensor],
                  lam: float) -> tuple[float, list[torch.Tensor]]:
    """(Σ_i F_i (θ_i − θ*_i)², the gradients λ·F·(θ − θ*)) over matching flat tensors."""
    total, grads = 0.0, []
    for f, t, a in zip(fisher, theta, anchor):
        diff = t.float() - a
        weighted = f * diff
        total += dot64(weighted, diff)
        grads.append(lam * weighted)
    return total, grads


def trainable(engine: Any) -> list[tuple[str, Any]]:
    """The engine's trainable parameters, by name, in a fixed order."""
    return [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]


def local_param(p: Any) -> torch.Tensor:
    """This rank's flat fp32 master partition of a ZeRO-3 parameter."""
    from deepspeed.utils import safe_get_local_fp32_param

    return safe_get_local_fp32_param(p).detach()


def local_grad(p: Any) -> torch.Tensor:
    """This rank's flat fp32 gradient partition of a ZeRO-3 parameter (after backward, before step)."""
    from deepspeed.utils import safe_get_local_grad

    return safe_get_local_grad(p)


def set_local_grad(p: Any, value: torch.Tensor) -> None:
    from deepspeed.utils import safe_set_local_grad

    safe_set_local_grad(p, value)


def mean_squared_grads(sequences: list[Sequence], backward: Callable[[Sequence], None],
                       grads: Callable[[], list[torch.Tensor]]) -> list[torch.Tensor]:
    """Mean over ``sequences`` of the squared gradients ``grads()`` left by ``backward(sequence)``."""
    sums: list[torch.Tensor] = []
    for seq in sequences:
        backward(seq)
        gs = grads()
        sums = sums or [torch.zeros_like(g, dtype=torch.float32) for g in gs]
        for s, g in zip(sums, gs):
            s.addcmul_(g.float(), g.float())
    return [s / len(sequences) for s in sums]


def estimate_fisher(engine: Any, sequences: list[Sequence]) -> list[torch.Tensor]:
    """The Fisher in each rank's partitions (a collective: every rank runs every sequence, so the
    reduce-scatter leaves that sequence's gradient); no optimizer step, gradients zeroed afterwards."""
    params = [p for _, p in trainable(engine)]

    def backward(seq: Sequence) -> None:
        engine.optimizer.zero_grad()  # this backward overwrites the partitions instead of accumulating
        engine.backward(sequence_nll(engine, *seq), scale_wrt_gas=False)

    was_training = engine.training
    engine.eval()  # no dropout: the Fisher of the base model itself
    engine.set_gradient_accumulation_boundary(True)  # every backward lands in the fp32 partitions
    try:
        fisher = mean_squared_grads(sequences, backward, lambda: [local_grad(p) for p in params])
        engine.optimizer.zero_grad()
        for p in params:
            set_local_grad(p, torch.zeros_like(local_grad(p)))
    finally:
        engine.set_gradient_accumulation_boundary(None)  # back to DeepSpeed's micro-step counting
        engine.train(was_training)
    return fisher


def reference_set(options: Any, cfg: Any, model_path: str) -> list[Sequence]:
    """The first ``samples`` usable examples of ``options.data``, encoded like a training source."""
    from keel.data.pipeline import load_source
    from keel.data.template import TextEncoder
    from keel.model.build import load_tokenizer

    data = load_source(options.data, cfg, TextEncoder(load_tokenizer(model_path, cfg.model.trust_remote_code)))
    if len(data.input_ids) < options.samples:
        raise ConfigError(f"config error: mitigation.ewc.samples={options.samples} exceeds the "
                         f"{len(data.input_ids)} usable examples of mitigation.ewc.data "
                         f"({len(data.rejects)} rejected; see num_examples, packing.max_len)")
    return list(zip(data.input_ids, data.targets))[: options.samples]


def layout(engine: Any) -> list[list]:
    """Name and full shape of every trainable parameter (what the partitions are cut from)."""
    return [[n, list(getattr(p, "ds_shape", p.shape))] for n, p in trainable(engine)]


def fingerprint(model_path: str, sequences: list[Sequence], world_size: int, params: list[list]) -> str:
    """What the saved Fisher and anchor depend on: base model, reference tokens, world size, parameters."""
    h = hashlib.sha256(json.dumps({"model_path": model_path, "world_size": world_size, "params": params}).encode())
    for ids, targets in sequences:
        h.update(np.asarray(ids, np.int64).tobytes() + b"|" + np.asarray(targets, np.int64).tobytes() + b";")
    return h.hexdigest()[:16]


def rank_file(run_dir: Path, rank: int) -> Path:
    return run_dir / EWC_DIR / f"rank_{rank:05d}.pt"


def save_state(path: Path, fp: str, params: list[list], fisher: list[torch.Tensor], anchor: list[torch.Tensor]) -> None:
    """Write one rank's partitions atomically, with the parameter names and full shapes they belong to."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"fingerprint": fp, "params": params, "fisher": [f.cpu() for f in fisher],
                "anchor": [a.cpu() for a in anchor]}, tmp)
    os.replace(tmp, path)


def load_state(path: Path, fp: str, base: list[torch.Tensor]) -> tuple[list, list] | None:
    """(fisher, anchor) from ``path`` when its fingerprint matches and its anchor is ``base`` (the
    partitions of the base weights the engine holds now, bit for bit), else None."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, weights_only=True)
    except Exception as err:  # a torn or foreign file is recomputed, not trusted
        print(f"ewc: ignoring unreadable {path}: {err}", flush=True)
        return None
    if state.get("fingerprint") != fp or [t.shape for t in state["anchor"]] != [t.shape for t in base]:
        return None
    device = base[0].device if base else "cpu"
    anchor = [a.to(device) for a in state["anchor"]]
    if not all(torch.equal(a, b) for a, b in zip(anchor, base)):  # the weights at model.path changed
        print(f"ewc: {path} was estimated on other base weights; estimating again", flush=True)
        return None
    return [f.to(device) for f in state["fisher"]], anchor


def write_meta(info: Any, fp: str, sequences: list[Sequence], seconds: float) -> None:
    """``<run>/ewc/meta.json``: the fingerprint, the reference set's size and the estimate's cost."""
    meta = {"fingerprint": fp, "world_size": info.world_size, "samples": len(sequences),
            "reference_tokens": sum(int((t != IGNORE).sum()) for _, t in sequences),
            "model_path": info.model_path, "fisher_s": seconds}
    (info.run_dir / EWC_DIR / META).write_text(json.dumps(meta, indent=1))


def saved_seconds(run_dir: Path) -> float | None:
    """What the saved estimate cost (None when meta.json is missing)."""
    meta = run_dir / EWC_DIR / META
    return json.loads(meta.read_text())["fisher_s"] if meta.is_file() else None


def _all_ranks(flag: bool) -> bool:
    """True when ``flag`` holds on every rank."""
    return all_reduce_sum([float(not flag)])[0] == 0


class Ewc(Mitigation):
    name = "ewc"

    def __init__(self, options: Any) -> None:
        super().__init__(options)
        self.params: list = []
        self.fisher: list[torch.Tensor] = []
        self.anchor: list[torch.Tensor] = []

    def configure(self, cfg: Any) -> None:
        """Refuse ZeRO stages other than 3; check the reference set has ``samples`` usable sequences."""
        from keel.model.build import model_path

        if cfg.deepspeed.stage != 3:
            raise ConfigError(REFUSE_STAGE.format(stage=cfg.deepspeed.stage))
        seqs = reference_set(self.options, cfg, model_path(cfg))
        tokens = sum(int((t != IGNORE).sum()) for _, t in seqs)
        print(f"ewc: lam={self.options.lam:g}; Fisher over {len(seqs)} sequences of "
              f"{self.options.data.name!r} ({tokens} trained tokens)")

    def setup_engine(self, engine: Any, cfg: Any, info: Any) -> dict:
        """Load the run's Fisher and anchor partitions, or estimate them on the base weights and save them."""
        self.params = [p for _, p in trainable(engine)]
        seqs = reference_set(self.options, cfg, info.model_path)
        params = layout(engine)
        fp = fingerprint(info.model_path, seqs, info.world_size, params)
        path = rank_file(info.run_dir, info.rank)
        base = [local_param(p) for p in self.params]
        loaded = load_state(path, fp, base)
        reused = _all_ranks(loaded is not None)  # estimating is a collective: all ranks or none
        if reused:
            self.fisher, self.anchor = loaded
            seconds = saved_seconds(info.run_dir)
        else:
            t0 = time.perf_counter()
            self.anchor = [t.detach().clone() for t in base]
            self.fisher = estimate_fisher(engine, seqs)
            seconds = time.perf_counter() - t0
            save_state(path, fp, params, self.fisher, self.anchor)
            if info.rank == 0:
                write_meta(info, fp, seqs, seconds)
        if info.rank == 0:
            how = "reused from" if reused else f"estimated in {seconds:.1f}s, saved to"
            print(f"ewc: Fisher of {len(seqs)} reference sequences {how} {path.parent} (fingerprint {fp})", flush=True)
        return {"ewc_fingerprint": fp, "ewc_fisher_s": seconds, "ewc_fisher_reused": reused}

    def after_backward(self, engine: Any) -> dict:
        """Add λ·F·(θ − θ*) to each local gradient partition; the penalty (summed over ranks) for the step's metrics."""
        lam = self.options.lam
        theta = [local_param(p) for p in self.params]
        local, grads = penalty_terms(self.fisher, theta, self.anchor, lam)
        for p, g in zip(self.params, grads):
            set_local_grad(p, local_grad(p) + g)
        return {"ewc_penalty": lam / 2 * all_reduce_sum([local])[0]}
