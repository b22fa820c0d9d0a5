"""The python checker's sandbox: each attack of issue 19 fails and leaves nothing behind; limits count
only the sandbox; could-not-run is told apart from failed; no sandbox is an error, never a fallback."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from functools import partial
from pathlib import Path

import pytest
from keel.cli.train import checked
from keel.eval import checkers, sandbox
from keel.eval.checkers import make_python_checker

from tests.conftest import compose

REPO_PLATFORM = Path(__file__).resolve().parents[2] / "platform"


@pytest.fixture
def check(monkeypatch):
    """The python checker as passk uses it (opted in), with a short wall limit."""
    monkeypatch.setenv("KEEL_ALLOW_CODE_EXECUTION", "1")
    return make_python_checker(timeout_s=3)


def _processes_with(marker: str) -> list[int]:
    """Live (non-zombie) processes whose command line holds ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker.encode() in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


# ------------------------------------------------------------------------------- the attacks


READ_ENVIRON = """
import os
seen = []
for pid in [os.getppid()] + [int(p) for p in os.listdir("/proc") if p.isdigit()]:
    try:
        seen.append(open("/proc/%d/environ" % pid, "rb").read())
    except OSError:
        pass
assert any(SECRET.encode() in s for s in seen)
"""

CHECK_IN_CHILD = """
import sys
sys.path.insert(0, sys.argv[1])
from keel.eval.checkers import make_python_checker
print("PASSED" if make_python_checker(timeout_s=3, allow_code_execution=True)(sys.argv[2], "") else "FAILED")
"""


def test_cannot_read_the_parents_environment():
    # /proc/<pid>/environ shows the environment a process started with, so the checker runs in a
    # child process started with the secret, like a Ray worker started with WANDB_API_KEY.
    secret = f"hunter2-{uuid.uuid4().hex}"
    attack = f"SECRET = {secret!r}\n" + READ_ENVIRON
    out = subprocess.run([sys.executable, "-c", CHECK_IN_CHILD, str(REPO_PLATFORM), attack], capture_output=True,
                         text=True, timeout=60, env={**os.environ, "WANDB_API_KEY": secret})
    assert out.stdout.strip() == "FAILED", out.stderr[-2000:]


def test_cannot_read_files_in_the_home_directory(check, monkeypatch, tmp_path):
    home = tmp_path / "home"
    (home / ".config").mkdir(parents=True)
    (home / ".config" / "token").write_text("hunter2")
    monkeypatch.setenv("HOME", str(home))
    # The real home and the working directory: anything there but the path down to the interpreter
    # (/root/.pyenv/... here, bound read-only) must stay invisible.
    interpreter = Path(os.path.realpath(sys.base_prefix))
    private = {str(d): sorted(set(os.listdir(d)) - {p.name for p in [interpreter, *interpreter.parents]})
               for d in (os.path.expanduser("~root" if os.geteuid() == 0 else "~"), str(Path.cwd()))}
    assert any(private.values())
    attack = f"""
import os
found = []
for d, names in {private!r}.items():
    try:
        found += set(os.listdir(d)) & set(names)
    except OSError:
        pass
try:
    found.append(open({str(home / ".config" / "token")!r}).read())
except OSError:
    pass
assert found, "nothing readable"
"""
    assert check(attack, "") is False


def test_cannot_connect_to_a_local_service(check):
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        attack = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'x')"
        assert check(attack, "") is False
        server.setblocking(False)
        with pytest.raises(BlockingIOError):  # a finished handshake would wait in the backlog
            server.accept()


def test_cannot_write_outside_its_directory(check, tmp_path):
    targets = [tmp_path / "escaped.txt", Path.cwd() / f"escaped-{uuid.uuid4().hex}.txt"]
    attack = f"""
ok = 0
for path in {[str(t) for t in targets]!r}:
    try:
        open(path, "w").write("x")
        ok += 1
    except OSError:
        pass
assert ok
"""
    assert check(attack, "") is False
    assert [t for t in targets if t.exists()] == []


def test_only_its_tmpfs_is_writable(check, tmp_path):
    candidates = ["/", "/usr", "/usr/lib", "/dev", "/dev/shm", "/etc", "/root", "/home", sys.base_prefix,
                  os.path.dirname(os.__file__), str(tmp_path), "/proc", "/sys", "/var/tmp"]
    probe = f"""
import os
writable = []
for d in {candidates!r} + ["/tmp", "."]:
    try:
        with open(os.path.join(d, ".keel-probe"), "w"):
            pass
        writable.append(d)
    except OSError:
        pass
assert writable == ["/tmp", "."], writable
"""
    assert check(probe, "") is True


def test_a_setsid_grandchild_dies_with_the_sandbox(check):
    marker = f"keel-marker-{uuid.uuid4().hex}"
    attack = f"""
import os, sys, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execv(sys.executable, [sys.executable, "-c",
                 "open('/tmp/started', 'w').close(); import time; time.sleep(60)", {marker!r}])
    os._exit(0)
while not os.path.exists("/tmp/started"):
    time.sleep(0.01)
raise SystemExit(1)
"""
    assert check(attack, "") is False
    assert _processes_with(marker) == []  # gone when the checker returns, not eventually


def test_fork_bomb_is_bounded_and_killed(check):
    marker = f"keel-bomb-{uuid.uuid4().hex}"
    bomb = f"""
import os, sys
for _ in range(2000):
    try:
        if os.fork() == 0:
            os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(60)", {marker!r}])
    except OSError:
        raise SystemExit(1)  # stopped by the process limit
"""
    assert make_python_checker(timeout_s=3, max_procs=32)(bomb, "") is False
    assert _processes_with(marker) == []


# ------------------------------------------------------------------------------- limits


def _park_threads(n: int) -> threading.Event:
    """Start ``n`` idle threads in this process (as a Ray worker has); set the event to end them."""
    stop = threading.Event()
    for _ in range(n):
        threading.Thread(target=stop.wait, daemon=True).start()
    return stop


THREADED = """
import threading
out = []
ts = [threading.Thread(target=lambda i=i: out.append(i * i)) for i in range(16)]
for t in ts:
    t.start()
for t in ts:
    t.join()
"""


def test_threaded_program_passes_beside_many_threads(check):
    stop = _park_threads(150)
    try:
        assert make_python_checker(timeout_s=5, max_procs=24)(THREADED, "assert sorted(out) == [i * i for i in "
                                                                          "range(16)]")
    finally:
        stop.set()


UNPRIVILEGED = """
import sys, threading
sys.path.insert(0, sys.argv[1])
from keel.eval.checkers import make_python_checker
stop = threading.Event()
for _ in range(150):
    threading.Thread(target=stop.wait, daemon=True).start()
ok = make_python_checker(timeout_s=5, max_procs=24, allow_code_execution=True)(sys.argv[2], sys.argv[3])
stop.set()
print("PASSED" if ok else "FAILED")
"""


def _drop_to_nobody() -> None:
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)


def test_threaded_program_passes_for_an_unprivileged_user():
    """A non-root user's threads elsewhere (a Ray worker's) must not count against the program's limit."""
    python = shutil.which("python3", path="/usr/bin:/bin")
    if os.geteuid() != 0:
        pytest.skip("covered by test_threaded_program_passes_beside_many_threads when not root")
    if python is None or not os.access(REPO_PLATFORM, os.R_OK | os.X_OK) or \
            subprocess.run([python, "-c", "import sys; assert sys.version_info >= (3, 10)"]).returncode:
        pytest.skip("needs a system python3 >= 3.10 and a checkout readable by nobody")
    if not all(os.stat(p).st_mode & 0o005 == 0o005 for p in [REPO_PLATFORM, *REPO_PLATFORM.parents]):
        pytest.skip("the checkout is not readable by nobody")
    out = subprocess.run([python, "-I", "-c", UNPRIVILEGED, str(REPO_PLATFORM), THREADED,
                          "assert sorted(out) == [i * i for i in range(16)]"],
                         capture_output=True, text=True, timeout=60, preexec_fn=_drop_to_nobody, cwd="/")
    assert out.stdout.strip() == "PASSED", out.stderr[-2000:]


def test_limits_are_could_not_run_not_failed():
    limits = sandbox.Limits(timeout_s=1, memory_mb=256)
    assert sandbox.run("x = bytearray(2 * 1024**3)", limits) == sandbox.Outcome("could_not_run", "memory_limit")
    assert sandbox.run("x = bytearray(16 * 1024**2)", limits) == sandbox.Outcome("passed")
    start = time.monotonic()
    assert sandbox.run("while True:\n    pass", limits) == sandbox.Outcome("could_not_run", "timeout")
    assert time.monotonic() - start < 4
    big = sandbox.Limits(timeout_s=3, fsize_mb=1)
    assert sandbox.run("open('f', 'wb').write(b'x' * 4 * 2**20)", big) == sandbox.Outcome("could_not_run",
                                                                                         "file_limit")
    assert sandbox.run("raise SystemExit(3)", limits) == sandbox.Outcome("failed")
    assert sandbox.run("assert 1 == 2", limits) == sandbox.Outcome("failed")


def test_classify_reads_limits_from_status_and_stderr():
    killed_cpu = 0x18  # killed by SIGXCPU (24)
    assert sandbox.classify(killed_cpu, "-", b"") == sandbox.Outcome("could_not_run", "cpu_limit")
    assert sandbox.classify(1 << 8, "-", b"Traceback...\nMemoryError\n").reason == "memory_limit"
    assert sandbox.classify(1 << 8, "-", b"BlockingIOError: [Errno 11] Resource temporarily unavailable\n"
                            ).reason == "process_limit"
    assert sandbox.classify(1 << 8, "-", b"AssertionError\n") == sandbox.Outcome("failed")
    assert sandbox.classify(0, "process_limit", b"") == sandbox.Outcome("could_not_run", "process_limit")
    assert sandbox.classify(0, "-", b"") == sandbox.Outcome("passed")


# ------------------------------------------------------------------------------- no sandbox


def test_missing_bubblewrap_is_an_error_never_a_fallback(monkeypatch):
    monkeypatch.setenv("KEEL_ALLOW_CODE_EXECUTION", "1")
    monkeypatch.setattr(sandbox, "find_bwrap", lambda: None)
    with pytest.raises(sandbox.SandboxError, match="bubblewrap"):
        checkers.get("python")
    with pytest.raises(sandbox.SandboxError, match="bubblewrap"):
        make_python_checker()("print(1)", "")  # a checker made earlier refuses too
    with pytest.raises(sandbox.SandboxError, match="bubblewrap"):
        sandbox.run("print(1)")


def test_a_sandbox_that_cannot_start_is_an_error(monkeypatch, tmp_path):
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(sandbox, "find_bwrap", lambda: str(fake))
    sandbox._supports.cache_clear()
    try:
        with pytest.raises(sandbox.SandboxError, match="No permissions to create new namespace"):
            sandbox.run("print(1)")
    finally:
        sandbox._supports.cache_clear()


# ------------------------------------------------------------------------------- opt-in where it is used


# The config as a run validates it: the CLI resolves the code-execution opt-in (keel.cli.train.checked).
_checked = partial(compose, validate=checked)


def test_config_refuses_python_checker_without_opt_in(monkeypatch):
    monkeypatch.delenv("KEEL_ALLOW_CODE_EXECUTION", raising=False)
    on = ["eval.every_n_steps=2", "eval.passk.checker=python"]
    with pytest.raises(ValueError, match=r"eval\.passk\.checker=python: .*KEEL_ALLOW_CODE_EXECUTION"):
        _checked(*on)
    assert _checked(*on, "eval.passk.allow_code_execution=true").eval.passk.allow_code_execution is True
    assert _checked("eval.passk.checker=python").eval.passk.allow_code_execution is False  # eval off: unused
    monkeypatch.setenv("KEEL_ALLOW_CODE_EXECUTION", "1")
    assert _checked(*on).eval.passk.allow_code_execution is True  # resolved here, so Ray workers see it


def test_keel_eval_passk_refuses_before_loading_anything(monkeypatch, tmp_path):
    from keel.cli import eval as cli

    monkeypatch.delenv("KEEL_ALLOW_CODE_EXECUTION", raising=False)
    args = cli.parser().parse_args(["passk", "--model", str(tmp_path / "missing"), "--data",
                                    str(tmp_path / "missing.jsonl"), "--checker", "python"])
    with pytest.raises(ValueError, match="KEEL_ALLOW_CODE_EXECUTION"):  # not "--model must be a ... directory"
        cli.run_passk(args)
    monkeypatch.setattr(sandbox, "find_bwrap", lambda: None)
    args = cli.parser().parse_args(["passk", "--model", str(tmp_path / "missing"), "--data",
                                    str(tmp_path / "missing.jsonl"), "--checker", "python", "--allow-code-execution"])
    with pytest.raises(sandbox.SandboxError, match="bubblewrap"):
        cli.run_passk(args)


def test_report_counts_could_not_run_apart_as_not_passing():
    from keel.eval.generate import Prompt, Sample
    from keel.eval.passk import pass_at_k
    from keel.eval.report import build_report, format_table

    passed, failed = sandbox.Outcome("passed"), sandbox.Outcome("failed")
    timeout = sandbox.Outcome("could_not_run", "timeout")
    prompts = [Prompt([{"role": "user", "content": "q"}], "r")] * 2
    samples = [[Sample("a", 1, [1.0])] * 4] * 2
    report = build_report(prompts, samples, [[passed, timeout, failed, timeout], [failed] * 3 + [passed]], [1, 4])
    assert report["per_prompt"] == [{"n": 4, "c": 1, "could_not_run": 2}, {"n": 4, "c": 1, "could_not_run": 0}]
    assert report["could_not_run"] == {"total": 2, "by_reason": {"timeout": 2}}
    assert report["pass_at_k"]["1"]["mean"] == pytest.approx(pass_at_k(4, 1, 1))
    assert report["examples"][0]["completions"][1] == {"text": "a", "tokens": 1, "passed": False,
                                                       "could_not_run": "timeout"}
    assert "could not run: 2 of 8 samples (timeout 2)" in format_table(report)


def test_keel_train_refuses_without_bubblewrap_before_starting(monkeypatch, tmp_path):
    """Config validation checks the opt-in only (keel submit validates where the job will not run);
    keel train checks the sandbox itself before anything starts."""
    from keel.cli import train

    monkeypatch.setattr(sandbox, "find_bwrap", lambda: None)
    on = ["eval.every_n_steps=2", "eval.passk.checker=python", "eval.passk.allow_code_execution=true"]
    assert _checked(*on).eval.passk.allow_code_execution is True  # validates without bubblewrap
    monkeypatch.setattr("keel.launch.driver.run_training", lambda *a: pytest.fail("started without a sandbox"))
    monkeypatch.setattr(sys, "argv", ["keel train", f"hydra.run.dir={tmp_path / 'run'}", *on])
    with pytest.raises(SystemExit, match="bubblewrap"):
        train.main()
