"""Exports: when they are due, written whole and pruned by their own keep; `keel export` refusals name the path.
(The exports themselves, of real ZeRO-3 checkpoints, full and LoRA: tests/integration/test_train_e2e.py and
test_lora.py.)"""

from __future__ import annotations

import json

import pytest
from keel.cli.export import main as keel_export
from keel.cli.main import main as keel_main
from keel.config import to_plain
from keel.tracking.logger import redact
from keel.train import checkpoint as ckpt
from keel.train import export
from omegaconf import OmegaConf

from tests.conftest import compose


def _fake_checkpoint(run_dir, step, **state):
    d = ckpt.root(run_dir) / f"step_{step:06d}"
    d.mkdir(parents=True)
    (d / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"x" * 10)
    (d / ckpt.STATE).write_text(json.dumps({"step": step, **state}))
    ckpt.write_manifest(d)
    return d


def test_due_every_n_steps_but_not_the_last():
    assert [s for s in range(1, 13) if export.due(s, 4, 12)] == [4, 8]  # step 12's model is hf/
    assert not any(export.due(s, 0, 12) for s in range(1, 13))


def test_exports_are_renamed_when_whole_and_pruned_by_their_own_keep(tmp_path):
    def write(step):
        def fill(out):
            assert out.name == f".tmp-step_{step:06d}" and out.is_dir()
            (out / "hf").mkdir()
            (out / "hf" / "model.safetensors").write_text(str(step))
            return {}
        return fill

    leftover = tmp_path / "exports" / ".tmp-step_000002"
    leftover.mkdir(parents=True)
    (leftover / "half-written").write_text("")
    for step in (2, 4, 6):
        assert export.save_along(tmp_path, step, 0, 2, write(step)) == export.export_dir(tmp_path, step)
    assert sorted(p.name for p in (tmp_path / "exports").iterdir()) == ["step_000004", "step_000006"]
    assert not (tmp_path / "exports" / "step_000006" / "half-written").exists()
    export.save_along(tmp_path, 6, 0, None, write(6))  # the same step again (after a resume): replaced
    assert (tmp_path / "exports" / "step_000006" / "hf" / "model.safetensors").read_text() == "6"
    for step in (8, 10):
        export.save_along(tmp_path, step, 0, None, write(step))  # keep None: all kept
    assert [p.name for p in export.completed(tmp_path)] == [f"step_{s:06d}" for s in (4, 6, 8, 10)]


def test_keep_exports_needs_export_every():
    with pytest.raises(ValueError, match=r"trainer\.keep_exports has no effect without trainer\.export_every"):
        compose("trainer.keep_exports=2")
    with pytest.raises(ValueError, match=r"trainer\.export_every must be >= 0"):
        compose("trainer.export_every=-1")
    assert compose("trainer.export_every=5", "trainer.keep_exports=2").trainer.keep_exports == 2


def test_keel_export_refuses_what_is_not_a_complete_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    done = _fake_checkpoint(run, 4)
    (ckpt.root(run) / ".tmp-step_000006").mkdir()  # an interrupted write: no manifest
    cases = [(ckpt.root(run) / ".tmp-step_000006", "is not a complete Keel checkpoint: no manifest.json"),
             (run, f"the complete checkpoints there: {done}"),
             (tmp_path / "missing", "is not a directory")]
    for path, needle in cases:
        with pytest.raises(SystemExit) as exc:
            keel_export([str(path), "--out", str(tmp_path / "out")])
        assert str(exc.value).startswith(f"keel export: {path}") and needle in str(exc.value), exc.value
    (done / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"y" * 10)
    with pytest.raises(SystemExit, match=r"step_000004: zero_pp_rank_0_mp_rank_00_model_states\.pt is truncated or "
                                         r"altered"):
        keel_export([str(done), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_keel_export_refuses_merge_of_a_full_checkpoint_and_a_used_out_dir(tmp_path):
    done = _fake_checkpoint(tmp_path / "run", 4, lora=None)
    with pytest.raises(SystemExit, match="--merge merges LoRA adapters, but .*step_000004 is a full fine-tune"):
        keel_export([str(done), "--out", str(tmp_path / "out"), "--merge"])
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "model.safetensors").write_text("")
    with pytest.raises(SystemExit, match=r"--out .*used exists and is not an empty directory"):
        keel_export([str(done), "--out", str(tmp_path / "used")])


def test_the_model_comes_from_the_checkpoint_or_else_the_runs_config(tmp_path, tiny_path):
    cfg = compose("model.dtype=bfloat16")
    assert export.model_record(cfg, tiny_path) == {"path": tiny_path, "dtype": "bfloat16", "trust_remote_code": False}
    run = tmp_path / "run"
    old = _fake_checkpoint(run, 2)  # written before keel_state.json recorded the model
    (run / "config.yaml").write_text(OmegaConf.to_yaml(redact(to_plain(cfg))))  # as keel train writes it
    assert export._record_from_run(old) == export.model_record(cfg, tiny_path)


def test_keel_help_lists_export(capsys):
    keel_main(["--help"])
    assert "export    a checkpoint as a Hugging Face model" in capsys.readouterr().out


def test_full_export_writes_the_runs_dtype_and_refuses_other_weights(tmp_path, tiny_path):
    """The fp32 weights a checkpoint holds are written in the run's dtype (bf16 for bf16 runs) on the base's
    architecture, and load; weights of another architecture are refused naming both."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    weights = {k: v.float() + 0.5 for k, v in AutoModelForCausalLM.from_pretrained(tiny_path).state_dict().items()}
    record = {"path": tiny_path, "dtype": "bfloat16", "trust_remote_code": False}
    export._write_full(weights, record, tmp_path / "out", tmp_path / "ckpt")
    written = load_file(tmp_path / "out" / "model.safetensors")
    assert written.keys() == weights.keys() and {v.dtype for v in written.values()} == {torch.bfloat16}
    assert all(torch.equal(written[k], weights[k].to(torch.bfloat16)) for k in weights)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.dtype == torch.bfloat16 and (tmp_path / "out" / "generation_config.json").is_file()
    del weights["lm_head.weight"]
    with pytest.raises(ValueError, match=r"ckpt does not match the model at .*missing \['lm_head\.weight'\]"):
        export._write_full(weights, record, tmp_path / "other", tmp_path / "ckpt")
