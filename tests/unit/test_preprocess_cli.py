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


def test_a_capped_source_stops_reading_once_its_cap_is_filled(monkeypatch):
    """keel preprocess: a capped source's reader stops at the block after the consumer filled the cap, so a
    streamed corpus with a cap (data=chat_mix's C4 replay) is not read whole (before: read to its end)."""
    import ray
    from keel.config import SourceConfig
    from keel.launch import preprocess as launch_preprocess

    class Caps:  # the CapsReached actor's interface, answered at once
        def __init__(self, filled: bool) -> None:
            self.reached = type("M", (), {"remote": staticmethod(lambda k: filled)})()

    monkeypatch.setattr(ray, "get", lambda ref: ref)
    src = SourceConfig(name="endless", kind="demo", task="text", num_examples=10**7, cap=10)
    blocks = launch_preprocess._read_rows(0, src, 0, 2**20, Caps(filled=True))
    assert [b.num_rows for b in blocks] == [launch_preprocess.BLOCK_ROWS]
    more = launch_preprocess._read_rows(0, SourceConfig(name="s", kind="demo", task="text", num_examples=1200),
                                        0, 2**20, Caps(filled=False))
    assert sum(b.num_rows for b in more) == 1200
