"""One run per run directory: a second `keel train` (or `keel preprocess --out`) is refused at once, naming the
holder; a dead holder's lock is free (Slurm requeue); readers of a preprocessed folder exclude its writer."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from keel.launch import runlock

KEEL = str(Path(sys.executable).with_name("keel"))
TRY_LOCK = ("import sys; from pathlib import Path; from keel.launch import runlock\n"
            "try:\n    runlock.acquire(Path(sys.argv[1]), 'child')\nexcept runlock.DirectoryInUse as e:\n"
            "    sys.exit(str(e))\nprint('locked', flush=True)\nsys.stdin.read()\n")


@pytest.fixture
def held(tmp_path):
    lock = runlock.acquire(tmp_path / "run", "keel train")
    yield lock
    runlock.release(lock)


def test_a_second_holder_is_refused_naming_the_first(held, tmp_path):
    assert runlock.acquire(tmp_path / "run", "again") is held  # the same process: the lock it holds
    out = subprocess.run([sys.executable, "-c", TRY_LOCK, str(tmp_path / "run")], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 1
    for part in (f"pid {os.getpid()}", f"host {socket.gethostname()}", held.holder["started"], held.attempt,
                 "keel train", "keel.lock"):
        assert part in out.stderr, part
    assert json.loads((tmp_path / "run" / runlock.LOCK_FILE).read_text())["attempt"] == held.attempt


def test_a_killed_holders_lock_is_free(tmp_path):
    """A requeued Slurm job finds the lock file of the job before it: the kernel dropped the lock with its holder."""
    child = subprocess.Popen([sys.executable, "-c", TRY_LOCK, str(tmp_path / "run")], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "locked"
    with pytest.raises(runlock.DirectoryInUse, match=f"pid {child.pid} on host"):
        runlock.acquire(tmp_path / "run", "keel train")
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    lock = runlock.acquire(tmp_path / "run", "keel train")
    try:
        assert json.loads((tmp_path / "run" / runlock.LOCK_FILE).read_text())["pid"] == os.getpid()
        assert lock.attempt and lock.attempt != json.dumps({})
    finally:
        runlock.release(lock)


def test_keel_train_is_refused_at_once_before_touching_the_run_dir(held, tmp_path):
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    t0 = time.monotonic()
    out = subprocess.run([KEEL, "train", f"hydra.run.dir={run}", "logger=none", "trainer.max_steps=2"],
                         capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    took = time.monotonic() - t0
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    assert f"{run} is in use by keel train (pid {os.getpid()} on host {socket.gethostname()}" in out.stderr
    assert sorted(p.name for p in run.iterdir()) == [runlock.LOCK_FILE]  # no .hydra/, no data, no Ray
    assert took < 120, took  # refused before any data or Ray work (seconds when the machine is idle)


def test_keel_preprocess_out_is_locked_and_keeps_the_lock_file(tmp_path):
    out_dir = tmp_path / "pre"
    out_dir.mkdir()
    (out_dir / "rows-00000.parquet").write_bytes(b"old")
    lock = runlock.acquire(out_dir, "keel preprocess")
    try:
        done = subprocess.run([KEEL, "preprocess", "--out", str(out_dir), "--overwrite"], capture_output=True,
                              text=True, timeout=300, cwd=tmp_path)
        assert done.returncode == 1 and f"in use by keel preprocess (pid {os.getpid()}" in done.stderr
        assert (out_dir / "rows-00000.parquet").read_bytes() == b"old"  # nothing deleted under a live writer
    finally:
        runlock.release(lock)


def test_readers_of_a_preprocessed_folder_exclude_its_writer(tmp_path):
    writer = runlock.acquire(tmp_path, "keel preprocess")
    with pytest.raises(runlock.DirectoryInUse, match=f"is being written by keel preprocess \\(pid {os.getpid()}"):
        runlock.acquire_shared(tmp_path)
    runlock.release(writer)
    done = subprocess.run([sys.executable, "-c", TRY_LOCK, str(tmp_path)], input="", capture_output=True, text=True,
                          timeout=60)  # a writer that came and went
    assert done.returncode == 0
    reader = runlock.acquire_shared(tmp_path)  # `keel train data.preprocessed=` reading it
    try:
        out = subprocess.run([sys.executable, "-c", TRY_LOCK, str(tmp_path)], capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 1 and "in use by a process reading it" in out.stderr
    finally:
        runlock.release(reader)
