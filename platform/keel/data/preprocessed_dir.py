"""Training from a ``keel preprocess`` directory (``data.preprocessed=DIR``).

The directory's ``report.json`` records what its rows depend on besides the data (tokenizer,
template, masking, row length): a run that differs is refused, naming the field. Settings
that only chose the rows (sources, mixture, packing) are recorded too; where this run's differ
they do not apply, and the run says so.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from keel.data.parquet_rows import VAL_SHARD, read_rows
from keel.data.pipeline import RowPlan, row_tokens, rows_per_step, with_steps
from keel.errors import UserError

if TYPE_CHECKING:
    from keel.config import KeelConfig, TemplateConfig


REPORT = "report.json"
# Config that chooses the rows; report.json records it and a run that differs is told so.
CHOOSE_ROWS = ("data", "mix", "packing", "mitigation.replay", "mitigation.progressive")


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of the tokenizer's whole definition (vocabulary, merges, special tokens)."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]


def template_key(tcfg: TemplateConfig) -> str:
    """The template's name, and for template=jinja a hash of the file's text (an edit changes the rows)."""
    if tcfg.name != "jinja":
        return tcfg.name
    from keel.data.template import from_config

    return "jinja:" + hashlib.sha256(from_config(tcfg).source.encode()).hexdigest()[:16]


def compat(cfg: KeelConfig, tokenizer: Any) -> dict:
    """What the rows' tokens depend on beyond the data; a run that differs cannot use them."""
    m = cfg.masking
    return {"tokenizer": tokenizer_fingerprint(tokenizer), "template": template_key(cfg.template),
            "default_system": cfg.template.default_system, "masking": m.name, "train_eot": m.train_eot,
            "train_reasoning": m.train_reasoning,
            "min_trained_tokens": m.min_trained_tokens, "max_len": cfg.packing.max_len}


def read_report(directory: str | Path) -> dict:
    """``report.json`` of a preprocessed directory; UserError when there is none."""
    path = Path(directory) / REPORT
    if not path.is_file():
        raise UserError(f"data.preprocessed={directory}: no {REPORT} there; write it with "
                         f"`keel preprocess --out {directory}`")
    return json.loads(path.read_text())


def _group(config: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        config = (config or {}).get(part)
    return config


def _flat(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict):
        return {k: v for key, sub in value.items() for k, v in _flat(sub, f"{prefix}.{key}").items()}
    return {prefix: value}


def differing(recorded: dict, current: dict) -> list[str]:
    """Dotted keys of the row-choosing groups whose values differ (``data.preprocessed`` itself aside)."""
    old = {k: v for g in CHOOSE_ROWS for k, v in _flat(_group(recorded, g), g).items()}
    new = {k: v for g in CHOOSE_ROWS for k, v in _flat(_group(current, g), g).items()}
    return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and k != "data.preprocessed")


def check_compat(report: dict, cfg: KeelConfig, tokenizer: Any, directory: str) -> None:
    """UserError naming the first field this run would render differently from the preprocessed rows."""
    now = compat(cfg, tokenizer)
    for key, value in now.items():
        then = report["compat"].get(key)
        if then != value:
            raise UserError(f"data.preprocessed={directory} was preprocessed with {key}={then!r}, this run has "
                             f"{value!r}; preprocess again with this run's settings")


def _prefix_report(report: dict, arrays: dict, names: list[str], cfg: KeelConfig) -> dict:
    """The data report of the first rows only: what this run trains on."""
    out = json.loads(json.dumps(report))
    tokens, trained = row_tokens(arrays, len(names))
    starts = (arrays["position_ids"] == 0) & (arrays["source_ids"] >= 0)
    examples = np.bincount(arrays["source_ids"][starts].astype(np.int64), minlength=len(names))
    rows, L = arrays["input_ids"].shape
    out.update(rows=rows, real_tokens=int(tokens.sum()), packing_efficiency=float(tokens.sum() / (rows * L)))
    for k, name in enumerate(names):
        s = out["sources"][name]
        s.update(examples=int(examples[k]), example_share=float(examples[k] / max(1, examples.sum())),
                 epochs=float(examples[k] / max(1, s["available"])), tokens=int(tokens[:, k].sum()),
                 trained_tokens=int(trained[:, k].sum()))
    out.pop("schedule", None)  # its segments are those of the whole directory's steps
    if "length" in out:
        task = [k for k, name in enumerate(names) if name in {src.name for src in cfg.data.sources}]
        out["length"].update(steps=cfg.trainer.max_steps, epochs_asked=None,
                             epochs=float(sum(examples[k] for k in task) / max(1, out["length"]["natural_size"])))
    return out


def _steps(report: dict, cfg: KeelConfig, directory: str) -> int:
    """This run's steps: ``trainer.max_steps``, or, sized by ``trainer.epochs``, the steps the directory was
    planned with for those epochs."""
    if cfg.trainer.max_steps is not None:
        return cfg.trainer.max_steps
    length = report["data_report"].get("length", {})
    if length.get("epochs_asked") != cfg.trainer.epochs or length.get("rows_per_step") != rows_per_step(cfg):
        raise UserError(f"data.preprocessed={directory} was planned for trainer.epochs={length.get('epochs_asked')} "
                         f"at {length.get('rows_per_step')} rows per step; this run asks trainer.epochs="
                         f"{cfg.trainer.epochs} at {rows_per_step(cfg)}: preprocess with this run's settings, "
                         "or set trainer.max_steps")
    return length["steps"]


VALIDATION_KEYS = ("val_fraction", "val_path", "val_split")


def _validation_settings(data: dict) -> dict:
    """What chose a data config's validation rows."""
    return {"val_fraction": data.get("val_fraction", 0.0),
            "sources": {s["name"]: {k: s.get(k) for k in VALIDATION_KEYS[1:]} for s in data.get("sources", [])}}


def _validation(report: dict, current: dict, directory: str, max_len: int) -> RowPlan | None:
    """The directory's validation rows; a run whose validation settings differ from its own is refused
    (save_best and early stopping judge by them)."""
    then = _validation_settings(report.get("config", {}).get("data") or {})
    now = _validation_settings(current.get("data") or {})
    if then != now:
        raise UserError(f"data.preprocessed={directory} holds the validation rows of {then}; this run asks for "
                         f"{now}: preprocess with this run's data.val_fraction / val_path / val_split")
    if not report.get("val_shards"):
        return None
    val = report["data_report"]["validation"]
    arrays = read_rows(directory, report["val_shards"], val["rows"], max_len, name=VAL_SHARD)
    return RowPlan(source_names=report["source_names"], report=val, **arrays)


def load(cfg: KeelConfig, tokenizer: Any, current: dict) -> tuple[RowPlan, list[str]]:
    """The rows this run trains on, from ``cfg.data.preprocessed``, and what to tell the user.

    ``current`` is this run's config as plain data (compared with the recorded one).
    """
    directory = cfg.data.preprocessed
    report = read_report(directory)
    check_compat(report, cfg, tokenizer, directory)
    val = _validation(report, current, directory, cfg.packing.max_len)
    cfg = _with_steps(cfg, _steps(report, cfg, directory))
    needed = cfg.trainer.max_steps * rows_per_step(cfg)
    if needed > report["rows"]:
        raise UserError(f"data.preprocessed={directory} holds {report['rows']} packed rows; this run needs "
                         f"{needed} (trainer.max_steps x cluster.num_workers x trainer.grad_accum x "
                         "trainer.micro_batch_size); preprocess with this run's settings")
    arrays = read_rows(directory, report["shards"], needed, cfg.packing.max_len)
    names = report["source_names"]
    data_report = report["data_report"] if needed == report["rows"] else _prefix_report(report["data_report"],
                                                                                        arrays, names, cfg)
    notes = [f"data.preprocessed: training on {needed} of the {report['rows']} packed rows of {directory}"]
    changed = differing(report["config"], current)
    if changed:
        notes.append(f"data.preprocessed: the rows come from {directory}; these settings differ from those it was "
                     f"preprocessed with and do not apply: {', '.join(changed)}")
    return RowPlan(source_names=names, report=data_report, val=val, **arrays), notes


def _with_steps(cfg: KeelConfig, steps: int) -> KeelConfig:
    return cfg if cfg.trainer.max_steps == steps else with_steps(cfg, steps)
