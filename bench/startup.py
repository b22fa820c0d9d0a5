"""Start-up of the quick start's ``keel train``: where the fixed cost goes, warm and fresh.

Issue 20, "Start-up": the README quick start (``keel train``: the tiny model, the demo data, 2 local Ray
workers, ZeRO-3, W&B offline, 60 steps) spends part of its wall time in its steps and the rest in fixed
cost: imports, the config, the data plan, Ray's start, Ray Train's worker group, the workers' imports,
DeepSpeed's engine, W&B, the final checkpoint, the export, Ray's shutdown. This script runs the command as a
user does (a subprocess from a fresh directory) with ``KEEL_TIMELINE`` set, so the driver and rank 0 mark each
phase they finish (``keel.core.timeline``), and reports every phase.

- ``warm``: the user's caches as they are (after one unmeasured run has filled them).
- ``fresh``: an empty cache for everything a first run builds or downloads: Keel's (the tiny tokenizer and
  model), torch's JIT extensions, Hugging Face, W&B and ``XDG_CACHE_HOME`` all point at new temporary
  folders, a new one per run (the user's real caches are never touched).

Fixed cost = the process's wall time minus the steps (from the end of W&B's start, where the training loop
begins, to the last step's end on rank 0). Each mode runs ``--runs`` times; the table shows the run with the
median fixed cost and every run's fixed cost. ``cpu_s``: CPU seconds of the whole process tree (driver, Ray,
workers), which on a 2-core machine bounds how far overlapping can go.

Usage (from the repository root):
  python bench/startup.py --label after --baseline before=../old/.venv/bin/keel --steps 10
      # an older checkout's keel and this one's, side by side in one run (runs interleaved): 3 warm + 3 fresh each;
      # bench/results/startup.json + the docs/benchmarks.md section
  python bench/startup.py --runs 1 --modes warm --steps 5 --no-doc   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import common  # first of the non-standard imports: it keeps bench/ from shadowing modules (bench/common.py)

RESULTS = common.RESULTS / "startup.json"
BEGIN, END = common.markers("startup")
KEEL = str(Path(sys.executable).with_name("keel"))
FRESH_DIRS = ("KEEL_CACHE_DIR", "TORCH_EXTENSIONS_DIR", "HF_HOME", "XDG_CACHE_HOME", "WANDB_CACHE_DIR",
              "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "TRITON_CACHE_DIR")

# (phase, the mark that ends it): consecutive marks of the driver (d) and rank 0 (w), in the order they end.
PHASES = (
    ("imports, config (driver)", "config"),
    ("data plan (tokenizer, rows, packing)", "data_plan"),
    ("resume decision, worker inputs", "worker_inputs"),
    ("Ray start (waited for)", "ray_init"),
    ("Ray Train trainer, datasets", "fit_start"),
    ("controller, placement, until rank 0's process starts", "worker_process"),
    ("worker process start (Ray worker, Ray Train, process group)", "worker_start"),
    ("worker imports", "worker_imports"),
    ("process group, dataset shards", "worker_group"),
    ("attention backend", "attention"),
    ("engine (model, DeepSpeed ZeRO-3), resume point", "engine"),
    ("W&B start", "logger"),
    ("STEPS (not fixed cost)", "last_step"),
    ("final checkpoint", "checkpoint"),
    ("export (hf/)", "export"),
    ("run result, W&B finish, worker group end", "fit_end"),
    ("summary", "summary"),
    ("exit (Ray shutdown)", "exit"),
)
STEPS_PHASE = "STEPS (not fixed cost)"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per mode")
    parser.add_argument("--modes", default="warm,fresh", help="comma-separated: warm, fresh")
    parser.add_argument("--steps", type=int, default=None, help="trainer.max_steps (default: the quick start's)")
    parser.add_argument("--label", default="current", help="this checkout's name in the results (e.g. after)")
    parser.add_argument("--baseline", default=None, metavar="LABEL=KEEL",
                        help="another checkout's keel executable (e.g. before=../old/.venv/bin/keel), measured in "
                             "the same run, its runs interleaved with this one's")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra environment")
    parser.add_argument("overrides", nargs="*", default=[], help="extra keel train overrides")
    parser.add_argument("--no-doc", action="store_true", help="do not rewrite the docs/benchmarks.md section")
    return parser.parse_args()


def fresh_env(root: Path) -> dict[str, str]:
    """Every cache a first run fills, pointed at an empty folder under ``root``."""
    return {key: str(root / key.lower()) for key in FRESH_DIRS}


def run_once(mode: str, args: argparse.Namespace, keel: str) -> dict:
    """One ``keel train`` (the executable ``keel``) from a new directory; its phases, wall time and CPU seconds."""
    root = Path(tempfile.mkdtemp(prefix=f"keel-startup-{mode}-"))
    try:
        timeline = root / "timeline.jsonl"
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(WANDB_MODE="offline", KEEL_TIMELINE=str(timeline))
        env.update(dict(kv.split("=", 1) for kv in args.env))
        if mode == "fresh":
            env.update(fresh_env(root))
        overrides = [*([f"trainer.max_steps={args.steps}"] if args.steps else []), *args.overrides]
        t0 = time.time()
        proc = subprocess.Popen([keel, "train", *overrides], cwd=root, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        cpu = CpuSampler(proc.pid)
        stdout, _ = proc.communicate(timeout=1800)
        t_exit = time.time()
        cpu.stop()
        out = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, "")
        if out.returncode != 0:
            raise SystemExit(f"keel train failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        marks = {m["what"]: m["t"] for m in map(json.loads, timeline.read_text().splitlines())}
        marks["exit"] = t_exit
        return phases(marks, t0) | {"cpu_s": round(cpu.total(), 1)}
    finally:
        shutil.rmtree(root, ignore_errors=True)


class CpuSampler:
    """CPU seconds of a process and all its descendants (Ray's servers and workers), read from /proc every
    0.2 s: each process counts with its last reading (Linux only; the last 0.2 s of a process may be missed)."""

    def __init__(self, pid: int) -> None:
        self.root, self.seen = pid, {}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        tick = os.sysconf("SC_CLK_TCK")
        while not self.done.wait(0.2):
            stats = {}
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    raw = Path(f"/proc/{pid}/stat").read_text()
                except OSError:
                    continue
                fields = raw[raw.rfind(")") + 2:].split()
                stats[int(pid)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
            family = {self.root} | set(self.seen)
            for _ in range(16):  # descendants: parents first, a few levels deep
                family |= {pid for pid, (ppid, _) in stats.items() if ppid in family}
            for pid in family & stats.keys():
                self.seen[pid] = stats[pid][1]

    def stop(self) -> None:
        self.done.set()
        self.thread.join()

    def total(self) -> float:
        return sum(self.seen.values())


def phases(marks: dict[str, float], t0: float) -> dict:
    """Each phase's seconds (from the previous mark that exists), the wall time and the fixed cost."""
    out, prev = {}, t0
    for name, end in PHASES:
        if end in marks:
            out[name] = round(marks[end] - prev, 2)
            prev = marks[end]
    wall = marks["exit"] - t0
    steps = out.get(STEPS_PHASE, 0.0)
    return {"phases": out, "wall_s": round(wall, 2), "steps_s": steps, "fixed_s": round(wall - steps, 2)}


def keels(args: argparse.Namespace) -> dict[str, str]:
    """The checkouts measured: the baseline's executable (if any), then this one's."""
    out = {}
    if args.baseline:
        label, path = args.baseline.split("=", 1)
        out[label] = path
    out[args.label] = KEEL
    return out


def measure(args: argparse.Namespace) -> dict[str, dict[str, list[dict]]]:
    """Every checkout's runs per mode; runs alternate between checkouts and modes, so machine load (which
    drifts over minutes on a shared host) hits all alike."""
    results: dict[str, dict[str, list[dict]]] = {label: {} for label in keels(args)}
    modes = [m for m in args.modes.split(",") if m]
    if "warm" in modes:
        for label, keel in keels(args).items():
            print(f"{label}: warm-up run (fills the caches; not counted)", flush=True)
            run_once("warm", argparse.Namespace(**{**vars(args), "steps": 2}), keel)
    for i in range(args.runs):
        for mode in modes:
            for label, keel in keels(args).items():
                r = run_once(mode, args, keel)
                print(f"{label} {mode} run {i + 1}: wall {r['wall_s']:.1f} s, steps {r['steps_s']:.1f} s, "
                      f"fixed {r['fixed_s']:.1f} s, cpu {r['cpu_s']:.0f} s", flush=True)
                results[label].setdefault(mode, []).append(r)
    return results


def median_run(runs: list[dict]) -> dict:
    """The run with the median fixed cost (the lower middle one of an even count)."""
    return sorted(runs, key=lambda r: r["fixed_s"])[(len(runs) - 1) // 2]


def section(all_results: dict) -> str:
    """The docs/benchmarks.md section: per measurement, each checkout and mode side by side (the run with the
    median fixed cost), every run's fixed cost, and the ratio of the medians to the first checkout's."""
    lines = [BEGIN, "## Start-up of the quick start's `keel train`", "",
             "Generated by `bench/startup.py`; raw numbers in `bench/results/startup.json`. Fixed cost = wall "
             "time minus the steps (rank 0's first step's start to its last step's end).", ""]
    for name, entry in all_results.items():
        meta, res = entry["meta"], entry["results"]
        lines += [f"### {name}", "", f"- Command: `{meta['command']}`",
                  f"- Machine: {meta['machine']}; load average at the start {meta['load']}; {meta['date']}.", ""]
        cols = [(label, mode) for mode in next(iter(res.values())) for label in res]
        med = {(label, mode): median_run(res[label][mode]) for label, mode in cols}
        lines += ["| phase | " + " | ".join(f"{label}, {mode} (s)" for label, mode in cols) + " |",
                  "|---|" + "---:|" * len(cols)]
        for phase, _ in PHASES:
            if any(phase in med[c]["phases"] for c in cols):
                lines.append(f"| {phase} | " + " | ".join(f"{med[c]['phases'].get(phase, 0):.1f}" for c in cols) + " |")
        for key, title in (("wall_s", "**wall**"), ("steps_s", "steps"), ("fixed_s", "**fixed cost**"),
                           ("cpu_s", "CPU seconds, all processes")):
            lines.append(f"| {title} | " + " | ".join(f"{med[c][key]:.1f}" for c in cols) + " |")
        lines.append("| fixed cost of every run | " + " | ".join(
            ", ".join(f"{r['fixed_s']:.1f}" for r in res[label][mode]) for label, mode in cols) + " |")
        first = next(iter(res))
        lines.append(f"| **fixed cost / {first}'s** | " + " | ".join(
            f"{med[(label, mode)]['fixed_s'] / med[(first, mode)]['fixed_s']:.2f}" for label, mode in cols) + " |")
        lines.append("")
    lines.append(END)
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    cmd = shlex.join(["python", "bench/startup.py", *(a for e in args.env for a in ("--env", e)),
                      *(["--steps", str(args.steps)] if args.steps else []), "--runs", str(args.runs),
                      "--modes", args.modes, "--label", args.label,
                      *(["--baseline", args.baseline] if args.baseline else []), *args.overrides])
    meta = {"command": cmd, "date": common.utc_now(),
            "load": " ".join(f"{x:.1f}" for x in os.getloadavg()),
            "machine": f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}, Python "
                       f"{platform.python_version()}"}
    results = measure(args)
    stored = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    stored[" vs ".join(results)] = {"meta": meta, "results": results}
    common.write_json(RESULTS, stored)
    text = section(stored)
    print(text)
    if not args.no_doc:
        common.replace_section(text, BEGIN, END)


if __name__ == "__main__":
    main()
