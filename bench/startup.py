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
lowest fixed cost and every run's fixed cost. ``cpu_s``: CPU seconds of the whole process tree (driver, Ray,
workers), which on a 2-core machine bounds how far overlapping can go.

Usage (from the repository root):
  python bench/startup.py --label before     # 3 warm + 3 fresh runs; bench/results/startup.json + doc section
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
    parser.add_argument("--label", default="current", help="the results' name (e.g. before, after)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra environment")
    parser.add_argument("overrides", nargs="*", default=[], help="extra keel train overrides")
    parser.add_argument("--no-doc", action="store_true", help="do not rewrite the docs/benchmarks.md section")
    return parser.parse_args()


def fresh_env(root: Path) -> dict[str, str]:
    """Every cache a first run fills, pointed at an empty folder under ``root``."""
    return {key: str(root / key.lower()) for key in FRESH_DIRS}


def run_once(mode: str, args: argparse.Namespace) -> dict:
    """One ``keel train`` from a new directory; its phases, wall time and CPU seconds."""
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
        proc = subprocess.Popen([KEEL, "train", *overrides], cwd=root, env=env, stdout=subprocess.PIPE,
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


def measure(args: argparse.Namespace) -> dict:
    results: dict[str, list[dict]] = {}
    modes = [m for m in args.modes.split(",") if m]
    if "warm" in modes:
        print("warm-up run (fills the caches; not counted)", flush=True)
        run_once("warm", argparse.Namespace(**{**vars(args), "steps": 2}))
    for i in range(args.runs):
        for mode in modes:  # modes alternate, so machine load hits both alike
            r = run_once(mode, args)
            print(f"{mode} run {i + 1}: wall {r['wall_s']:.1f} s, steps {r['steps_s']:.1f} s, "
                  f"fixed {r['fixed_s']:.1f} s, cpu {r['cpu_s']:.0f} s", flush=True)
            results.setdefault(mode, []).append(r)
    return results


def section(all_results: dict) -> str:
    """The docs/benchmarks.md section: per label and mode, the best run's phases and every run's fixed cost."""
    lines = [BEGIN, "## Start-up of the quick start's `keel train`", "",
             "Generated by `bench/startup.py`; raw numbers in `bench/results/startup.json`.", ""]
    for label, entry in all_results.items():
        meta, res = entry["meta"], entry["results"]
        lines += [f"### {label}", "", f"- Command: `{meta['command']}`",
                  f"- Machine: {meta['machine']}; load average at the start {meta['load']}; {meta['date']}.", ""]
        modes = list(res)
        best = {m: min(res[m], key=lambda r: r["fixed_s"]) for m in modes}
        lines += ["| phase | " + " | ".join(f"{m} (s)" for m in modes) + " |",
                  "|---|" + "---:|" * len(modes)]
        for name, _ in PHASES:
            if any(name in best[m]["phases"] for m in modes):
                lines.append(f"| {name} | " + " | ".join(f"{best[m]['phases'].get(name, 0):.1f}" for m in modes) + " |")
        for key, title in (("wall_s", "**wall**"), ("steps_s", "steps"), ("fixed_s", "**fixed cost**"),
                           ("cpu_s", "CPU seconds, all processes")):
            lines.append(f"| {title} | " + " | ".join(f"{best[m][key]:.1f}" for m in modes) + " |")
        lines.append("| fixed cost of every run | " + " | ".join(
            ", ".join(f"{r['fixed_s']:.1f}" for r in res[m]) for m in modes) + " |")
        lines.append("")
    lines.append(END)
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    cmd = shlex.join(["python", "bench/startup.py", *(a for e in args.env for a in ("--env", e)),
                      *(["--steps", str(args.steps)] if args.steps else []), "--runs", str(args.runs),
                      "--modes", args.modes, "--label", args.label, *args.overrides])
    meta = {"command": cmd, "date": common.utc_now(),
            "load": " ".join(f"{x:.1f}" for x in os.getloadavg()),
            "machine": f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}, Python "
                       f"{platform.python_version()}"}
    results = measure(args)
    stored = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    stored[args.label] = {"meta": meta, "results": results}
    common.write_json(RESULTS, stored)
    text = section(stored)
    print(text)
    if not args.no_doc:
        common.replace_section(text, BEGIN, END)


if __name__ == "__main__":
    main()
