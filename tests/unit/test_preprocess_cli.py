"""`keel preprocess` refuses bad arguments before it starts any work."""

from __future__ import annotations

import pytest
from keel.cli import preprocess


def test_flags_and_overrides_are_told_apart():
    args, overrides = preprocess.parse_args(["--out", "d", "mix.T=2", "--procs", "3", "trainer.max_steps=5"])
    assert (args.out, args.procs, args.overwrite) == ("d", 3, False)
    assert overrides == ["mix.T=2", "trainer.max_steps=5"]
    for bad in (["--bogus"], ["--procs", "0"]):
        with pytest.raises(SystemExit):
            preprocess.parse_args(bad)


def test_an_existing_output_is_kept_unless_overwrite(tmp_path):
    (tmp_path / "report.json").write_text("{}")
    with pytest.raises(SystemExit, match="exists and is not empty; pass --overwrite"):
        preprocess.main(["--out", str(tmp_path)])
    assert (tmp_path / "report.json").exists()


def test_data_preprocessed_is_an_input_of_train_only(tmp_path):
    with pytest.raises(SystemExit, match="not of `keel preprocess`"):
        preprocess.main(["--out", str(tmp_path / "out"), f"data.preprocessed={tmp_path}"])
    assert not (tmp_path / "out").exists()
