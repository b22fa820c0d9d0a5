"""The quiet console: a worker's output goes to its rank log, Keel's own lines and each warning once reach the
driver, a failure shows the end of every rank's log. (The size of a real run's console:
tests/integration/test_train_e2e.py.)"""

from __future__ import annotations

import builtins
import io
import os
import subprocess
import sys
import textwrap
import time
import warnings

from keel.launch import console


def _printer(module: str):
    """A function of ``module`` that prints."""
    ns: dict = {"__name__": module}
    exec("def say(text, **kw):\n    print(text, **kw)\n", ns)
    return ns["say"]


def test_keel_lines_reach_the_console_other_prints_only_the_log(capsys):
    shown, plain = io.StringIO(), []
    saved = builtins.print
    builtins.print = console.keel_print(lambda *a, **kw: plain.append(" ".join(map(str, a))), shown)
    try:
        _printer("keel.train.loop")("step 1/60  loss 7.8")
        _printer("keel.tracking.logger")("warning: step 3: loss spike", flush=True)
        _printer("deepspeed.runtime.engine")("DeepSpeed op built successfully")
        _printer("wandb.sdk")("wandb: Tracking run")
        _printer("keel.train.loop")("to a file of its own", file=io.StringIO())
    finally:
        builtins.print = saved
    assert shown.getvalue() == "step 1/60  loss 7.8\nwarning: step 3: loss spike\n"
    assert plain == ["step 1/60  loss 7.8", "warning: step 3: loss spike", "DeepSpeed op built successfully",
                     "wandb: Tracking run", "to a file of its own"]


def test_each_warning_reaches_the_console_once():
    shown, log = io.StringIO(), io.StringIO()
    saved = warnings.showwarning
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = lambda m, c, f, n, file=None, line=None: log.write(f"{c.__name__}: {m}\n")
            console.warn_once(shown)
            for _ in range(3):
                warnings.warn("`all_gather_into_tensor` is deprecated", FutureWarning, stacklevel=1)
            warnings.warn("another", UserWarning, stacklevel=1)
    finally:
        warnings.showwarning = saved
    lines = shown.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("warning: FutureWarning: `all_gather_into_tensor` is deprecated (")
    assert lines[1].startswith("warning: UserWarning: another (")
    assert log.getvalue().count("FutureWarning") == 3  # the log keeps every occurrence


def test_the_driver_follows_the_console_file_line_by_line(tmp_path):
    path = console.logs_dir(tmp_path) / console.CONSOLE
    path.parent.mkdir()
    path.write_text("from an earlier start\n")  # a resumed run's console shows only this start's lines
    out = io.StringIO()
    with console.Follower(tmp_path, out, every_s=0.01):
        with path.open("a") as fh:
            fh.write("step 1/4\nstep 2")
            fh.flush()
            deadline = time.monotonic() + 5
            while "step 1/4" not in out.getvalue() and time.monotonic() < deadline:
                time.sleep(0.01)
            assert out.getvalue() == "step 1/4\n"  # a partial line waits for its end
            fh.write("/4\n")
    assert out.getvalue() == "step 1/4\nstep 2/4\n"


def test_a_failure_shows_the_end_of_every_ranks_log_since_the_start(tmp_path):
    logs = console.logs_dir(tmp_path)
    logs.mkdir()
    (logs / "rank0.log").write_text("old run\n")
    since = console.log_sizes(tmp_path)
    (logs / "rank0.log").write_text("old run\n" + "".join(f"line {i}\n" for i in range(20)))
    (logs / "rank1.log").write_text("fault injector: killing rank 1 after step 2\n")
    report = console.failure_report(tmp_path, since)
    assert report.splitlines()[0] == f"keel: the workers failed; the end of each worker's log in {logs}:"
    assert "old run" not in report and "rank0 | line 19" in report and "rank0 | line 11" not in report
    assert report.splitlines()[-1] == "  rank1 | fault injector: killing rank 1 after step 2"


def test_a_worker_sends_its_output_to_its_log_and_keel_lines_to_the_console(tmp_path):
    """setup_worker on rank 0 in a fresh process: file descriptors (C-level writes too) go to logs/rank0.log."""
    code = textwrap.dedent(f"""
        import os, warnings
        from pathlib import Path
        from keel.launch import console
        console.setup_worker(Path({str(tmp_path)!r}), 0)
        console.setup_worker(Path({str(tmp_path)!r}), 0)  # twice in one process: still one copy per line
        exec("print('workers: vm (ranks 0-1)')", {{"__name__": "keel.launch.ray_train"}})
        print("library chatter")
        os.write(1, b"c-level stdout\\n")
        os.write(2, b"c-level stderr\\n")
        for _ in range(2):
            warnings.warn("deprecated thing", FutureWarning)
    """)
    env = {k: v for k, v in os.environ.items() if k != console.VERBOSE_ENV}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == ""  # nothing left on the process's own stdout/stderr
    logs = console.logs_dir(tmp_path)
    log = (logs / "rank0.log").read_text()
    for needle in ("workers: vm", "library chatter", "c-level stdout", "c-level stderr", "FutureWarning"):
        assert needle in log, needle
    shown = (logs / console.CONSOLE).read_text().splitlines()
    assert shown[0] == "workers: vm (ranks 0-1)" and len(shown) == 2
    assert shown[1].startswith("warning: FutureWarning: deprecated thing (")


def test_verbose_changes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv(console.VERBOSE_ENV, "1")
    assert console.verbose() and console.worker_env() == {}
    console.setup_worker(tmp_path, 0)  # the worker's output stays where Ray streams it from
    assert not console.logs_dir(tmp_path).exists()
    monkeypatch.delenv(console.VERBOSE_ENV)
    assert not console.verbose() and console.worker_env() == {"RAY_DATA_DISABLE_PROGRESS_BARS": "1",
                                                              "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


def test_one_progress_line_per_log_every_steps_with_an_eta():
    from keel.tracking.logger import Progress

    p = Progress(total=10, every=4)
    row = {"loss": 2.5, "lr": 1e-3, "tokens_per_s": 12345.6}
    lines = {s: p.line({**row, "step": s}, now=100.0 + 2 * s) for s in range(3, 11)}  # resumed at step 2
    assert [s for s, line in lines.items() if line] == [4, 8, 10]  # every 4 steps, and the last
    assert lines[4] == "step 4/10  loss 2.5000  lr 1.000e-03  12,346 tok/s  ETA 0:00:12"  # 2 s/step, 6 to go
    assert lines[10].endswith("ETA 0:00:00")
    assert Progress(total=5, every=1).line({**row, "step": 1}, now=0.0).endswith("ETA --")  # no rate yet
