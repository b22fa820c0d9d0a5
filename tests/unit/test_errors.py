"""The CLI shows a user error (keel.errors.UserError, ConfigError among them) as one line; anything else is a bug
and keeps its traceback."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from keel.errors import ConfigError, UserError

SCRIPT = textwrap.dedent("""
    import argparse, sys
    from keel.cli.main import run_cli
    from keel.errors import ConfigError

    def run(args):
        if args.kind == "config":
            raise ConfigError("config error: mix.T must be > 0, got 0.0")
        raise ValueError("an internal invariant broke")

    parser = argparse.ArgumentParser(prog="keel demo")
    parser.add_argument("kind")
    run_cli(parser, run)
""")


def _run(kind: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT, kind], capture_output=True, text=True, timeout=120)


def test_a_config_error_is_one_line_and_an_internal_error_keeps_its_traceback():
    user = _run("config")
    assert user.returncode == 1 and user.stderr == "keel demo: config error: mix.T must be > 0, got 0.0\n"
    bug = _run("internal")
    assert bug.returncode == 1 and "Traceback (most recent call last)" in bug.stderr
    assert bug.stderr.rstrip().endswith("ValueError: an internal invariant broke")


def test_keel_train_shows_a_user_error_in_one_line_and_a_bug_with_its_traceback(monkeypatch, tmp_path, capfd):
    from keel.cli import train

    def fail_with(err: Exception):
        def run_training(*args):
            raise err
        return run_training

    monkeypatch.setattr(sys, "argv", ["keel train", f"hydra.run.dir={tmp_path / 'a'}"])
    monkeypatch.setattr("keel.launch.driver.run_training", fail_with(UserError("data source file not found: x")))
    with pytest.raises(SystemExit, match="^keel: data source file not found: x$"):
        train.main()
    monkeypatch.setattr(sys, "argv", ["keel train", f"hydra.run.dir={tmp_path / 'b'}"])
    monkeypatch.setattr("keel.launch.driver.run_training", fail_with(ValueError("an internal invariant broke")))
    capfd.readouterr()
    with pytest.raises(SystemExit) as done:  # Hydra reports what escapes the job: with its traceback
        train.main()
    err = capfd.readouterr().err
    assert done.value.code == 1 and "Traceback (most recent call last)" in err
    assert "ValueError: an internal invariant broke" in err


def test_a_bad_config_value_is_a_config_error_naming_the_key():
    from keel.config import MixConfig

    with pytest.raises(ConfigError, match=r"^config error: mix\.T must be > 0"):
        MixConfig(name="temperature", T=0)


def test_keel_plan_refuses_a_bad_value_in_one_line():
    out = subprocess.run([sys.executable, "-m", "keel.cli.main", "plan", "mix.T=0"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 1 and out.stderr.strip() == "keel: config error: mix.T must be > 0, got 0.0", out.stderr
