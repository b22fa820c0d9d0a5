"""Same global batch, different split, through DeepSpeed ZeRO-3: micro-batch x accumulation x workers.

(Through the whole Ray path, 2 vs 1 workers with the same global batch is checked by
tests/integration/test_resume.py::test_elastic_resume_two_one_two_workers.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

pytestmark = pytest.mark.integration

SPLITS = {1: [(4, 1), (2, 2), (1, 4)], 2: [(2, 1), (1, 2)]}  # world -> (micro_batch_size, grad_accum)
# Also on two ranks: deepspeed.overlap_comm (the GPU presets' setting) reduces the same gradient.
OVERLAP = {2: (2, 1)}


def _rows(count: int = 4, length: int = 48) -> dict:
    """Packed rows of random tokens as the data path delivers them: examples of 10..30 tokens whose first
    third is an untrained prompt."""
    import numpy as np

    rng = np.random.default_rng(3)
    rows: dict = {"input_ids": [], "targets": [], "position_ids": [], "seq_lens": []}
    for _ in range(count):
        lens = []
        while sum(lens) < length:
            lens.append(min(int(rng.integers(10, 31)), length - sum(lens)))
        ids = rng.integers(3, 2000, length)
        targets = np.full(length, -100)
        start = 0
        for n in lens:
            targets[start + n // 3 : start + n - 1] = ids[start + n // 3 + 1 : start + n]
            start += n
        rows["input_ids"].append(ids)
        rows["targets"].append(targets)
        rows["position_ids"].append(np.concatenate([np.arange(n) for n in lens]))
        rows["seq_lens"].append(lens)
    width = max(map(len, rows["seq_lens"]))  # [R, D] example lengths per row, 0-padded, as the pipeline's
    rows["seq_lens"] = [lens + [0] * (width - len(lens)) for lens in rows["seq_lens"]]
    return {k: np.stack(v) if k != "seq_lens" else np.array(v) for k, v in rows.items()}


def _ds_worker(rank: int, world: int, out_dir: str, port: int) -> None:
    """One rank: for each (micro-batch, accumulation) split of the 4 rows, one ZeRO-3 step from the same base."""
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    import torch
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_grad
    from keel.core.worker import WorkerInfo
    from keel.mitigation.base import Plugin
    from keel.model.build import model_path
    from keel.train.engine import build_engine
    from keel.train.step import train_step

    from tests.conftest import compose

    dist.init_process_group("gloo", rank=rank, world_size=world)
    rows = _rows()
    share = {k: v[rank::world] for k, v in rows.items()}  # rank r holds rows r, r + world, ...
    class GradRecorder(Plugin):
        """Gathers the whole gradient of the step after the last backward, before the optimizer uses it."""

        def after_backward(self, engine):
            self.grads = {n: safe_get_full_grad(p).detach().clone() for n, p in engine.module.named_parameters()}
            return {}

    from keel.core import loss
    from keel.train import step as step_mod

    loss.CHUNK_LOGITS = 16 * 4096  # 16-token chunks: several per micro-batch, each recomputed in the backward
    results = {}
    # "full": the same step with the model's own head, full-vocabulary logits (the reference the chunked
    # LM-head loss must equal under ZeRO-3, where the head weight is partitioned and gathered by its hooks).
    runs = [(m, a, False, "chunked") for m, a in SPLITS[world]] + [(4, 1, False, "full")] * (world == 1)
    runs += [(*OVERLAP[world], True, "chunked")] if world in OVERLAP else []
    for micro, accum, overlap, head in runs:
        cfg = compose(f"trainer.micro_batch_size={micro}", f"trainer.grad_accum={accum}", "trainer.warmup_steps=0",
                      "trainer.max_grad_norm=0", "logger=none", f"deepspeed.overlap_comm={overlap}")
        info = WorkerInfo(rank, world, Path(out_dir), model_path(cfg), "sdpa_block", [], [], {})
        engine, _ = build_engine(cfg, info, [])
        engine.train()
        assert step_mod.find_loss_head(engine.module) is not None
        if head == "full":
            step_mod.find_loss_head = lambda module: None
        recorder = GradRecorder()
        m = train_step(engine, share, cfg, world, plugins=[recorder])
        key = f"{micro}x{accum}" + ("+overlap_comm" if overlap else "") + ("-full-logits" if head == "full" else "")
        results[key] = {"loss": m["loss"], "grad_norm": m["grad_norm"], "grads": recorder.grads}
        engine.destroy()
    if rank == 0:
        torch.save(results, Path(out_dir) / f"world{world}.pt")
    dist.barrier()
    dist.destroy_process_group()


def test_micro_batch_accumulation_and_workers_through_deepspeed(tmp_path, tiny_path):
    """One ZeRO-3 step on the same 4 rows: 4x1, 2x2, 1x4 on one rank and 2x1, 1x2 on two ranks give the same
    loss and the same gradient (DeepSpeed's own accumulation and averaging undone exactly); the chunked LM-head
    loss gives the loss and gradient of the full-vocabulary logits."""
    import torch
    import torch.multiprocessing as mp

    from .test_ewc import _free_port

    for world in (1, 2):
        mp.spawn(_ds_worker, args=(world, str(tmp_path), _free_port()), nprocs=world)
    runs = {**torch.load(tmp_path / "world1.pt", weights_only=True),
            **{f"dp2:{k}": v for k, v in torch.load(tmp_path / "world2.pt", weights_only=True).items()}}
    ref = runs.pop("4x1")
    assert "dp2:2x1+overlap_comm" in runs
    names = [n for n, _ in AutoModelForCausalLM.from_pretrained(tiny_path).named_parameters()]
    assert list(ref["grads"]) == names and ref["grad_norm"] > 0
    for name, run in runs.items():
        assert run["loss"] == pytest.approx(ref["loss"], rel=1e-6), name
        assert run["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5), name
        for n in names:  # fp32 sums in a different order: rounding only
            scale = ref["grads"][n].abs().max().item()
            assert (run["grads"][n] - ref["grads"][n]).abs().max().item() <= 1e-5 * scale + 1e-10, (name, n)
