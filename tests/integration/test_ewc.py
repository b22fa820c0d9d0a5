"""EWC under DeepSpeed ZeRO-3: Fisher, anchor, penalty and its gradient against a hand computation.

The workers keep everything partitioned; only the tests gather (from the saved per-rank
partition files, a checkpoint, or DeepSpeed's full-tensor getters) and recompute by hand on
a plain, unpartitioned copy of the base model.
"""

from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from tests.conftest import compose

from .conftest import keel_train

pytestmark = pytest.mark.integration

IGNORE = -100
LAM = 1000.0  # large enough that the penalty's gradient stands well above fp32 rounding of the SFT gradient
SAMPLES = 4
OVERRIDES = ["mitigation=ewc", f"mitigation.ewc.samples={SAMPLES}", f"mitigation.ewc.lam={LAM}",
             "trainer.micro_batch_size=1", "trainer.grad_accum=2", "trainer.warmup_steps=0", "logger=none"]


def _bundle(step: int, rank: int, rows: int, length: int = 32, vocab: int = 2000) -> dict:
    """One rank's rows of a step: random tokens, every next token trained, one example per row."""
    gen = torch.Generator().manual_seed(100 * step + rank)
    ids = torch.randint(3, vocab, (rows, length), generator=gen)
    targets = torch.full_like(ids, IGNORE)
    targets[:, :-1] = ids[:, 1:]
    return {"input_ids": ids.numpy(), "targets": targets.numpy(),
            "position_ids": torch.arange(length).repeat(rows, 1).numpy(), "seq_lens": [[length]] * rows}


def _full(params: list, getter) -> list[torch.Tensor]:
    """Whole tensors of every parameter (a collective: DeepSpeed all-gathers the partitions)."""
    return [getter(p).detach().clone().reshape(p.ds_shape).cpu() for p in params]


def _worker(rank: int, world: int, run_dir: str, port: int) -> None:
    """One ZeRO-3 rank: estimate, reload, then two steps with the penalty's gradient recorded."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad
    from keel.core.worker import WorkerInfo
    from keel.mitigation.ewc import Ewc, trainable
    from keel.model.build import model_path
    from keel.train.engine import build_engine
    from keel.train.step import train_step

    class Recorder(Ewc):
        """The real plugin, with the whole gradient gathered before and after its hook."""

        def after_backward(self, engine):
            before = _full(self.params, safe_get_full_grad)
            out = super().after_backward(engine)
            self.record = {"before": before, "after": _full(self.params, safe_get_full_grad),
                           "theta": _full(self.params, safe_get_full_fp32_param), **out}
            return out

    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = compose(*OVERRIDES)
    info = WorkerInfo(rank, world, Path(run_dir), model_path(cfg), "sdpa_block", [], [], {})
    first, plugin = Ewc(cfg.mitigation.ewc), Recorder(cfg.mitigation.ewc)
    engine, _ = build_engine(cfg, info, [first])
    estimated = first.setup_engine(engine, cfg, info)
    reloaded = plugin.setup_engine(engine, cfg, info)  # same fingerprint: read back from <run>/ewc
    assert not estimated["ewc_fisher_reused"] and reloaded["ewc_fisher_reused"]
    assert all(torch.equal(a, b) for a, b in zip(first.fisher + first.anchor, plugin.fisher + plugin.anchor))
    engine.train()
    rows = cfg.trainer.micro_batch_size * cfg.trainer.grad_accum
    records = []
    for step in range(2):
        m = train_step(engine, _bundle(step, rank, rows), cfg, world, plugins=[plugin])
        records.append({**plugin.record, "logged": m["ewc_penalty"], "grad_norm": m["grad_norm"]})
    if rank == 0:
        names = [n for n, _ in trainable(engine)]
        torch.save({"names": names, "records": records}, Path(run_dir) / "record.pt")
    dist.barrier()  # no rank tears the group down while another still uses it (a C++ abort at exit otherwise)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gathered(run_dir: Path, key: str) -> dict[str, torch.Tensor]:
    """Whole tensors rebuilt from every rank's saved partitions (flat, padded at the end)."""
    files = sorted((run_dir / "ewc").glob("rank_*.pt"))
    states = [torch.load(f, weights_only=True) for f in files]
    out = {}
    for i, (name, shape) in enumerate(states[0]["params"]):
        flat = torch.cat([s[key][i] for s in states])
        out[name] = flat[: math.prod(shape)].reshape(shape)
    return out


def base_model(path: str):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def hand_fisher(model, sequences) -> dict[str, torch.Tensor]:
    """Mean over sequences of the squared gradient of each sequence's token-mean NLL (plain autograd)."""
    params = dict(model.named_parameters())
    sums = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    for ids, targets in sequences:
        model.zero_grad()
        x, y = torch.as_tensor(ids, dtype=torch.long)[None], torch.as_tensor(targets, dtype=torch.long)
        logits = model(input_ids=x).logits[0]
        keep = y != IGNORE
        F.cross_entropy(logits[keep], y[keep]).backward()
        for n, p in params.items():
            sums[n] += p.grad.double() ** 2
    return {n: s / len(sequences) for n, s in sums.items()}


def hand_penalty(fisher: dict, theta: dict, anchor: dict, lam: float) -> tuple[float, dict]:
    """(λ/2)·Σ F (θ − θ*)² in float64, and its gradient by autograd."""
    theta = {n: t.detach().double().requires_grad_() for n, t in theta.items()}
    value = lam / 2 * sum((fisher[n] * (theta[n] - anchor[n].double()) ** 2).sum() for n in fisher)
    value.backward()
    return value.item(), {n: t.grad for n, t in theta.items()}


def reference(path: str, samples: int):
    from keel.mitigation.ewc import reference_set

    cfg = compose("mitigation=ewc", f"mitigation.ewc.samples={samples}")
    return reference_set(cfg.mitigation.ewc, cfg, path)


def _norm(grads: list[torch.Tensor]) -> float:
    return torch.cat([g.reshape(-1) for g in grads]).double().norm().item()


def _close(got: torch.Tensor, want: torch.Tensor, rtol: float) -> None:
    scale = want.abs().max().item()
    assert (got.double() - want.double()).abs().max().item() <= rtol * scale + 1e-12, (got, want)


@pytest.mark.parametrize("world", [1, 2])
def test_penalty_and_gradient_match_hand_computation(tmp_path, tiny_path, world):
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(world, str(tmp_path), _free_port()), nprocs=world)
    rec = torch.load(tmp_path / "record.pt", weights_only=True)
    base = base_model(tiny_path)
    anchor = {n: p.detach() for n, p in base.named_parameters()}
    assert rec["names"] == list(anchor)
    fisher = gathered(tmp_path, "fisher")
    for name, a in gathered(tmp_path, "anchor").items():
        assert torch.equal(a, anchor[name]), name  # θ* is the base model, bit for bit
    want = hand_fisher(base, reference(tiny_path, SAMPLES))
    for name in want:
        _close(fisher[name], want[name], rtol=1e-5)
    assert min(f.sum().item() for f in fisher.values()) > 0  # every parameter gets a Fisher weight

    step1, step2 = rec["records"]
    assert step1["logged"] == 0.0  # θ = θ* before the first update
    assert all(torch.equal(a, b) for a, b in zip(step1["after"], step1["before"]))
    theta = dict(zip(rec["names"], step2["theta"]))
    assert max((theta[n] - anchor[n]).abs().max().item() for n in theta) > 1e-4  # the first step moved θ
    value, grads = hand_penalty(fisher, theta, anchor, LAM)
    assert value > 0 and step2["logged"] == pytest.approx(value, rel=1e-5)
    for name, before, after in zip(rec["names"], step2["before"], step2["after"]):
        _close(after - before, grads[name], rtol=1e-4)  # fp32 rounding of the summed gradient limits this
    # The optimizer step (its clipping norm) used the gradient with the penalty's part added.
    assert step2["grad_norm"] == pytest.approx(_norm(step2["after"]), rel=1e-5)
    assert abs(_norm(step2["after"]) / _norm(step2["before"]) - 1) > 1e-2


def test_replay_and_ewc_train_end_to_end(tmp_path, tiny_path):
    run_dir = tmp_path / "run"
    s = keel_train(run_dir, "mitigation=[replay,ewc]", "mitigation.ewc.samples=8", "trainer.max_steps=4",
                   "trainer.checkpoint_every=3", "logger=none", "trainer.save_hf=false")
    assert s["world_size"] == 2 and s["steps"] == 4 and s["ewc_fisher_s"] > 0 and not s["ewc_fisher_reused"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert rows[0]["ewc_penalty"] == 0.0 and all(r["ewc_penalty"] > 0 for r in rows[1:])
    meta = json.loads((run_dir / "ewc" / "meta.json").read_text())
    assert meta["fingerprint"] == s["ewc_fingerprint"] and meta["world_size"] == 2 and meta["samples"] == 8
    # The penalty logged at step 4 is taken at the weights after step 3 (the step_3 checkpoint).
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    theta = get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"), tag="step_000003")
    anchor = {n: p.detach() for n, p in base_model(tiny_path).named_parameters()}
    fisher = gathered(run_dir, "fisher")
    want = hand_fisher(base_model(tiny_path), reference(tiny_path, 8))
    for name in want:
        _close(fisher[name], want[name], rtol=1e-5)
    from keel.config import EwcConfig

    value, _ = hand_penalty(fisher, {n: theta[n] for n in fisher}, anchor, EwcConfig().lam)  # the default λ
    assert rows[3]["ewc_penalty"] == pytest.approx(value, rel=1e-5)
