"""Your model, your data: every row read, a run's length in epochs, a validation split that is never
trained (val/loss, the best checkpoint, early stopping) and the public mixture data=chat_mix."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from keel.cli import inspect as cli_inspect
from keel.cli.explicit import user_keys
from keel.cli.train import argv
from keel.data import pipeline
from keel.data.examples import held_out
from keel.data.masking import IGNORE
from keel.launch import prepare
from keel.mitigation import configured
from keel.train import checkpoint as ckpt
from keel.train.validation import Best, micro_batches

from tests.conftest import compose, keel_hydra


def _chats(path: Path, n: int, start: int = 0, dup: int = 0) -> Path:
    """``n`` distinct short chats (and ``dup`` repeats of the first ones) as JSONL."""
    rows = [{"messages": [{"role": "user", "content": f"what is {i} plus {i % 13}?"},
                          {"role": "assistant", "content": f"{i} plus {i % 13} is {i + i % 13}"}]}
            for i in range(start, start + n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows + rows[:dup]))
    return path


def _source(path: Path, name: str = "mine", extra: str = "") -> str:
    return f"data.sources=[{{name: {name}, kind: file, path: '{path}'{extra}}}]"


def _examples(rows: dict) -> list[tuple[int, ...]]:
    """Every packed example of row arrays, as a token tuple (seq_lens gives each row's examples)."""
    out = []
    for ids, lens in zip(rows["input_ids"], rows["seq_lens"]):
        pos = 0
        for n in lens[lens > 0]:
            out.append(tuple(ids[pos:pos + n].tolist()))
            pos += n
    return out


def _arrays(plan) -> dict:
    return {"input_ids": plan.input_ids, "seq_lens": plan.seq_lens}


# ---------------------------------------------------------------- every row read


def test_a_file_source_is_read_whole(tmp_path, tokenizer, capsys):
    """A 7,000-row file with no cap: every row is read and available (the old default stopped at 1,000)."""
    cfg = compose(_source(_chats(tmp_path / "mine.jsonl", 7000)), "trainer.max_steps=2", "mitigation=none")
    _, _, plan = prepare.prepare_data(cfg, tmp_path, [])
    s = plan.report["sources"]["mine"]
    assert s["rows_read"] == s["available"] == 7000 and s["rejected"] == 0
    table = capsys.readouterr().out
    assert "rows read" in table and "available" in table
    assert [line.split()[1:3] for line in table.splitlines() if line.strip().startswith("mine")] == [["7000", "7000"]]


def test_num_examples_caps_a_file_only_as_a_deprecated_cap(tmp_path):
    path = _chats(tmp_path / "mine.jsonl", 20)
    with pytest.warns(FutureWarning, match=r"num_examples=5 on a file source is deprecated.*cap=5"):
        cfg = compose(_source(path, extra=", num_examples: 5"))
    assert cfg.data.sources[0].cap == 5 and cfg.data.sources[0].num_examples is None
    with pytest.warns(UserWarning, match=r"num_examples=32 has no effect on a file source with .*cap=8"):
        forgetting = compose("eval.forgetting.source.kind=file", f"eval.forgetting.source.path={path}",
                          "eval.forgetting.source.cap=8").eval.forgetting.source  # the demo default left over
    assert (forgetting.cap, forgetting.num_examples) == (8, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # -1 (all rows) is what a file does anyway: no warning
        assert compose(_source(path, extra=", num_examples: -1")).data.sources[0].cap is None
    assert compose("data=demo").data.sources[0].num_examples == 3000
    demo = compose("data.sources=[{name: d, kind: demo, task: arithmetic}]").data.sources[0]
    assert demo.num_examples == 1000  # a demo source's default size


# ---------------------------------------------------------------- epochs


def _epochs_plan(tmp_path, tokenizer, *overrides, plugins: bool = False):
    cfg = compose("trainer.max_steps=null", *overrides)
    _, _, plan = prepare.prepare_data(cfg, tmp_path, configured(cfg) if plugins else [])
    return cfg, plan


def test_one_epoch_of_one_file_is_every_example_once(tmp_path, tokenizer):
    cfg, plan = _epochs_plan(tmp_path, tokenizer, _source(_chats(tmp_path / "mine.jsonl", 3000)), "trainer.epochs=1")
    length, s = plan.report["length"], plan.report["sources"]["mine"]
    assert abs(s["epochs"] - 1) <= 0.1 and abs(length["epochs"] - 1) <= 0.1 and length["epochs_asked"] == 1
    # the run is now an ordinary max_steps run of exactly the planned rows
    assert cfg.trainer.max_steps == length["steps"] and cfg.trainer.epochs is None
    assert plan.input_ids.shape[0] == length["steps"] * pipeline.rows_per_step(cfg)
    # the rows hold each example at most once (rounding drops or adds less than half a step of rows)
    examples = _examples(_arrays(plan))
    per_step = pipeline.rows_per_step(cfg) * np.mean(plan.seq_lens.astype(bool).sum(axis=1))
    assert len(examples) - len(set(examples)) <= per_step / 2 + 1


def test_epochs_follow_the_mixture_weights(tmp_path, tokenizer):
    """Under temperature mixing each source's epochs follow from its weight; the total is E natural sizes."""
    big, small = _chats(tmp_path / "big.jsonl", 2000), _chats(tmp_path / "small.jsonl", 200, start=5000)
    sources = (f"data.sources=[{{name: big, kind: file, path: '{big}'}}, "
               f"{{name: small, kind: file, path: '{small}'}}]")
    _, plan = _epochs_plan(tmp_path, tokenizer, sources, "mix.T=2", "trainer.epochs=2")
    r = plan.report
    assert abs(r["length"]["epochs"] - 2) <= 0.1
    picks = 2 * 2200  # E x natural size, shared by weight
    for name, n in (("big", 2000), ("small", 200)):
        expected = r["sources"][name]["weight"] * picks / n
        assert r["sources"][name]["epochs"] == pytest.approx(expected, rel=0.1)
    assert r["sources"]["small"]["epochs"] > 2 > r["sources"]["big"]["epochs"]  # temperature favours the small one


@pytest.mark.parametrize("mitigation", ["replay", "progressive"])
def test_epochs_count_the_task_sources_only(tmp_path, tokenizer, mitigation):
    """Replay and progressive add text on top: trainer.epochs counts passes over data.sources."""
    _, plan = _epochs_plan(tmp_path, tokenizer, _source(_chats(tmp_path / "mine.jsonl", 1500)), "trainer.epochs=1",
                           f"mitigation={mitigation}", plugins=True)
    names = set(plan.report["sources"])
    assert names == {"mine", mitigation} and abs(plan.report["length"]["epochs"] - 1) <= 0.1
    assert plan.report["sources"][mitigation]["examples"] > 0


def test_epochs_with_a_mixture_schedule(tmp_path, tokenizer):
    a, b = _chats(tmp_path / "a.jsonl", 800), _chats(tmp_path / "b.jsonl", 800, start=9000)
    sources = f"data.sources=[{{name: a, kind: file, path: '{a}'}}, {{name: b, kind: file, path: '{b}'}}]"
    _, plan = _epochs_plan(tmp_path, tokenizer, sources, "mix=schedule", "trainer.epochs=1",
                           "mix.schedule=[{at: 0, weights: {a: 1}}, {at: 1, weights: {b: 1}}]")
    assert abs(plan.report["length"]["epochs"] - 1) <= 0.1 and "schedule" in plan.report


def _length(tmp_path, *overrides):
    return cli_inspect.load_config(list(overrides), None, "auto").trainer


def test_epochs_alone_is_enough_and_both_set_is_an_error(tmp_path, capsys):
    t = _length(tmp_path, "trainer.epochs=1.5")
    assert (t.epochs, t.max_steps) == (1.5, None)  # the default max_steps gave way
    assert _length(tmp_path, "trainer.max_steps=7").max_steps == 7
    with pytest.raises(SystemExit, match="trainer.epochs=1.0 and trainer.max_steps=7 are both set"):
        _length(tmp_path, "trainer.epochs=1", "trainer.max_steps=7")
    # the user's own config files count as set by the user, a preset or default does not
    conf = tmp_path / "my_conf"
    (conf / "experiment").mkdir(parents=True)
    (conf / "experiment" / "mine.yaml").write_text("# @package _global_\ntrainer:\n  epochs: 2\n")
    search = f"hydra.searchpath=[file://{conf}]"
    t = _length(tmp_path, search, "+experiment=mine")
    assert (t.epochs, t.max_steps) == (2.0, None)
    with pytest.raises(SystemExit, match="both set"):
        _length(tmp_path, search, "+experiment=mine", "trainer.max_steps=3")
    with keel_hydra():
        assert user_keys("config", [search, "+experiment=mine", "model=llama3"]) == {"trainer.epochs"}
        assert user_keys("config", ["trainer={max_steps: 4}"]) == {"trainer.max_steps"}
    with pytest.raises(ValueError, match="trainer.epochs .*must be > 0"):
        compose("trainer.max_steps=null", "trainer.epochs=0")


def test_keel_train_takes_hydra_flags_after_the_overrides():
    """slurm/sft.sh puts its overrides first: `--config-dir DIR +experiment=NAME` must still reach Hydra."""
    given = ["cluster=slurm", "hydra.run.dir=/r", "--config-dir", "my_conf", "+experiment=x", "-m", "--cfg", "job"]
    assert argv(given) == ["--config-dir", "my_conf", "-m", "--cfg", "job", "cluster=slurm", "hydra.run.dir=/r",
                           "+experiment=x"]
    assert argv(["a=1", "--info", "defaults", "b=2"]) == ["--info", "defaults", "a=1", "b=2"]


# ---------------------------------------------------------------- validation split


def test_validation_rows_are_never_trained(tmp_path, tokenizer):
    """No validation example's tokens appear in any training row; duplicates stay on one side."""
    path = _chats(tmp_path / "mine.jsonl", 600, dup=100)
    cfg = compose(_source(path), "data.val_fraction=0.2", "trainer.max_steps=40")
    plan, _ = pipeline.build(cfg, tokenizer)
    val = _examples(_arrays(plan.val))
    train = _examples(_arrays(plan))
    report = plan.report
    assert report["sources"]["mine"]["rows_read"] == 700
    assert report["validation"]["sources"]["mine"]["examples"] == len(val) == report["sources"]["mine"]["val_examples"]
    assert 0.12 < len(val) / 700 < 0.28 and len(set(train)) > 400  # trained for more than one pass
    assert not set(val) & set(train)
    rows = [r.tobytes() for r in plan.input_ids]
    assert not any(np.asarray(v, np.int32).tobytes() in row for v in val for row in rows)
    assert ((plan.val.targets != IGNORE).sum(axis=1) > 0).all()


def test_the_held_out_rows_do_not_depend_on_the_run(tmp_path, tokenizer):
    """Stable across world sizes, seeds and the other sources: a row is held out by its content."""
    path = _chats(tmp_path / "mine.jsonl", 300)
    base = compose(_source(path), "data.val_fraction=0.3", "trainer.max_steps=2")
    held = set(_examples(_arrays(pipeline.build(base, tokenizer)[0].val)))
    other = compose(f"data.sources=[{{name: x, kind: demo, task: arithmetic, num_examples: 50}}, "
                 f"{{name: mine, kind: file, path: '{path}'}}]", "data.val_fraction=0.3", "trainer.max_steps=3",
                 "cluster.num_workers=1", "data.seed=7")
    plan = pipeline.build(other, tokenizer)[0]
    mine = plan.source_names.index("mine")
    rows = plan.val.source_ids[:, 0] == mine
    assert set(_examples({k: v[rows] for k, v in _arrays(plan.val).items()})) == held
    row = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}
    assert held_out(row, 1.0) and not held_out(row, 0.0) and held_out(dict(reversed(row.items())), 0.5) == \
        held_out(row, 0.5)


def test_a_validation_file_or_split(tmp_path, tokenizer):
    train, val = _chats(tmp_path / "train.jsonl", 200), _chats(tmp_path / "val.jsonl", 30, start=1000)
    cfg = compose(_source(train, extra=f", val_path: '{val}'"), "data.val_fraction=0.5", "trainer.max_steps=3")
    plan, _ = pipeline.build(cfg, tokenizer)
    s, v = plan.report["sources"]["mine"], plan.report["validation"]["sources"]["mine"]
    assert s["available"] == s["rows_read"] == 200 and s["val_examples"] == v["examples"] == v["rows_read"] == 30
    assert v["from"] == f"val_path={val}"  # the source's own rows: data.val_fraction holds nothing out of it
    for bad, needle in ((", val_split: test", "val_split needs a Hugging Face dataset path"),
                        (f", val_path: '{val}', val_split: test", "are both set")):
        with pytest.raises(ValueError, match=needle):
            compose(_source(train, extra=bad))
    assert compose("data.sources=[{name: h, kind: file, path: 'hf:o/n', val_split: test}]").data.sources[0].val_split


@pytest.mark.parametrize("key", ["trainer.save_best=true", "trainer.early_stopping_patience=2"])
def test_best_and_early_stopping_need_validation_rows(key):
    with pytest.raises(ValueError, match=f"{key.split('=')[0]} needs validation rows"):
        compose(key)
    assert compose(key, "data.val_fraction=0.1")


def test_validation_micro_batches_cover_every_row_once_per_source(tmp_path, tokenizer):
    two = (f"data.sources=[{{name: a, kind: demo, task: arithmetic, num_examples: 300}}, "
           f"{{name: b, kind: file, path: '{_chats(tmp_path / 'b.jsonl', 300)}'}}]")
    plan, _ = pipeline.build(compose(two, "data.val_fraction=0.3", "trainer.max_steps=2"), tokenizer)
    for world, micro in ((1, 2), (2, 3), (3, 1)):
        ranks = micro_batches(plan.val, world, micro)
        assert len({len(mine) for mine in ranks}) == 1  # every rank runs as many forwards
        source_of = {r.tobytes(): int(k) for r, k in zip(plan.val.input_ids, plan.val.source_ids[:, 0])}
        counted = [b for mine in ranks for b in mine if b["counted"]]
        seen = [r.tobytes() for b in counted for r in b["input_ids"][(b["targets"] != IGNORE).any(axis=1)]]
        assert sorted(seen) == sorted(source_of)  # every validation row once (the rest is padding)
        for b in counted:
            assert b["input_ids"].shape[0] == micro
            rows = b["input_ids"][(b["targets"] != IGNORE).any(axis=1)]
            assert {source_of[r.tobytes()] for r in rows} == {b["source"]}  # one source per micro-batch


def test_val_loss_on_packed_rows_equals_the_examples_one_by_one(tmp_path, tokenizer, tiny_path):
    """val/loss (packed rows, micro-batches, token-weighted) equals the mean loss over every validation
    token computed example by example; val/loss/<source> likewise."""
    import torch
    from keel.core.loss import token_loss_sum
    from keel.model.build import load_model
    from keel.train.validation import measure

    two = (f"data.sources=[{{name: a, kind: demo, task: arithmetic, num_examples: 100}}, "
           f"{{name: b, kind: file, path: '{_chats(tmp_path / 'b.jsonl', 100)}'}}]")
    cfg = compose(two, "data.val_fraction=0.15", "trainer.max_steps=2")
    plan, _ = pipeline.build(cfg, tokenizer)
    model = load_model(tiny_path, cfg, "sdpa_block").eval()
    row = measure(model, micro_batches(plan.val, 1, 3)[0], plan.source_names)
    sums, counts = {}, {}
    with torch.no_grad():
        for ids_row, tgt_row, src_row, lens in zip(plan.val.input_ids, plan.val.targets, plan.val.source_ids,
                                                   plan.val.seq_lens):
            pos = 0
            for n in lens[lens > 0]:
                ids = torch.as_tensor(ids_row[pos:pos + n], dtype=torch.long)[None]
                tgt = torch.as_tensor(tgt_row[pos:pos + n], dtype=torch.long)[None]
                k = plan.source_names[int(src_row[pos])]
                sums[k] = sums.get(k, 0.0) + float(token_loss_sum(model(input_ids=ids).logits, tgt))
                counts[k] = counts.get(k, 0) + int((tgt != IGNORE).sum())
                pos += n
    assert row["val/tokens"] == sum(counts.values())
    assert row["val/loss"] == pytest.approx(sum(sums.values()) / sum(counts.values()), rel=1e-5)
    for k in ("a", "b"):
        assert row[f"val/loss/{k}"] == pytest.approx(sums[k] / counts[k], rel=1e-5)


def test_best_tracks_improvement_and_patience():
    best = Best(patience=2, min_delta=0.1)
    assert best.update(10, 2.0) and not best.stop
    assert not best.update(20, 1.95)  # within min_delta: not an improvement
    assert best.update(30, 1.5) and (best.step, best.loss, best.since) == (30, 1.5, 0)
    assert not best.update(40, float("nan")) and not best.stop
    assert not best.update(50, 1.6) and best.stop and best.summary() == {
        "best_step": 30, "best_val_loss": 1.5, "val_loss_last": 1.6}
    history = [{"step": 0, "val/loss": 9.0}, {"step": 10, "val/loss": 2.0}, {"step": 20, "forgetting/ppl": 3.0},
               {"step": 30, "val/loss": 2.5}]
    again = Best(patience=1).replay(history)
    assert (again.step, again.loss, again.since, again.stop) == (10, 2.0, 1, True)  # step 0 is the baseline only
    assert math.isnan(Best().replay([{"step": 5, "val/loss": float("nan")}]).last)


def test_the_best_checkpoint_survives_pruning(tmp_path):
    for step in (2, 4, 6, 8):
        d = ckpt.root(tmp_path) / f"{ckpt.PREFIX}{step:06d}"
        d.mkdir(parents=True)
        (d / ckpt.MANIFEST).write_text("{}")
    ckpt.mark_best(tmp_path, 4, rank=0)
    ckpt.mark_best(tmp_path, 6, rank=1)  # only rank 0 marks
    assert ckpt.best(tmp_path).name == "step_000004"
    ckpt._prune(tmp_path, keep=1)
    assert [p.name for p in ckpt.complete(tmp_path)] == ["step_000004", "step_000008"]
    ckpt.mark_best(tmp_path, 8, rank=0)
    ckpt._prune(tmp_path, keep=1)
    assert [p.name for p in ckpt.complete(tmp_path)] == ["step_000008"] and ckpt.best(tmp_path).is_dir()


# ---------------------------------------------------------------- data=chat_mix


LOCAL_FORMATS = {  # one row per source of data=chat_mix, in its hub dataset's format
    "chat": {"prompt": "hi", "prompt_id": "0", "messages": [{"role": "user", "content": "Tell me about tides."},
                                                            {"role": "assistant", "content": "The moon pulls."}]},
    "math": {"question": "What is 2 + 3?", "answer": "2 + 3 = <<2+3=5>>5\n#### 5"},
    "code": {"lang": "python", "seed": "def f(): pass", "problem": "Write add(a, b).",
             "solution": "```python\ndef add(a, b):\n    return a + b\n```"},
    "tools": {"conversations": [{"from": "human", "value": "Weather in Paris?"},
                                {"from": "function_call",
                                 "value": '{"name": "weather", "arguments": {"city": "Paris"}}'},
                                {"from": "observation", "value": '{"temp": 21}'},
                                {"from": "gpt", "value": "It is 21 degrees."}],
              "tools": '[{"name": "weather", "parameters": {"type": "object"}}]'},
    "replay": {"text": "The river ran past the mill and on to the sea.", "timestamp": "2019", "url": "x"},
}


def test_chat_mix_is_a_documented_public_mixture(tmp_path, tokenizer):
    """data=chat_mix names hub datasets; pointed at local files of the same formats it plans every source."""
    cfg = compose("data=chat_mix", "mix.T=2")
    hub = {s.name: s.path for s in cfg.data.sources}
    assert list(hub) == ["chat", "math", "code", "tools", "replay"] and all(p.startswith("hf:") for p in hub.values())
    docs = (Path(__file__).resolve().parents[2] / "docs" / "training.md").read_text()
    assert all(p[len("hf:"):] in docs for p in hub.values())  # each documented
    local = []
    for i, (name, row) in enumerate(LOCAL_FORMATS.items()):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({**row, "id": j}) + "\n" for j in range(20)))
        local.append(f"data.sources.{i}.path={path}")
    cfg = compose("data=chat_mix", "mix.T=2", "trainer.max_steps=10", *local)
    plan, rejects = pipeline.build(cfg, tokenizer)
    assert rejects == []
    for name, s in plan.report["sources"].items():
        assert s["available"] == 20 and s["tokens"] > 0, name
    text = plan.report["sources"]["replay"]
    assert text["trained_tokens"] == pytest.approx(text["tokens"], abs=text["examples"])  # replay: every token


# ---------------------------------------------------------------- the loop: save_best and early stopping


class _Engine:
    """Stands in for the DeepSpeed engine: a fixed embedding, no update, every step applied."""

    def __init__(self) -> None:
        import torch

        torch.manual_seed(0)
        self.module = torch.nn.Embedding(8, 8)
        self.device = torch.device("cpu")
        self.lr_scheduler = type("S", (), {"get_last_lr": lambda self: [0.1], "step": lambda self: None})()

    def __call__(self, input_ids, position_ids, **attention_kwargs):
        return type("O", (), {"logits": self.module(input_ids)})()

    def train(self):
        pass

    def backward(self, loss, scale_wrt_gas):
        pass

    def step(self):
        pass

    def get_global_grad_norm(self):
        return 1.0


def _bundles(steps: int):
    ids = np.array([[0, 1, 2, 3]] * 2)
    for step in range(steps):
        yield {"input_ids": ids, "targets": np.array([[1, 2, 3, IGNORE]] * 2), "step": step, "slot": 0,
               "position_ids": np.tile(np.arange(4), (2, 1)), "seq_lens": np.array([[4]] * 2)}


def _run_loop(tmp_path, monkeypatch, val_losses: list[float], *overrides):
    """keel.train.trainer.train on a stand-in engine, the validation loss scripted per evaluation."""
    from keel.core.worker import WorkerInfo
    from keel.eval import hook
    from keel.train import cadence, evaluator, export, flops, trainer, validation

    saved: list[int] = []

    def save(engine, cfg, info, step):
        saved.append(step)
        d = ckpt.root(info.run_dir) / f"{ckpt.PREFIX}{step:06d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / ckpt.MANIFEST).write_text("{}")
        (d / ckpt.STATE).write_text(json.dumps({"step": step}))
        return d

    losses = iter(val_losses)
    monkeypatch.setattr(trainer, "build_engine", lambda cfg, info, plugins, load_universal=False: (_Engine(), None))
    monkeypatch.setattr(flops, "counter", lambda model: lambda tokens, sum_sq: 0.0)
    monkeypatch.setattr(trainer, "check_backend", lambda name: None)
    monkeypatch.setattr(trainer, "resolve_attention", lambda cfg, info: "sdpa_block")
    monkeypatch.setattr(cadence, "save", save)
    monkeypatch.setattr(export, "export_model", lambda engine, cfg, info, plugins: {"hf_dir": None})
    monkeypatch.setattr(evaluator, "load_sets", lambda cfg, info: (None, None))
    monkeypatch.setattr(hook, "evaluate", lambda *a: None)
    monkeypatch.setattr(hook, "with_rise", lambda row, baseline: row)
    monkeypatch.setattr(validation, "measure", lambda model, batches, names: {"val/loss": next(losses)})
    cfg = compose("logger=none", "trainer.progress=false", "trainer.step_timeout_s=0", "data.val_fraction=0.1",
               "trainer.micro_batch_size=2", "cluster.num_workers=1", *overrides)
    info = WorkerInfo(0, 1, tmp_path, "", "sdpa", [[8]] * cfg.trainer.max_steps, ["mine"], {}, val_batches=[])
    result = trainer.train(cfg, info, _bundles(cfg.trainer.max_steps))
    evals = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    return result, saved, evals


def test_the_loop_keeps_the_best_checkpoint_and_stops_early(tmp_path, monkeypatch, capsys):
    # evaluations at steps 0 (baseline) 1..10; the best is step 3; patience 3 ends the run after step 6
    result, saved, evals = _run_loop(tmp_path, monkeypatch, [9.0, 5.0, 4.0, 3.0, 3.5, 3.1, 3.2, 2.0],
                                     "trainer.max_steps=10", "eval.every_n_steps=1", "trainer.save_best=true",
                                     "trainer.early_stopping_patience=3", "trainer.keep_checkpoints=1",
                                     "trainer.checkpoint_every=5")
    assert [r["step"] for r in evals] == [0, 1, 2, 3, 4, 5, 6]
    assert saved == [1, 2, 3, 5, 6]  # each new best (1, 2, 3), the periodic 5, the final 6
    assert (result["best_step"], result["best_val_loss"], result["early_stopped"]) == (3, 3.0, True)
    assert result["steps"] == 6 and result["val_loss_last"] == 3.2
    assert ckpt.best(tmp_path).name == "step_000003" and "early stopping: val/loss did not improve for 3" in \
        capsys.readouterr().out


def test_validation_without_periodic_evaluation_runs_at_the_end(tmp_path, monkeypatch):
    result, saved, evals = _run_loop(tmp_path, monkeypatch, [4.0], "trainer.max_steps=3", "trainer.save_best=true")
    assert [r["step"] for r in evals] == [3] and saved == [3]  # the best's checkpoint is the final one, once
    assert (result["best_step"], result["early_stopped"]) == (3, False)


def test_a_preprocessed_directory_keeps_the_epochs_and_the_validation_rows(tmp_path, tokenizer):
    """data.preprocessed: the directory's planned steps serve the same trainer.epochs, its validation rows the
    same validation settings; other settings are refused naming them."""
    from keel.config import to_plain
    from keel.data import preprocessed_dir as preprocessed
    from keel.data.parquet_rows import VAL_SHARD, write_shard

    source = _source(_chats(tmp_path / "mine.jsonl", 400))
    made = compose(source, "trainer.max_steps=null", "trainer.epochs=1", "data.val_fraction=0.1")
    plan, _ = pipeline.build(made, tokenizer)
    fields = ("input_ids", "targets", "position_ids", "seq_lens", "source_ids")
    out = tmp_path / "pre"
    out.mkdir()
    write_shard(out, 0, {k: getattr(plan, k) for k in fields})
    write_shard(out, 0, {k: getattr(plan.val, k) for k in fields}, name=VAL_SHARD)
    (out / "report.json").write_text(json.dumps({
        "rows": plan.input_ids.shape[0], "shards": 1, "val_shards": 1, "source_names": plan.source_names,
        "compat": preprocessed.compat(made, tokenizer), "data_report": plan.report, "config": to_plain(made)}))

    def load(*overrides):
        cfg = compose(source, f"data.preprocessed={out}", *overrides)
        return cfg, preprocessed.load(cfg, tokenizer, to_plain(cfg))[0]

    cfg, rows = load("trainer.max_steps=null", "trainer.epochs=1", "data.val_fraction=0.1")
    assert np.array_equal(rows.input_ids, plan.input_ids) and np.array_equal(rows.val.targets, plan.val.targets)
    pipeline.settle_length(cfg, rows.report)
    assert cfg.trainer.max_steps == plan.report["length"]["steps"]
    with pytest.raises(ValueError, match="planned for trainer.epochs=1.0 .* asks trainer.epochs=2.0"):
        load("trainer.max_steps=null", "trainer.epochs=2", "data.val_fraction=0.1")
    with pytest.raises(ValueError, match="holds the validation rows of"):
        load("trainer.max_steps=2", "data.val_fraction=0.2")
    _, first = load("trainer.max_steps=2", "data.val_fraction=0.1")  # a shorter run: the first rows
    assert first.report["length"]["steps"] == 2 and first.input_ids.shape[0] == 2 * pipeline.rows_per_step(cfg)


def test_keel_preprocess_prints_rows_read_and_available(tmp_path, capsys):
    from keel.cli.preprocess import print_report

    source = {"format": "messages", "rows_read": 7000, "available": 6300, "examples": 6300, "val_examples": 700,
              "rejected": 0, "tokens": 123, "trained_fraction": 0.5}
    print_report({"rows": 4, "shards": 1, "packing_efficiency": 0.9, "sources": {"mine": source},
                  "rejects_by_reason": {}, "data_report": {"self_check": {"notes": []}}}, tmp_path)
    lines = capsys.readouterr().out.splitlines()
    assert "rows read" in lines[1] and "available" in lines[1] and "held out" in lines[1]
    assert lines[2].split()[:6] == ["mine", "messages", "7000", "6300", "0", "700"]
