"""Run untrusted Python (model-generated code) in a bubblewrap sandbox, only with explicit opt-in.

Opt-in: ``KEEL_ALLOW_CODE_EXECUTION=1`` in the environment, or the caller's flag
(``keel eval passk --allow-code-execution``, ``eval.passk.allow_code_execution=true``);
without it :func:`require_opt_in` raises, naming the variable. Each program then runs under
``bwrap`` (Debian/Ubuntu package ``bubblewrap``; there is no unsandboxed fallback):

- its own network (loopback only, nothing of the host's), PID, IPC, UTS and cgroup namespaces,
  with a fresh ``/proc`` showing only its own processes;
- a filesystem of read-only ``/usr`` (plus the ``/bin``, ``/lib*`` links), the interpreter's
  binary, standard library and shared library, read-only; no home, no run directory, no
  ``/etc`` beyond ``ld.so.cache``; the interpreter's ``site-packages`` hidden; a private,
  size-limited tmpfs at ``/tmp`` (the working directory) is the only writable place;
- an empty environment (``PATH``, ``HOME``, ``LANG``, ``TMPDIR`` only), run as ``python -I -S``;
- limits that count only the sandbox: run as root, the program gets a fresh, unused uid, so
  ``RLIMIT_NPROC`` counts its own processes and threads only; otherwise it runs in its own user
  namespace, where Linux >= 5.14 counts ``RLIMIT_NPROC`` per namespace. A watchdog inside the
  namespace also kills everything when the tasks, the resident memory (summed over its
  processes) or the tmpfs exceed the limits. ``RLIMIT_AS``/``RLIMIT_DATA`` bound each process,
  ``RLIMIT_CPU`` its CPU time, a wall-clock timeout the whole run;
- death with its parent (``--die-with-parent``) and, at the end or on timeout, the namespace's
  init is killed and awaited, which kills every process left in it (a ``setsid`` grandchild too).

:func:`run` returns an :class:`Outcome`: ``passed`` (exit 0), ``failed`` (any other exit), or
``could_not_run`` with the reason (``timeout``, ``cpu_limit``, ``memory_limit``,
``process_limit``, ``file_limit``). A sandbox that is missing or fails to start raises
:class:`SandboxError`, never a silent run without it.
"""

from __future__ import annotations

import json
import os
import platform
import random
import select
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from keel.errors import UserError

ENV_VAR = "KEEL_ALLOW_CODE_EXECUTION"
REASONS = ("timeout", "cpu_limit", "memory_limit", "process_limit", "file_limit")
_TRUE = ("1", "true", "yes", "on")
_UID_BASE = 1 << 30  # far above system, user and subordinate-id ranges (100000+ for rootless containers)


class SandboxError(UserError):
    """The sandbox is missing or could not start a program (an environment problem, not a failed sample)."""


def code_execution_allowed(flag: bool = False) -> bool:
    """True when the caller opted in (``flag``) or ``KEEL_ALLOW_CODE_EXECUTION`` is set to 1/true/yes/on."""
    return flag or os.environ.get(ENV_VAR, "").strip().lower() in _TRUE


def require_opt_in(flag: bool = False, how: str = "") -> None:
    """Raise UserError unless running model-generated code was explicitly allowed."""
    if not code_execution_allowed(flag):
        extra = f", or {how}" if how else ""
        raise UserError(f"the python checker executes model-generated code; it runs only with explicit opt-in: "
                         f"set {ENV_VAR}=1 in the environment{extra} (it then runs each program in a "
                         "bubblewrap sandbox, see docs/evaluation.md)")


@dataclass(frozen=True)
class Limits:
    """Per-program limits: wall time, memory (per process and summed), tasks, and file/tmpfs size."""

    timeout_s: float = 5.0
    memory_mb: int = 1024
    max_procs: int = 64  # processes + threads inside the sandbox
    fsize_mb: int = 16  # largest file, and the whole tmpfs

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.memory_mb <= 0 or self.max_procs <= 0 or self.fsize_mb <= 0:
            raise ValueError("timeout_s, memory_mb, max_procs and fsize_mb must all be positive")


@dataclass(frozen=True)
class Outcome:
    """How one program ended: ``passed``, ``failed`` or ``could_not_run`` (then ``reason`` says why)."""

    status: str
    reason: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# ------------------------------------------------------------------------------ the launcher

# Runs as the sandbox's first process (trusted code): drops root to a fresh uid where needed,
# forks the program with its limits, watches the namespace, reports "S" (started) then
# "E <wait status> <watchdog reason>\n<stderr tail>" on the status fd ("X <error>" if it cannot).
_LAUNCHER = r"""
import os, resource as R, signal, sys, time
fd, uid, mem, cpu, nproc, fsize, set_nproc = map(int, sys.argv[1:8])
py, dirs = sys.argv[8], sys.argv[9:]
os.write(fd, b"S")
try:
    if uid:
        for d in dirs:
            os.chmod(d, 0o755)
        os.chown("/tmp", uid, uid)
    err = os.memfd_create("stderr")  # not in /tmp: the program's directory holds only its own files
    pid = os.fork()
except Exception as e:
    os.write(fd, b"X %r" % e)
    raise SystemExit(1)
if pid == 0:
    try:
        os.dup2(err, 2)
        os.closerange(3, 65536)
        if uid:
            os.setgroups([]); os.setgid(uid); os.setuid(uid)
        lim = [(R.RLIMIT_AS, mem), (R.RLIMIT_DATA, mem), (R.RLIMIT_FSIZE, fsize), (R.RLIMIT_CORE, 0),
               (R.RLIMIT_NOFILE, 256)]
        lim += [(R.RLIMIT_NPROC, nproc)] if set_nproc else []
        for r, v in lim:
            R.setrlimit(r, (v, v))
        R.setrlimit(R.RLIMIT_CPU, (cpu, cpu + 1))
        os.execv(py, [py, "-I", "-S", "prog.py"])
    finally:
        os._exit(127)
def scan():
    tasks = rss = 0
    for p in os.listdir("/proc"):
        if p.isdigit() and p not in ("1", str(os.getpid())):
            try:
                f = open("/proc/%s/stat" % p).read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            tasks += int(f[17]); rss += int(f[21])
    v = os.statvfs("/tmp")
    return tasks, rss * os.sysconf("SC_PAGE_SIZE"), (v.f_blocks - v.f_bfree) * v.f_frsize
why, nap = "-", 0.002
while True:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        break
    tasks, rss, used = scan()
    why = ("process_limit" if tasks > nproc - 2 else "memory_limit" if rss > mem else
           "file_limit" if used > fsize else "-")
    if why != "-":
        os.kill(-1, signal.SIGKILL)
        status = os.waitpid(pid, 0)[1]
        break
    time.sleep(nap); nap = min(nap * 2, 0.02)
tail = os.pread(err, 2048, max(0, os.fstat(err).st_size - 2048))
os.write(fd, b"E %d %s\n" % (status, why.encode()) + tail)
"""


# ------------------------------------------------------------------------------ bwrap command


def find_bwrap() -> str | None:
    """Path of the ``bwrap`` executable, or None."""
    return shutil.which("bwrap") or next((p for p in ("/usr/bin/bwrap", "/bin/bwrap") if os.access(p, os.X_OK)),
                                         None)


def require_sandbox() -> str:
    """The bwrap path; SandboxError naming the package when it is missing."""
    path = find_bwrap()
    if path is None:
        raise SandboxError("the python checker needs bubblewrap (`bwrap`) to sandbox model-generated code, and "
                           "it is not installed: `apt-get install bubblewrap` (Debian/Ubuntu) or `dnf install "
                           "bubblewrap`; Keel never runs such code unsandboxed")
    return path


@lru_cache(maxsize=4)
def _supports(bwrap: str, flag: str) -> bool:
    """Whether this bwrap knows ``flag`` (0.4 on RHEL 8/9 lacks --size and --disable-userns)."""
    out = subprocess.run([bwrap, "--help"], capture_output=True, text=True, timeout=10)
    return flag in out.stdout + out.stderr


def _interpreter() -> tuple[str, list[str], list[str]]:
    """(base interpreter binary, paths it needs read-only, stdlib site-packages dirs to hide)."""
    exe = os.path.realpath(sys.executable)  # a venv's python is a link to the base interpreter
    paths = sysconfig.get_paths(vars={"base": sys.base_prefix, "platbase": sys.base_prefix})
    stdlib = {os.path.realpath(paths[k]) for k in ("stdlib", "platstdlib")}
    needs = {exe, *stdlib}
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir and os.path.isdir(libdir):  # libpython and what the stdlib's extensions link (conda: libffi, ssl)
        needs.add(os.path.realpath(libdir))
    needs = {p for p in needs if not any(p.startswith(q + "/") for q in needs)}  # a bound dir covers its files
    hidden = [os.path.join(d, "site-packages") for d in sorted(stdlib)
              if os.path.isdir(os.path.join(d, "site-packages"))]
    return exe, sorted(p for p in needs if not p.startswith("/usr/")), hidden


def _system_binds() -> list[str]:
    """``/usr`` read-only, the merged-/usr links (or directories) and the loader cache."""
    args = ["--ro-bind", "/usr", "/usr"]
    for name in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(name):
            args += ["--symlink", os.readlink(name), name]
        elif os.path.isdir(name):
            args += ["--ro-bind", name, name]
    if os.path.exists("/etc/ld.so.cache"):
        args += ["--ro-bind", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    return args


def _ancestors(paths: list[str]) -> list[str]:
    """Directories bwrap creates to mount ``paths`` (it makes them 0700; a dropped uid needs 0755)."""
    out: set[str] = set()
    for p in paths:
        parent = Path(p).parent
        while str(parent) not in ("/", "/usr") and not str(parent).startswith("/usr/"):
            out.add(str(parent))
            parent = parent.parent
    return sorted(d for d in out if not any(d == p or d.startswith(p + "/") for p in paths))


def _bwrap_argv(bwrap: str, limits: Limits, as_root: bool, prog_fd: int, info_fd: int) -> tuple[list[str], list[str]]:
    """The bwrap command up to the launcher, and the directories the launcher opens up."""
    exe, needs, hidden = _interpreter()
    argv = [bwrap, "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
            "--die-with-parent", "--new-session", "--info-fd", str(info_fd), "--clearenv",
            "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/tmp", "--setenv", "TMPDIR", "/tmp",
            "--setenv", "LANG", "C.UTF-8"]
    if not as_root:  # unprivileged bwrap needs a user namespace; forbid nesting more of them
        argv += ["--unshare-user"] + (["--disable-userns"] if _supports(bwrap, "--disable-userns") else [])
    argv += _system_binds()
    for p in needs:
        argv += ["--ro-bind", p, p]
    for d in hidden:  # -S already keeps it off sys.path; an empty mount keeps it unreadable too
        argv += ["--tmpfs", d, "--remount-ro", d]
    argv += ["--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev"]  # /dev/null still writes
    if _supports(bwrap, "--size"):
        argv += ["--size", str(limits.fsize_mb * 2**20)]
    argv += ["--tmpfs", "/tmp", "--file", str(prog_fd), "/tmp/prog.py"]
    if not as_root:  # root's dirs are root-owned; an unprivileged sandbox owns its own root tmpfs
        argv += ["--remount-ro", "/"]
    argv += ["--chdir", "/tmp"]
    return argv + [exe, "-I", "-S", "-c", _LAUNCHER], _ancestors(needs)


def _namespaced_nproc() -> bool:
    """Whether RLIMIT_NPROC counts per user namespace (Linux >= 5.14) rather than per uid overall."""
    try:
        major, minor = (int(x) for x in platform.release().split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (5, 14)


def _launcher_args(limits: Limits, uid: int, exe: str, dirs: list[str], status_fd: int) -> list[str]:
    """Arguments after ``-c LAUNCHER``: status fd, uid, limits, whether to set RLIMIT_NPROC, python, dirs."""
    nproc = limits.max_procs + 2  # the launcher and bwrap's init live in the namespace too
    set_nproc = uid != 0 or _namespaced_nproc()
    values = (status_fd, uid, limits.memory_mb * 2**20, int(limits.timeout_s) + 1, nproc, limits.fsize_mb * 2**20,
              int(set_nproc))
    return [str(v) for v in values] + [exe, *dirs]


# ------------------------------------------------------------------------------ one run


def _read_all(fd: int, deadline: float, until: bytes | None = None) -> bytes:
    """What is written to the pipe ``fd`` until its writers close it, ``until`` arrives or ``deadline`` passes."""
    out = b""
    while until is None or until not in out:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return out
        chunk = os.read(fd, 65536)
        if not chunk:
            return out
        out += chunk
    return out


def _init_pidfd(info: bytes, bwrap_pid: int) -> int | None:
    """A pidfd of the sandbox's init (from bwrap's ``--info-fd`` JSON), or None when it is gone."""
    try:
        pid = int(json.loads(info.decode())["child-pid"])
        pidfd = os.pidfd_open(pid)
    except (ValueError, KeyError, OSError):
        return None
    try:  # still bwrap's child, so the pidfd is the init's and not a reused pid's
        ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        ppid = -1
    if ppid != bwrap_pid:
        os.close(pidfd)
        return None
    return pidfd


def _kill_sandbox(proc: subprocess.Popen, pidfd: int | None) -> None:
    """Kill bwrap and the namespace's init, and wait until the init (so every process in it) is gone."""
    for target in (lambda: os.killpg(proc.pid, signal.SIGKILL),
                   lambda: pidfd is not None and signal.pidfd_send_signal(pidfd, signal.SIGKILL)):
        try:
            target()
        except (ProcessLookupError, PermissionError):
            pass
    if pidfd is not None:
        select.select([pidfd], [], [], 10.0)  # readable once the init has exited, after its namespace died
        os.close(pidfd)
    proc.wait()


def classify(status: int, why: str, stderr_tail: bytes) -> Outcome:
    """Outcome from the program's wait status, the watchdog's verdict and the end of its stderr."""
    if why in REASONS:
        return Outcome("could_not_run", why)
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
        return Outcome("passed")
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig in (signal.SIGXCPU, signal.SIGKILL):
            return Outcome("could_not_run", "cpu_limit")
        if sig == signal.SIGXFSZ:
            return Outcome("could_not_run", "file_limit")
        return Outcome("failed")
    lines = stderr_tail.decode("utf-8", "replace").strip().splitlines()
    last = lines[-1] if lines else ""
    if last.startswith("MemoryError"):
        return Outcome("could_not_run", "memory_limit")
    if "Resource temporarily unavailable" in last or "can't start new thread" in last:
        return Outcome("could_not_run", "process_limit")
    if "No space left on device" in last or "File too large" in last:
        return Outcome("could_not_run", "file_limit")
    return Outcome("failed")


def _spawn(program: str, limits: Limits) -> tuple[subprocess.Popen, int, int]:
    """Start bwrap on ``program``; (process, status read fd, info read fd)."""
    bwrap = require_sandbox()
    as_root = os.geteuid() == 0
    prog_fd = os.memfd_create("keel-prog")
    os.write(prog_fd, program.encode("utf-8", "surrogatepass"))
    os.lseek(prog_fd, 0, os.SEEK_SET)
    status_r, status_w = os.pipe()
    info_r, info_w = os.pipe()
    argv, dirs = _bwrap_argv(bwrap, limits, as_root, prog_fd, info_w)
    uid = _UID_BASE + random.SystemRandom().randrange(1 << 29) if as_root else 0
    argv += _launcher_args(limits, uid, argv[-5], dirs if as_root else [], status_w)  # argv[-5]: the interpreter
    try:
        proc = subprocess.Popen(argv, env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, pass_fds=(prog_fd, status_w, info_w),
                                start_new_session=True)
    finally:
        for fd in (prog_fd, status_w, info_w):
            os.close(fd)
    return proc, status_r, info_r


def run(program: str, limits: Limits = Limits()) -> Outcome:
    """Run ``program`` (Python source) in the sandbox; raise SandboxError if the sandbox cannot start."""
    deadline = time.monotonic() + limits.timeout_s
    proc, status_r, info_r = _spawn(program, limits)
    pidfd = None
    try:
        pidfd = _init_pidfd(_read_all(info_r, deadline, until=b"}"), proc.pid)
        report = _read_all(status_r, deadline)
    finally:
        _kill_sandbox(proc, pidfd)
        os.close(status_r)
        os.close(info_r)
    setup_error = proc.stderr.read().decode("utf-8", "replace").strip() if proc.stderr else ""
    if proc.stderr:
        proc.stderr.close()
    if not report.startswith(b"S"):
        raise SandboxError(f"the bubblewrap sandbox failed to start the program (exit {proc.returncode}): "
                           f"{setup_error[-2000:] or 'no message'}")
    if report.startswith(b"SX"):
        raise SandboxError(f"the sandbox's launcher failed: {report[3:].decode('utf-8', 'replace')}")
    head, _, tail = report[1:].partition(b"\n")
    if not head.startswith(b"E "):  # still running at the deadline (or the program killed the launcher)
        return Outcome("could_not_run", "timeout") if time.monotonic() >= deadline else Outcome("failed")
    _, status, why = head.split()
    return classify(int(status), why.decode(), tail)
