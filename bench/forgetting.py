"""Catastrophic forgetting at tiny scale: pretrain, SFT with each mitigation, measure, tabulate.

Linear script (issue 8). Every training run is a plain ``keel train`` subprocess, on CPU:

1. Pretrain the tiny model on pretraining-style text (the demo ``text`` task, all tokens trained)
   and take its ``hf/`` export as the base (``model.path=<base>/hf`` in every later run).
2. SFT the base on one narrow chat task (demo ``arithmetic`` only, assistant-only masking) with
   ``mitigation=none|replay|ewc|lora|conservative_lr|progressive``, once per seed
   (``trainer.seed`` and ``data.seed``). Replay's, progressive's and EWC's text sources are their
   defaults: the demo ``text`` task, i.e. the pretraining distribution.
3. Measure every model on held-out data (``keel.eval.diagnose.HELDOUT_SEED``, never trained on):
   pretraining-text perplexity (``keel.eval.perplexity``, all tokens), the SFT task's held-out loss
   (assistant-only tokens) and greedy exact-answer accuracy on held-out arithmetic questions
   (``keel.eval.diagnose.demo_probe``, ``math`` checker); plus ``trainable_params`` and ``wall_s``
   from each run's ``summary.json``.
4. Optional tuning round (``--tune``): a few non-default settings per mitigation.

Writes raw results to ``--out`` (JSON), the table (into the JSON, printed) and docs/forgetting.png;
``--report`` rewrites those from the JSON alone..

Usage (the command behind docs/forgetting.md):

    KEEL_CACHE_DIR=/tmp/keelcache WANDB_MODE=offline \
        python bench/forgetting.py --steps-pretrain 300 --steps-sft 50 --seeds 3 --tune --tune-seeds 1

``--quick`` is a smoke run (few steps, one seed). Runs whose ``summary.json`` already exists in
``--workdir`` are reused, so an interrupted bench continues where it stopped.
Bench-only dependency: matplotlib (for the plot; the table is written without it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import common  # first: it keeps bench/ from shadowing the modules imported below (bench/common.py)

ROOT = common.REPO
KEEL = str(Path(sys.executable).with_name("keel"))
MITIGATIONS = ["none", "replay", "ewc", "lora", "conservative_lr", "progressive"]
# tuning round: (label, mitigation, extra overrides)
TUNING = [  # one seed each (--tune-seeds), chosen after the defaults' seed-0 results (see docs/forgetting.md)
    # the defaults before tuning, with the defaults' seeds (--seeds)
    ("ewc lam=1 (old default)", "ewc", ["mitigation.ewc.lam=1"], "all"),
    ("progressive start_share=0.5 ramp=0.3 (old default)", "progressive",
     ["mitigation.progressive.start_share=0.5", "mitigation.progressive.ramp=0.3"], "all"),
    ("replay ratio=0.2", "replay", ["mitigation.replay.ratio=0.2"]),
    ("ewc lam=100", "ewc", ["mitigation.ewc.lam=100"]),
    ("ewc lam=1e4", "ewc", ["mitigation.ewc.lam=1e4"]),
    ("ewc lam=1e5", "ewc", ["mitigation.ewc.lam=1e5"]),
    ("ewc lam=1e6", "ewc", ["mitigation.ewc.lam=1e6"]),
    ("ewc lam=1e7", "ewc", ["mitigation.ewc.lam=1e7"]),
    ("ewc lam=1e8", "ewc", ["mitigation.ewc.lam=1e8"]),
    ("conservative_lr lr=5e-6", "conservative_lr", ["mitigation.conservative_lr.lr=5e-6"]),
    ("none lr=1e-4", "none", ["trainer.lr=1e-4"]),  # conservative_lr's plugin caps lr at 5e-6
    ("progressive start_share=0.8 ramp=1", "progressive",
     ["mitigation.progressive.start_share=0.8", "mitigation.progressive.ramp=1.0"]),
    ("replay+progressive", "[replay,progressive]", []),
    ("lora lr=3e-3", "lora", ["trainer.lr=3e-3"]),
    ("lora r=64 alpha=128", "lora", ["mitigation.lora.r=64", "mitigation.lora.alpha=128"]),
]
COMMON = ["cluster.num_workers=1", "logger=none", "trainer.progress=false", "trainer.checkpoint_every=0"]
PRETRAIN_DATA = "data.sources=[{name:text,kind:demo,task:text,num_examples:3000,masking:all_tokens}]"
SFT_DATA = "data.sources=[{name:arithmetic,kind:demo,task:arithmetic,num_examples:3000}]"


def run_name(label: str, seed: int) -> str:
    """The run directory's name under <workdir>/sft_<steps>/."""
    clean = label.replace(" (old default)", "").replace(" ", "_").replace("=", "").replace("+", "_")
    return f"{clean}_s{seed}"


def keel_train(run_dir: Path, overrides: list[str]) -> dict:
    """Run ``keel train`` into run_dir (reused if it finished before); its summary.json plus status."""
    summary = run_dir / "summary.json"
    if summary.exists():
        return {"ok": True, "reused": True, **json.loads(summary.read_text())}
    cmd = [KEEL, "train", *COMMON, *overrides, f"hydra.run.dir={run_dir}"]
    print("+", " ".join(cmd[1:]), flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(run_dir.parent / f"{run_dir.name}.log", "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=run_dir.parent).returncode
    if rc != 0 or not summary.exists():
        tail = (run_dir.parent / f"{run_dir.name}.log").read_text().splitlines()[-15:]
        print(f"  FAILED rc={rc}", *tail, sep="\n  ", flush=True)
        return {"ok": False, "rc": rc, "error_tail": tail, "process_s": time.time() - t0}
    return {"ok": True, "reused": False, "process_s": time.time() - t0, **json.loads(summary.read_text())}


def evaluate(hf_dir: str, n_text: int, n_sft: int, n_probe: int) -> dict:
    """Held-out pretraining perplexity, SFT-task loss and greedy accuracy of one HF model."""
    import math

    from keel.data import demo
    from keel.eval import checkers
    from keel.eval.diagnose import HELDOUT_SEED, demo_probe, demo_text
    from keel.eval.diagnose_measure import greedy
    from keel.eval.generate import load_eval_model
    from keel.eval.perplexity import perplexity

    model, tok = load_eval_model(hf_dir, device="cpu")
    text = perplexity(model, tok, demo_text(n_text), masking="all_tokens")
    sft_examples = list(demo.generate("arithmetic", n_sft, HELDOUT_SEED))
    sft = perplexity(model, tok, sft_examples, masking="assistant_only")
    probe = demo_probe(n_probe)
    answers = greedy(model, tok, [it.messages for it in probe], max_new_tokens=16, batch_size=25)
    check = checkers.get("math")
    acc = sum(bool(check(a, it.reference)) for a, it in zip(answers, probe)) / len(probe)
    return {"text_ppl": text["ppl"], "text_nll": text["nll"], "sft_loss": sft["nll"],
            "sft_ppl": math.exp(sft["nll"]), "sft_acc": acc, "sample_answer": answers[0]}


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def aggregate(runs: list[dict], base: dict) -> list[dict]:
    """One row per label: mean ± std over seeds of each metric (failed runs counted apart)."""
    rows = []
    for label in dict.fromkeys(r["label"] for r in runs):
        ok = [r for r in runs if r["label"] == label and r["ok"]]
        failed = [r for r in runs if r["label"] == label and not r["ok"]]
        row = {"label": label, "n": len(ok), "failed": len(failed)}
        if ok:
            for key in ("text_ppl", "text_nll", "sft_loss", "sft_acc", "wall_s", "trainable_params"):
                row[key] = mean_std([float(r[key]) for r in ok])
            gains = [base["sft_loss"] - r["sft_loss"] for r in ok]
            rises = [r["text_nll"] - base["text_nll"] for r in ok]
            row["sft_gain"], row["nll_rise"] = mean_std(gains), mean_std(rises)
        rows.append(row)
    return rows


def fmt(ms: tuple[float, float], spec: str = ".3f") -> str:
    return f"{ms[0]:{spec}} ± {ms[1]:{spec}}"


def table(rows: list[dict], base: dict) -> str:
    """Markdown table; `% gain` is the run's SFT gain over the mean gain of mitigation=none."""
    none = next((r for r in rows if r["label"] == "none" and r["n"]), None)
    head = ("| run | seeds | held-out text ppl (base {:.3f}) | text NLL rise | SFT held-out loss (base {:.3f}) | "
            "SFT gain | % of none's gain | SFT acc (base {:.0%}) | trainable params | wall s |\n"
            "|---|---|---|---|---|---|---|---|---|---|\n").format(base["text_ppl"], base["sft_loss"], base["sft_acc"])
    lines = []
    for r in rows:
        if not r["n"]:
            lines.append(f"| {r['label']} | 0 ({r['failed']} failed) | FAILED | | | | | | | |")
            continue
        seeds = str(r["n"]) + (f" ({r['failed']} failed)" if r["failed"] else "")
        share = f"{r['sft_gain'][0] / none['sft_gain'][0]:.0%}" if none else "n/a"
        lines.append(f"| {r['label']} | {seeds} | {fmt(r['text_ppl'])} | {fmt(r['nll_rise'])} | {fmt(r['sft_loss'])} | "
                     f"{fmt(r['sft_gain'])} | {share} | {fmt(r['sft_acc'], '.2f')} | "
                     f"{int(r['trainable_params'][0]):,} | {fmt(r['wall_s'], '.0f')} |")
    return head + "\n".join(lines) + "\n"


def plot(rows: list[dict], base: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", flush=True)
        return False
    fig, (ax, zoom) = plt.subplots(1, 2, figsize=(14, 6))
    best = max((r["sft_gain"][0] for r in rows if r["n"]), default=0.0)
    for panel, keep in ((ax, lambda r: True), (zoom, lambda r: r["sft_gain"][0] >= 0.9 * best)):
        for r in rows:
            if not r["n"] or not keep(r):
                continue
            tuned = r["label"] not in MITIGATIONS
            panel.errorbar(r["sft_gain"][0], r["nll_rise"][0], xerr=r["sft_gain"][1], yerr=r["nll_rise"][1],
                           fmt="s" if tuned else "o", mfc="none" if tuned else None, capsize=3)
            left = r["label"].startswith("ewc")  # ewc sits on top of none: label it on the left
            panel.annotate(r["label"], (r["sft_gain"][0], r["nll_rise"][0]), textcoords="offset points",
                           xytext=(-6, 4) if left else (6, 4), ha="right" if left else "left", fontsize=7)
        panel.axhline(0, color="grey", lw=0.8)
        panel.set_xlabel("SFT gain: base − tuned held-out SFT loss (nats/token, higher is better)")
    zoom.set_yscale("symlog", linthresh=0.05)  # the mitigated runs sit within 0.3 nats of no forgetting
    zoom.set_ylim(bottom=-0.005)
    zoom.set_title("zoom: runs keeping ≥ 90% of the best gain (symlog y)", fontsize=9)
    ax.set_ylabel("forgetting: held-out text NLL rise (nats/token = log ppl ratio)")
    ax.set_title(f"Tiny model, SFT on demo arithmetic (base text ppl {base['text_ppl']:.2f}); "
                 "filled: defaults, open: tuned", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps-pretrain", type=int, default=300)
    ap.add_argument("--steps-sft", type=int, default=50)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--tune", action="store_true", help="also run the tuning settings (TUNING)")
    ap.add_argument("--tune-seeds", type=int, default=None, help="seeds for the tuning round (default --seeds)")
    ap.add_argument("--mitigations", default=",".join(MITIGATIONS))
    ap.add_argument("--out", default=str(common.RESULTS / "forgetting.json"))
    ap.add_argument("--workdir", default="/tmp/keel-forgetting")
    ap.add_argument("--eval-text", type=int, default=100, help="held-out pretraining-text examples")
    ap.add_argument("--eval-sft", type=int, default=100, help="held-out SFT examples for the loss")
    ap.add_argument("--eval-probe", type=int, default=50, help="held-out questions for greedy accuracy")
    ap.add_argument("--quick", action="store_true", help="smoke run: 20 + 10 steps, one seed, small evals")
    ap.add_argument("--report", action="store_true", help="only rewrite the table and plot from --out")
    args = ap.parse_args()
    if args.report:
        result = json.loads(Path(args.out).read_text())
        result["table"] = aggregate(result["runs"], result["base"])
        result["table_markdown"] = table(result["table"], result["base"])
        common.write_json(Path(args.out), result, indent=1, default=str)
        plot(result["table"], result["base"], ROOT / "docs/forgetting.png")
        print(result["table_markdown"])
        return
    if args.quick:
        args.steps_pretrain, args.steps_sft, args.seeds = 20, 10, 1
        args.eval_text, args.eval_sft, args.eval_probe = 20, 20, 10
    os.environ.setdefault("WANDB_MODE", "offline")
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    evals = (args.eval_text, args.eval_sft, args.eval_probe)
    t_start = time.time()
    result = {"args": vars(args), "runs": []}
    # measurements of an earlier (interrupted) bench with the same steps and eval sizes are reused
    previous = {}
    same = ("steps_pretrain", "steps_sft", "eval_text", "eval_sft", "eval_probe")
    if Path(args.out).exists():
        old = json.loads(Path(args.out).read_text())
        if all(old.get("args", {}).get(k) == vars(args)[k] for k in same):
            previous = {(r["label"], r["seed"]): r for r in old.get("runs", []) if r["ok"]}
            previous["base"], previous["random_init"] = old.get("base"), old.get("random_init")

    def save() -> None:
        result["bench_wall_s"] = time.time() - t_start
        common.write_json(Path(args.out), result, indent=1, default=str)

    # 1. pretrain the base model; evaluate the random init and the base
    pre = keel_train(work / f"pretrain_{args.steps_pretrain}",
                     ["model=tiny", PRETRAIN_DATA, f"trainer.max_steps={args.steps_pretrain}", "trainer.seed=0"])
    if not pre["ok"]:
        save()
        sys.exit("pretraining failed; see the log in " + str(work))
    base_hf = pre["hf_dir"]
    result["random_init"] = previous.get("random_init") or evaluate(pre["model_path"], *evals)
    result["base"] = previous.get("base") or {
        **evaluate(base_hf, *evals), "hf_dir": base_hf, "wall_s": pre["wall_s"], "loss_last": pre["loss_last"],
        "trainable_params": pre["trainable_params"]}
    print("random init:", result["random_init"], "\nbase:", result["base"], flush=True)
    save()

    # 2-4. SFT with each mitigation (and the tuning settings), per seed; evaluate each
    plan = [(m, m, [f"mitigation={m}"], args.seeds) for m in args.mitigations.split(",")]
    if args.tune:
        for label, m, extra, *all_seeds in TUNING:
            seeds = args.seeds if all_seeds else args.tune_seeds or args.seeds
            plan.append((label, m, [f"mitigation={m}", *extra], seeds))
    # the defaults over all seeds first, then the tuning settings
    jobs = [(label, m, ov, seed) for label, m, ov, n in plan for seed in range(n)]
    jobs.sort(key=lambda job: (job[0] not in MITIGATIONS, job[3]))
    for label, mitigation, overrides, seed in jobs:
        if (label, seed) in previous:
            result["runs"].append(previous[(label, seed)])
            continue
        name = run_name(label, seed)
        run = keel_train(work / f"sft_{args.steps_sft}" / name,
                         [f"model.path={base_hf}", SFT_DATA, f"trainer.max_steps={args.steps_sft}",
                          f"trainer.seed={seed}", f"data.seed={seed}", *overrides])
        rec = {"label": label, "mitigation": mitigation, "overrides": overrides, "seed": seed, "ok": run["ok"]}
        if run["ok"]:
            rec.update({k: run.get(k) for k in ("wall_s", "trainable_params", "total_params", "loss_first",
                                                "loss_last", "tokens_per_source", "hf_dir")})
            rec.update(evaluate(run["hf_dir"], *evals))
            print(f"  {label} seed {seed}: text ppl {rec['text_ppl']:.3f}, sft loss {rec['sft_loss']:.3f}, "
                  f"acc {rec['sft_acc']:.2f}, wall {rec['wall_s']:.0f}s", flush=True)
        else:
            rec.update({"rc": run["rc"], "error_tail": run["error_tail"]})
        result["runs"].append(rec)
        result["table"] = aggregate(result["runs"], result["base"])
        save()

    rows = result["table"] = aggregate(result["runs"], result["base"])  # reused runs come after the last new one
    md = table(rows, result["base"])
    result["table_markdown"] = md
    save()
    plot(rows, result["base"], ROOT / "docs/forgetting.png")
    print(md)
    print(f"bench wall time {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
