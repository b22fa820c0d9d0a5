"""Tokenisation benchmark: conversations to trainable tokens (template + tokenise + mask).

Arms, all on the same conversations, the same tiny tokenizer and the same core count:
  * ``keel``: ``keel.data.sources.load_conversations(path, format="auto")`` (timed separately), then
    ``keel.data.encode(messages, enc, template="llama3", masking="assistant_only", tools=...)`` per
    example with one shared ``TextEncoder``; 2 processes = a fork ``multiprocessing.Pool(2)`` over chunks.
  * ``trl``: ``SFTTrainer._prepare_dataset`` with ``assistant_only_loss=True`` on a ``datasets.Dataset``
    of the same conversations (``messages`` + ``tools`` columns), ``dataset_num_proc`` 1 or 2. The tiny
    tokenizer's chat template has no ``{% generation %}`` markers, so this arm uses ``TRAIN_TEMPLATE``
    below: a llama3-style template with generation markers that renders what Keel's llama3 template
    renders, tools and tool calls included.
  * ``floor``: the tokenizer's raw batch encoding ``tok(texts, add_special_tokens=False)`` of the same
    conversations pre-rendered by ``tok.apply_chat_template(..., tokenize=False)`` (rendering not timed);
    "2 processes" = ``RAYON_NUM_THREADS=2`` with ``TOKENIZERS_PARALLELISM=true``.

Every (arm, processes) pair runs in its own fresh interpreter; the parent collects the numbers,
cross-checks token ids and labels between the arms, and (when Keel misses a goal) profiles Keel's encode.

Usage (from the repository root):
  python bench/tokenization.py            # full run: bench/results/tokenize.json and docs/benchmarks.md
  python bench/tokenization.py --quick    # smoke run: 300 rows per file, 1 repeat, tokenize-quick.json, no doc
"""

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from array import array
from pathlib import Path

import common  # first: it keeps bench/ from shadowing the modules imported below (bench/common.py)

REPO = common.REPO
DATA_DIR = common.SFT_DIR
BEGIN, END = common.markers("tokenize")

FILES = common.SFT_FILES
ARMS = ("keel", "trl", "floor")
PROCS = (1, 2)
GOAL_VS_TRL = 3.0  # Keel throughput >= 3x TRL
GOAL_VS_FLOOR = 1.5  # Keel time <= 1.5x the floor's time
TOOLS_INTRO = ("You have access to the following functions. To call a function, respond with JSON of the form "
               "{\"name\": function name, \"parameters\": arguments}.\n\n")

# llama3-style training template with {% generation %} markers (after TRL's llama3_training.jinja), extended so
# that it renders exactly what keel.data.template's "llama3" renders: tool definitions appended to the system
# prompt (one is added when there is none), tool calls as {"name": ..., "parameters": ...} JSON lines after the
# content, tool results under the "ipython" header, every content stripped; assistant content and its <|eot_id|>
# are inside the generation block (Keel trains the end-of-turn token too). Tool-call arguments may be a JSON string
# (they are in the TRL dataset: Arrow would otherwise merge the argument dicts of all rows into one struct type and
# add null keys).
TRAIN_TEMPLATE = (
    "{%- set ns = namespace(msgs=messages, listing='') %}"
    "{%- if tools %}"
    "{%- set ns.listing = '" + TOOLS_INTRO.replace("\n", "\\n") + "' %}"
    "{%- for t in tools %}"
    "{%- if not loop.first %}{%- set ns.listing = ns.listing + '\\n' %}{%- endif %}"
    "{%- set ns.listing = ns.listing + (t if t is string else t | tojson) %}"
    "{%- endfor %}"
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{%- set ns.msgs = [{'role': 'system', 'content': messages[0]['content'] + '\\n\\n' + ns.listing}]"
    " + messages[1:] %}"
    "{%- else %}"
    "{%- set ns.msgs = [{'role': 'system', 'content': ns.listing}] + messages %}"
    "{%- endif %}"
    "{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in ns.msgs %}"
    "{%- set ns.c = message['content'] or '' %}"
    "{%- for call in message['tool_calls'] or [] %}"
    "{%- set args = call['function']['arguments'] %}"
    "{%- set js = '{\"name\": ' + call['function']['name'] | tojson + ', \"parameters\": '"
    " + (args if args is string else args | tojson) + '}' %}"
    "{%- set ns.c = (ns.c + '\\n' + js) if ns.c else js %}"
    "{%- endfor %}"
    "{%- set role = 'ipython' if message['role'] == 'tool' else message['role'] %}"
    "{{- '<|start_header_id|>' + role + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- generation %}{{- ns.c | trim + '<|eot_id|>' }}{%- endgeneration %}"
    "{%- else %}"
    "{{- ns.c | trim + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


def log(msg: str) -> None:
    print(f"[tokenize {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ worker side


def load_tok():
    from keel.config import TinyModelConfig
    from keel.model.build import load_tokenizer
    from keel.model.tiny import ensure_tiny

    return load_tokenizer(str(ensure_tiny(TinyModelConfig())))


def load_examples(name: str, limit: int | None) -> tuple[list[dict], float]:
    from keel.data.sources import load_conversations

    t0 = time.perf_counter()
    exs = list(load_conversations(str(DATA_DIR / FILES[name]), format="auto"))
    dt = time.perf_counter() - t0
    return (exs[:limit] if limit else exs), dt


def hf_messages(ex: dict) -> dict:
    """One row of the TRL dataset / floor input: tool-call arguments and tools as JSON strings."""
    msgs = []
    for m in ex["messages"]:
        m = dict(m)
        if m.get("tool_calls"):
            m["tool_calls"] = [{"type": c.get("type", "function"),
                                "function": {"name": c["function"]["name"],
                                             "arguments": json.dumps(c["function"].get("arguments", {}),
                                                                     ensure_ascii=False)}}
                               for c in m["tool_calls"]]
        msgs.append(m)
    row = {"messages": msgs}
    if ex.get("tools") is not None:
        row["tools"] = json.dumps(ex["tools"], ensure_ascii=False)
    return row


def digest(ids) -> int:
    return zlib.crc32(array("q", ids).tobytes())


def summarize(input_ids: list[list[int]], labels: list[list[int]] | None) -> dict:
    out = {"n": len(input_ids), "tokens": sum(map(len, input_ids)), "ids_crc": [digest(x) for x in input_ids]}
    if labels is not None:
        out["trained"] = sum(sum(1 for t in lab if t != -100) for lab in labels)
        out["labels_crc"] = [digest(x) for x in labels]
    return out


_KEEL: dict = {}


def _keel_chunk(span: tuple[int, int]) -> list:
    from keel.data import encode

    enc, exs = _KEEL["enc"], _KEEL["exs"]
    return [encode(ex["messages"], enc, template="llama3", masking="assistant_only", tools=ex.get("tools"))
            for ex in exs[span[0]:span[1]]]


def keel_run(exs: list[dict], procs: int) -> list:
    _KEEL["exs"] = exs
    if procs == 1:
        return _keel_chunk((0, len(exs)))
    import multiprocessing as mp

    step = max(1, -(-len(exs) // (procs * 8)))
    spans = [(i, min(i + step, len(exs))) for i in range(0, len(exs), step)]
    with mp.get_context("fork").Pool(procs) as pool:
        parts = pool.map(_keel_chunk, spans, chunksize=1)
    return [e for part in parts for e in part]


def trl_setup(tok, procs: int):
    from trl import SFTConfig, SFTTrainer
    from trl.chat_template_utils import has_generation_markers, is_chat_template_stop_token_trained

    tok.chat_template = TRAIN_TEMPLATE
    assert has_generation_markers(tok.chat_template)
    args = SFTConfig(output_dir=tempfile.mkdtemp(prefix="keel-tok-bench-"), assistant_only_loss=True,
                     dataset_num_proc=procs, max_length=None, packing=False, shuffle_dataset=False,
                     report_to="none", bf16=False, use_cpu=True)
    # The attributes SFTTrainer.__init__ sets before it calls _prepare_dataset for this case: the template has
    # generation markers, so no training template is swapped in; messages data is not prompt-completion.
    stub = SFTTrainer.__new__(SFTTrainer)
    stub.chat_template = None
    stub.completion_only_loss = False
    stub._tokenizer = tok
    info = {"stop_token_trained": bool(is_chat_template_stop_token_trained(tok))}
    return stub, args, info


def cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its reaped children (pool workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def timed(fn, repeats: int) -> tuple[list[float], list[float], object]:
    times, cpus, out = [], [], None
    for _ in range(repeats):
        out = None
        c0, t0 = cpu_seconds(), time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        cpus.append(cpu_seconds() - c0)
    return times, cpus, out


def worker(arm: str, procs: int, limit: int | None, repeats: int) -> dict:
    tok = load_tok()
    res: dict = {"arm": arm, "procs": procs, "files": {}, "loadavg": os.getloadavg()[0]}
    if arm == "keel":
        from keel.data.template import TextEncoder

        _KEEL["enc"] = TextEncoder(tok)
    if arm == "trl":
        import datasets

        datasets.disable_progress_bars()
        stub, args, info = trl_setup(tok, procs)
        res["trl"] = info
    if arm == "floor":
        tok.chat_template = TRAIN_TEMPLATE
        res["rayon_threads"] = os.environ.get("RAYON_NUM_THREADS")

    for name in FILES:
        exs, load_s = load_examples(name, limit)
        rec: dict = {"load_s": load_s}
        if arm == "keel":
            keel_run(exs[:50], 1)  # warm-up
            times, cpus, out = timed(lambda exs=exs: keel_run(exs, procs), repeats)
            rec.update(summarize([e.input_ids for e in out], [e.labels for e in out]))
        elif arm == "trl":
            import datasets

            t0 = time.perf_counter()
            ds = datasets.Dataset.from_list([hf_messages(ex) for ex in exs])
            rec["prep_s"] = time.perf_counter() - t0  # building the datasets.Dataset (not in the rate)
            args.dataset_num_proc = 1
            stub._prepare_dataset(ds.select(range(min(20, len(ds)))), tok, args, False, None, "warmup")
            args.dataset_num_proc = procs

            def run(ds=ds):
                return stub._prepare_dataset(ds, tok, args, False, None, "train")

            times, cpus, out = timed(run, repeats)
            rec.update(summarize(out["input_ids"], out["labels"]))
        else:
            t0 = time.perf_counter()
            texts = [tok.apply_chat_template(r["messages"], tools=json.loads(r["tools"]) if "tools" in r else None,
                                             tokenize=False)
                     for r in map(hf_messages, exs)]
            rec["prep_s"] = time.perf_counter() - t0  # Jinja rendering (not in the rate)
            tok(texts[:50], add_special_tokens=False)  # warm-up

            def run(texts=texts):
                return tok(texts, add_special_tokens=False)["input_ids"]

            times, cpus, out = timed(run, repeats)
            rec.update(summarize(out, None))
        rec["times_s"] = times
        rec["cpu_s"] = cpus
        rec["best_s"] = min(times)
        res["files"][name] = rec
        log(f"{arm} procs={procs} {name}: n={rec['n']} best={rec['best_s']:.3f}s")
    return res


def profile_worker(limit: int | None) -> dict:
    """cProfile of Keel's 1-process encode over all files, plus the share spent inside the Rust encoder."""
    from keel.data import encode
    from keel.data.template import TextEncoder

    tok = load_tok()
    enc = TextEncoder(tok)
    exs = [ex for name in FILES for ex in load_examples(name, limit)[0]]
    for ex in exs[:50]:
        encode(ex["messages"], enc, tools=ex.get("tools"))

    def run():
        for ex in exs:
            encode(ex["messages"], enc, template="llama3", masking="assistant_only", tools=ex.get("tools"))

    t0 = time.perf_counter()
    run()
    plain_s = time.perf_counter() - t0
    prof = cProfile.Profile()
    prof.enable()
    run()
    prof.disable()
    st = pstats.Stats(prof)
    total = st.total_tt
    rows = []
    for (file, line, func), (_cc, nc, tt, ct, _) in st.stats.items():
        rows.append({"function": f"{Path(file).name}:{line}({func})", "calls": nc, "tottime_s": tt, "cumtime_s": ct})
    rows.sort(key=lambda r: -r["tottime_s"])
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(15)

    # How much of the encode is the Rust encoder itself: replay exactly the enc.text calls Keel makes.
    calls: list[str] = []
    orig = enc._raw.encode

    def spy(s, add_special_tokens=False):
        calls.append(s)
        return orig(s, add_special_tokens=add_special_tokens)

    enc._raw.encode = spy
    run()
    enc._raw.encode = orig
    raw = enc._raw
    t0 = time.perf_counter()
    for s in calls:
        raw.encode(s, add_special_tokens=False)
    rust_single_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    raw.encode_batch(calls, add_special_tokens=False)
    rust_batch_s = time.perf_counter() - t0
    # The calls made for header markup alone (role names and the "\n\n" after <|end_header_id|>): the same few
    # strings, re-encoded for every message.
    header_pieces = {"\n\n", "system", "user", "assistant", "ipython", "tool"}
    header_calls = [c for c in calls if c in header_pieces]
    t0 = time.perf_counter()
    for c in header_calls:
        raw.encode(c, add_special_tokens=False)
    rust_header_s = time.perf_counter() - t0
    def cum(pred) -> float:
        return sum(r["cumtime_s"] for r in rows if pred(r["function"]))

    shares = {"rust_encode": cum(lambda f: "'encode' of 'tokenizers.Tokenizer'" in f),
              "markup": cum(lambda f: f.startswith("template.py") and f.endswith("(markup)")),
              "apply_mask": cum(lambda f: f.endswith("(apply_mask)")),
              "content_json": cum(lambda f: f.endswith("(_content)")),
              "segment_init": cum(lambda f: f.startswith("<string>") and f.endswith("(__init__)"))}
    # What a 2-process pool pays to ship the results back: pickle + unpickle of the Encoded list.
    import pickle

    outs = [encode(ex["messages"], enc, template="llama3", masking="assistant_only", tools=ex.get("tools"))
            for ex in exs]
    t0 = time.perf_counter()
    blob = pickle.dumps(outs, protocol=pickle.HIGHEST_PROTOCOL)
    dump_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    pickle.loads(blob)
    load_s = time.perf_counter() - t0
    return {"examples": len(exs), "encode_s": plain_s, "profiled_s": total, "cumtime_s": shares,
            "pickle_results_s": dump_s, "unpickle_results_s": load_s, "pickle_mb": len(blob) / 2**20,
            "rust_encode_calls": len(calls), "rust_header_calls": len(header_calls), "rust_header_s": rust_header_s,
            "rust_encode_single_s": rust_single_s, "rust_encode_batch_s": rust_batch_s,
            "top_tottime": rows[:15], "pstats": buf.getvalue()}


# ------------------------------------------------------------------------------------------------ parent side


def merge(runs: dict, key: tuple[str, int], res: dict, rnd: int) -> None:
    """Add one round's timings to ``runs[key]``; every round must produce the same tokens and labels."""
    res["loadavg"] = [res["loadavg"]]
    if key not in runs:
        runs[key] = res
        return
    old = runs[key]
    old["loadavg"] += res["loadavg"]
    for name, rec in res["files"].items():
        prev = old["files"][name]
        if rec["ids_crc"] != prev["ids_crc"] or rec.get("labels_crc") != prev.get("labels_crc"):
            raise RuntimeError(f"{key} {name}: round {rnd} produced different tokens or labels")
        prev["times_s"] += rec["times_s"]
        prev["cpu_s"] += rec["cpu_s"]
        prev["best_s"] = min(prev["times_s"])


def spawn(args: argparse.Namespace, arm: str, procs: int, repeats: int = 1) -> dict:
    env = dict(os.environ)
    if arm == "floor":
        env.update(TOKENIZERS_PARALLELISM="true", RAYON_NUM_THREADS=str(procs))
    else:  # Keel and TRL encode one string at a time; their processes are forked
        env.update(TOKENIZERS_PARALLELISM="false", RAYON_NUM_THREADS="1")
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        out = fh.name
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", arm, "--procs", str(procs),
           "--repeats", str(repeats), "--out", out] + (["--limit", str(args.limit)] if args.limit else [])
    log(" ".join(cmd[1:]))
    subprocess.run(cmd, env=env, check=True)
    try:
        return json.loads(Path(out).read_text())
    finally:
        os.unlink(out)


def mismatches(a: list[int], b: list[int]) -> int:
    return sum(x != y for x, y in zip(a, b, strict=True))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 300 rows per file, 1 repeat; doc untouched")
    p.add_argument("--rounds", type=int, default=2, help="rounds over all arms, each in fresh interpreters")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per round of Keel and the floor, per file")
    p.add_argument("--trl-repeats", type=int, default=1, help="timed runs per round of TRL, per file")
    p.add_argument("--limit", type=int, default=None, help="rows per file (default: all)")
    p.add_argument("--from-json", help="only re-render the doc section from this results file")
    p.add_argument("--worker", choices=(*ARMS, "profile"), help=argparse.SUPPRESS)
    p.add_argument("--procs", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.rounds, args.repeats, args.trl_repeats, args.limit = 1, 1, 1, args.limit or 300

    if args.worker:
        res = profile_worker(args.limit) if args.worker == "profile" else \
            worker(args.worker, args.procs, args.limit, args.repeats)
        Path(args.out).write_text(json.dumps(res))
        return

    if args.from_json:  # re-render the doc section (findings included) from a finished run
        results = json.loads(Path(args.from_json).read_text())
        results["findings"] = findings(results)
        common.write_json(Path(args.from_json), results, indent=1)
        section = render_section(results)
        print(section)
        if not results["quick"]:
            common.replace_section(section, BEGIN, END)
        return

    t_start = time.time()
    runs: dict = {}
    for rnd in range(args.rounds):  # rounds interleave the arms, so that a busy spell on the machine hits all
        for arm in ARMS:
            for n in PROCS:
                reps = args.trl_repeats if arm == "trl" else args.repeats
                merge(runs, (arm, n), spawn(args, arm, n, reps), rnd)
    results = build_results(args, runs)
    results["keel_profile"] = spawn(args, "profile", 1)
    results["wall_s"] = time.time() - t_start
    results = json.loads(json.dumps(results))  # the form it is stored in (string keys)
    results["findings"] = findings(results)
    out = common.write_json(common.RESULTS / ("tokenize-quick.json" if args.quick else "tokenize.json"), results,
                            indent=1)
    log(f"wrote {out.relative_to(REPO)}")
    section = render_section(results)
    print(section)
    if not args.quick:
        common.replace_section(section, BEGIN, END)


def rate_row(rec: dict) -> dict:
    return {"examples": rec["n"], "tokens": rec["tokens"], "seconds": rec["best_s"],
            "examples_per_s": rec["n"] / rec["best_s"], "tokens_per_s": rec["tokens"] / rec["best_s"]}


def build_results(args: argparse.Namespace, runs: dict) -> dict:
    table = []
    for (arm, n), res in runs.items():
        recs = res["files"]
        for name, rec in recs.items():
            row = {"arm": arm, "procs": n, "set": name, **rate_row(rec), "times_s": rec["times_s"],
                   "median_s": statistics.median(rec["times_s"]), "cpu_s_all": rec["cpu_s"],
                   "cpu_s": min(rec["cpu_s"])}
            if "trained" in rec:
                row["trained_tokens"] = rec["trained"]
            if arm == "keel":
                row["load_s"] = rec["load_s"]
                row["examples_per_s_incl_load"] = rec["n"] / (rec["best_s"] + rec["load_s"])
            if "prep_s" in rec:
                row["prep_s"] = rec["prep_s"]
            table.append(row)
        tot = {"n": sum(r["n"] for r in recs.values()), "tokens": sum(r["tokens"] for r in recs.values()),
               "best_s": sum(r["best_s"] for r in recs.values())}
        row = {"arm": arm, "procs": n, "set": "all", **rate_row(tot),
               "cpu_s": sum(min(r["cpu_s"]) for r in recs.values())}
        if arm == "keel":
            load = sum(r["load_s"] for r in recs.values())
            row.update(load_s=load, examples_per_s_incl_load=tot["n"] / (tot["best_s"] + load))
        if arm != "floor":
            row["trained_tokens"] = sum(r["trained"] for r in recs.values())
        table.append(row)

    def get(arm: str, n: int, s: str) -> dict:
        return next(r for r in table if r["arm"] == arm and r["procs"] == n and r["set"] == s)

    ratios = []
    for n in PROCS:
        for s in [*FILES, "all"]:
            k, t, f = get("keel", n, s), get("trl", n, s), get("floor", n, s)
            ratios.append({"procs": n, "set": s, "keel_over_trl_speed": t["seconds"] / k["seconds"],
                           "keel_over_floor_time": k["seconds"] / f["seconds"]})
    overall = {n: next(r for r in ratios if r["procs"] == n and r["set"] == "all") for n in PROCS}
    goals = {
        "keel_ge_3x_trl": {"met": all(overall[n]["keel_over_trl_speed"] >= GOAL_VS_TRL for n in PROCS),
                           "values": {str(n): overall[n]["keel_over_trl_speed"] for n in PROCS}},
        "keel_within_1.5x_floor": {"met": all(overall[n]["keel_over_floor_time"] <= GOAL_VS_FLOOR for n in PROCS),
                                   "values": {str(n): overall[n]["keel_over_floor_time"] for n in PROCS}},
    }

    # Agreement: token ids and labels, example by example, Keel (1 process) against the others.
    agree = []
    for s in FILES:
        k = runs[("keel", 1)]["files"][s]
        row = {"set": s, "examples": k["n"], "keel_tokens": k["tokens"], "keel_trained": k["trained"]}
        for arm, n in [("trl", 1), ("floor", 1)]:
            o = runs[(arm, n)]["files"][s]
            row[f"{arm}_tokens"] = o["tokens"]
            row[f"{arm}_ids_differ"] = mismatches(k["ids_crc"], o["ids_crc"])
            if "labels_crc" in o:
                row[f"{arm}_trained"] = o["trained"]
                row[f"{arm}_labels_differ"] = mismatches(k["labels_crc"], o["labels_crc"])
        for arm in ARMS:  # 2 processes must give exactly the 1-process output
            a, b = runs[(arm, 1)]["files"][s], runs[(arm, 2)]["files"][s]
            row[f"{arm}_2proc_same"] = a["ids_crc"] == b["ids_crc"] and a.get("labels_crc") == b.get("labels_crc")
        agree.append(row)

    return {
        "benchmark": "tokenize",
        "issue": "Conversations to trainable tokens",
        "command": "python bench/tokenization.py" + (" --quick" if args.quick else ""),
        "quick": args.quick, "rows_per_file": args.limit, "rounds": args.rounds, "repeats": args.repeats,
        "trl_repeats": args.trl_repeats,
        "loadavg_per_worker": {f"{arm}/{n}": runs[(arm, n)]["loadavg"] for arm, n in runs},
        "date_utc": common.utc_now(),
        "machine": {"cpu": common.cpu_model(), "cores": os.cpu_count(), "affinity": common.pinned_cpus(),
                    "loadavg_at_end": os.getloadavg()},
        "versions": {"python": platform.python_version(),
                     **common.versions("transformers", "tokenizers", "trl", "datasets")},
        "trl_template": TRAIN_TEMPLATE,
        "trl_stop_token_trained": runs[("trl", 1)]["trl"]["stop_token_trained"],
        "goals": goals, "ratios": ratios, "agreement": agree, "table": table,
    }


def findings(r: dict) -> list[str]:
    """Interpretation lines for the doc, computed from the results."""
    tbl = r["table"]

    def get(arm: str, n: int, s: str = "all") -> dict:
        return next(x for x in tbl if x["arm"] == arm and x["procs"] == n and x["set"] == s)

    def ratio(n: int, s: str = "all") -> dict:
        return next(x for x in r["ratios"] if x["procs"] == n and x["set"] == s)

    out = []
    ag = r["agreement"]
    tok_same = all(a["keel_tokens"] == a["trl_tokens"] == a["floor_tokens"] for a in ag)
    ids_diff = sum(a["trl_ids_differ"] + a["floor_ids_differ"] for a in ag)
    lab_diff = sum(a["trl_labels_differ"] for a in ag)
    kt, tt = sum(a["keel_trained"] for a in ag), sum(a["trl_trained"] for a in ag)
    if tok_same and ids_diff == 0 and lab_diff == 0:
        out.append(f"- The three arms produce identical token ids for every example, and TRL's labels equal Keel's "
                   f"for every example ({kt:,} trained tokens of {sum(a['keel_tokens'] for a in ag):,}), so the "
                   "timings compare the same work; 2 processes reproduce the 1-process output exactly.")
    else:
        out.append(f"- Disagreement: {ids_diff} examples with other token ids (TRL + floor), {lab_diff} with other "
                   f"labels; trained tokens Keel {kt:,} vs TRL {tt:,} ({(tt - kt) / kt:+.2%}). See `agreement`.")
    k1, k2, t1, t2, f1, f2 = (get("keel", 1), get("keel", 2), get("trl", 1), get("trl", 2), get("floor", 1),
                              get("floor", 2))
    out.append(f"- Keel: {k1['examples_per_s']:,.0f} examples/s ({k1['tokens_per_s'] / 1e6:.2f} M tokens/s) on 1 "
               f"process, {k2['examples_per_s']:,.0f} ex/s on 2 ({k1['seconds'] / k2['seconds']:.2f}× its 1-process "
               f"speed). TRL: {t1['examples_per_s']:,.0f} and {t2['examples_per_s']:,.0f} ex/s "
               f"({t1['seconds'] / t2['seconds']:.2f}× with 2). Floor: {f1['examples_per_s']:,.0f} and "
               f"{f2['examples_per_s']:,.0f} ex/s ({f1['seconds'] / f2['seconds']:.2f}× with 2 Rayon threads).")
    rend = sum(x.get("prep_s", 0) for x in tbl if x["arm"] == "floor" and x["procs"] == 1 and x["set"] != "all")
    out.append(f"- TRL's time goes to Python around the encoder: rendering the conversations with Jinja alone "
               f"(`apply_chat_template(tokenize=False)`, the floor's untimed preparation) takes {rend:.1f} s of TRL's "
               f"{t1['seconds']:.1f} s on 1 process; on top come `return_assistant_tokens_mask` (character-to-token "
               "mapping of every generation span), and two `Dataset.map` passes (tokenize, `build_labels`) that each "
               "set up, fingerprint their arguments (the tokenizer included) and write Arrow tables. Keel renders "
               "by tokenising message pieces directly and never runs a template engine.")
    pr = r.get("keel_profile")
    markup_share = pr["cumtime_s"]["markup"] / pr["profiled_s"] if pr else 0.0
    if pr:
        c = pr["cumtime_s"]
        tot = pr["profiled_s"]
        out.append(f"- Keel's encode (cProfile, 1 process): {c['rust_encode'] / tot:.0%} of the time is inside the "
                   f"Rust encoder ({pr['rust_encode_calls']:,} calls, {pr['rust_encode_calls'] / pr['examples']:.1f} "
                   f"per example); re-encoding the constant header markup in `markup` is {c['markup'] / tot:.0%}, "
                   f"`apply_mask` {c['apply_mask'] / tot:.0%}. "
                   f"The same strings replayed straight through the encoder take {pr['rust_encode_single_s']:.2f} s, "
                   f"against {pr['encode_s']:.2f} s for the whole encode: on 1 process Keel is bound by the BPE "
                   f"encoder itself, and {pr['rust_header_calls']:,} of those calls ({pr['rust_header_s']:.2f} s "
                   "replayed) only re-encode header text (role names, the blank line) that never changes. "
                   "Pickling its results for a pool costs "
                   f"{pr['pickle_results_s'] + pr['unpickle_results_s']:.2f} s ({pr['pickle_mb']:.0f} MB) both ways.")
    out.append(f"- CPU seconds (process + reaped pool workers, all threads; the least of the runs per file), which "
               f"the machine's other load inflates less than wall time: Keel {k1['cpu_s']:.1f} / {k2['cpu_s']:.1f} "
               f"(1 / 2 processes), TRL {t1['cpu_s']:.1f} / {t2['cpu_s']:.1f}, floor {f1['cpu_s']:.1f} / "
               f"{f2['cpu_s']:.1f}. By CPU, Keel needs {t1['cpu_s'] / k1['cpu_s']:.1f}× less than TRL and "
               f"{k1['cpu_s'] / f1['cpu_s']:.2f}× the floor on 1 process; on 2 processes the extra CPU over 1 is the "
               "cost of the workers (start-up, pickling, copy-on-write faults after fork).")
    g = r["goals"]
    lav = [x for v in r["loadavg_per_worker"].values() for x in v]
    out.append(f"- The machine had a 1-minute load average of {min(lav):.1f}–{max(lav):.1f} on its 2 cores while the "
               "workers started (other sessions' tests and benchmarks ran alongside), so a second process or "
               "thread seldom had a core to itself; 2-process speed-ups over 1 process: Keel "
               f"{k1['seconds'] / k2['seconds']:.2f}×, TRL {t1['seconds'] / t2['seconds']:.2f}×, floor "
               f"{f1['seconds'] / f2['seconds']:.2f}×. The 2-process numbers carry the most noise.")
    spread = []
    for arm in ARMS:
        for n in PROCS:
            ts = get(arm, n, "gsm8k_train")["times_s"]
            spread.append(f"{arm} {n}p {min(ts):.1f}–{max(ts):.1f} s")
    out.append("- Run-to-run spread on the largest file (gsm8k_train, all timed runs): " + ", ".join(spread)
               + ". Ratios within ~20% of a goal's threshold are inside this noise.")
    file_miss = [f"{x['set']} on {x['procs']} process(es): "
                 + ", ".join(([f"{x['keel_over_trl_speed']:.1f}× TRL"] if x["keel_over_trl_speed"] < GOAL_VS_TRL
                              else [])
                             + ([f"{x['keel_over_floor_time']:.2f}× the floor's time"]
                                if x["keel_over_floor_time"] > GOAL_VS_FLOOR else []))
                 for x in r["ratios"] if x["set"] != "all"
                 and (x["keel_over_trl_speed"] < GOAL_VS_TRL or x["keel_over_floor_time"] > GOAL_VS_FLOOR)]
    if file_miss:
        out.append("- Per file, the goals are missed on: " + "; ".join(file_miss) + ". The short-example sets are "
                   "where Keel's fixed cost per message (header markup, segments, masking) weighs most against "
                   "a single batch call per text.")
    if not g["keel_within_1.5x_floor"]["met"] or not g["keel_ge_3x_trl"]["met"] or file_miss:
        misses = []
        if not g["keel_within_1.5x_floor"]["met"]:
            misses.append("Keel within 1.5× of the floor")
        if not g["keel_ge_3x_trl"]["met"]:
            misses.append("Keel ≥ 3× TRL")
        per_n = [n for n in (1, 2) if ratio(n)["keel_over_floor_time"] > GOAL_VS_FLOOR
                 or ratio(n)["keel_over_trl_speed"] < GOAL_VS_TRL]
        head = (f"Missed overall: {', '.join(misses)} (on {' and '.join(f'{n} process' for n in per_n)})."
                if misses else "Overall goals met, with per-file misses.")
        out.append(f"- {head} What would "
                   "close the gap on 2 processes, without touching the 1-process path: (1) keep one worker pool "
                   "for the whole job instead of starting one per call; (2) return token ids as flat `array('i')` "
                   "/ numpy buffers with offsets instead of pickled `Encoded` lists of Python ints; (3) or skip "
                   "processes altogether: collect a chunk's content strings and encode them with one "
                   "`encode_batch` call, whose Rayon threads parallelise inside one process with no pickling (the "
                   "floor's route). On 1 process: cache the encoded header per (template, role) in `TextEncoder` "
                   "instead of re-running `markup` for every message (two thirds of the encoder calls, "
                   f"{markup_share:.0%} of the time), and for many short examples encode a "
                   "chunk's content strings with one `encode_batch` call rather than one call each.")
    return out


def verdict(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def render_section(r: dict) -> str:
    v = r["versions"]
    g = r["goals"]
    fmt_int = "{:,}".format
    lines = [
        BEGIN,
        "## Conversations to trainable tokens",
        "",
        "Generated by `bench/tokenization.py`; raw numbers in `bench/results/tokenize.json`.",
        "",
        f"- Command (from the repository root): `{r['command']}`",
        f"- Machine: {r['machine']['cores']} cores, CPU `{r['machine']['cpu']}`, shared with other work "
        f"(load average {r['machine']['loadavg_at_end'][0]:.1f} at the end of the run), so timings carry noise.",
        f"- Versions: Python {v['python']}, transformers {v['transformers']}, tokenizers {v['tokenizers']}, "
        f"trl {v['trl']}, datasets {v['datasets']}.",
        f"- Date: {r['date_utc']}; whole run took {r['wall_s']:.0f} s.",
        "",
        "Method:",
        "",
        "- Data: every row of `shared/data/sft/{alpaca_en_demo.json, gsm8k_train.jsonl, "
        "sharegpt_dummy_conversation.json, glaive_toolcall_en_demo.json}`, read once per arm by "
        "`keel.data.sources.load_conversations(path, format=\"auto\")` into canonical conversations. Tokenizer: "
        "Keel's tiny tokenizer (`load_tokenizer(ensure_tiny(TinyModelConfig()))`) in all arms.",
        "- **keel**: `keel.data.encode(messages, enc, template=\"llama3\", masking=\"assistant_only\", "
        "tools=ex.get(\"tools\"))` per example with one shared `TextEncoder`; 2 processes = a fork "
        "`multiprocessing.Pool(2)` over 16 chunks (pool start-up and the return of the `Encoded` results to the "
        "parent are timed). Loading (`load_conversations`) is timed apart and not in the rate; the JSON also gives "
        "`examples_per_s_incl_load`.",
        "- **trl**: `SFTTrainer._prepare_dataset` (the method SFTTrainer runs on its train set: `Dataset.map` of its "
        "`tokenize_fn` → `apply_chat_template(..., return_assistant_tokens_mask=True)`, then the `build_labels` "
        "map) with `SFTConfig(assistant_only_loss=True, dataset_num_proc=1|2, max_length=None, packing=False)`, "
        "on a `datasets.Dataset.from_list` of the same conversations (`messages`, and `tools` as a JSON string, "
        "which TRL accepts). It is called on an instance with the attributes `SFTTrainer.__init__` would set, so no "
        "model is built. The tiny tokenizer's chat template has no `{% generation %}` markers (TRL cannot patch "
        "it: it is not one of its known templates), so this arm sets a **llama3-style template written for the "
        "benchmark, with generation markers**, that renders what Keel's llama3 template renders (tools in the "
        "system prompt, tool calls as `{\"name\", \"parameters\"}` JSON, tool results under `ipython`, assistant "
        "content + `<|eot_id|>` trained); it is `trl_template` in the JSON. Tool-call arguments are stored as JSON "
        "strings, since Arrow would merge all rows' argument dicts into one struct and add null keys. Building "
        "the Dataset is timed apart (`prep_s`) and not in the rate.",
        "- **floor**: `tok(texts, add_special_tokens=False)` alone, on the texts rendered beforehand by "
        "`tok.apply_chat_template(messages, tools=..., tokenize=False)` with the same template (rendering not "
        "timed, `prep_s` in the JSON). The Rust batch encoder is multi-threaded: `TOKENIZERS_PARALLELISM=true` "
        "with `RAYON_NUM_THREADS=1` (\"1 proc\") or `2` (\"2 procs\"). No masking.",
        f"- Each (arm, processes) pair runs in a fresh interpreter, in {r['rounds']} round(s) that interleave the "
        f"arms; per round each file is timed {r['repeats']}× ({r['trl_repeats']}× for TRL) after a warm-up, and "
        "the best time over all rounds is kept (all times and medians in the JSON). \"all\" = total examples "
        "(tokens) / sum of the per-file best times. Tokens = input ids produced.",
        "",
        "Goals (issue \"Conversations to trainable tokens\"), on the \"all\" row:",
        "",
    ]
    kt = g["keel_ge_3x_trl"]["values"]
    kf = g["keel_within_1.5x_floor"]["values"]
    lines += [
        f"- Keel ≥ 3× TRL's throughput on 1 and 2 processes: {verdict(g['keel_ge_3x_trl']['met'])} "
        f"({kt['1']:.1f}× on 1, {kt['2']:.1f}× on 2).",
        f"- Keel's time within 1.5× the floor's on 1 and 2 processes: "
        f"{verdict(g['keel_within_1.5x_floor']['met'])} "
        f"({kf['1']:.2f}× on 1, {kf['2']:.2f}× on 2).",
        "",
        "| set | procs | keel ex/s | keel tok/s | trl ex/s | trl tok/s | floor ex/s | floor tok/s | "
        "keel/trl speed | keel/floor time |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    tbl = r["table"]

    def get(arm: str, n: int, s: str) -> dict:
        return next(x for x in tbl if x["arm"] == arm and x["procs"] == n and x["set"] == s)

    for n in PROCS:
        for s in [*FILES, "all"]:
            k, t, f = get("keel", n, s), get("trl", n, s), get("floor", n, s)
            ra = next(x for x in r["ratios"] if x["procs"] == n and x["set"] == s)
            name = f"**{s}**" if s == "all" else s
            lines.append(
                f"| {name} | {n} | {k['examples_per_s']:,.0f} | {k['tokens_per_s']:,.0f} | "
                f"{t['examples_per_s']:,.0f} | {t['tokens_per_s']:,.0f} | {f['examples_per_s']:,.0f} | "
                f"{f['tokens_per_s']:,.0f} | {ra['keel_over_trl_speed']:.1f}× | {ra['keel_over_floor_time']:.2f}× |")
    lines += ["", "Loading and agreement (Keel on 1 process against the others, example by example):", "",
              "| set | examples | keel load s | keel ex/s incl. load (1 proc) | tokens keel / trl / floor | "
              "trained keel / trl | ids differ trl / floor | labels differ trl | 2 procs = 1 proc |",
              "|---|---:|---:|---:|---|---|---|---:|---|"]
    for a in r["agreement"]:
        k = get("keel", 1, a["set"])
        same = all(a[f"{arm}_2proc_same"] for arm in ARMS)
        lines.append(
            f"| {a['set']} | {fmt_int(a['examples'])} | {k['load_s']:.3f} | {k['examples_per_s_incl_load']:,.0f} | "
            f"{fmt_int(a['keel_tokens'])} / {fmt_int(a['trl_tokens'])} / {fmt_int(a['floor_tokens'])} | "
            f"{fmt_int(a['keel_trained'])} / {fmt_int(a['trl_trained'])} | "
            f"{a['trl_ids_differ']} / {a['floor_ids_differ']} | {a['trl_labels_differ']} | "
            f"{'yes' if same else 'NO'} |")
    if "keel_profile" in r:
        pr = r["keel_profile"]
        lines += ["", "Profile of Keel's encode (1 process, all files, cProfile; top functions by own time):", "",
                  f"- {fmt_int(pr['examples'])} examples: {pr['encode_s']:.2f} s unprofiled; "
                  f"{fmt_int(pr['rust_encode_calls'])} calls into the Rust encoder, which alone take "
                  f"{pr['rust_encode_single_s']:.2f} s replayed one by one and {pr['rust_encode_batch_s']:.2f} s as "
                  "one `encode_batch` (same thread settings as the Keel arm).",
                  "", "| function | calls | own s | cumulative s |", "|---|---:|---:|---:|"]
        for row in pr["top_tottime"][:10]:
            lines.append(f"| `{row['function']}` | {fmt_int(row['calls'])} | {row['tottime_s']:.3f} | "
                         f"{row['cumtime_s']:.3f} |")
    lines += ["", "Findings:", "", *r.get("findings", []), END]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
