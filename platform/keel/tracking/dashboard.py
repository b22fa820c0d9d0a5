"""The standard Keel W&B dashboard: its layout as data, and the W&B workspace view or report built from it.

``python -m keel.tracking.dashboard --entity E --project P`` saves it as a workspace view
(``--kind report``: a report) through ``wandb-workspaces`` (``pip install 'keel-sft[wandb]'``);
``--json PATH`` writes the layout itself (``docs/wandb_dashboard.json`` is this output).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from keel.tracking.namespace import STEP, TOKENS_SEEN

TITLE = "Keel SFT"


def line(title: str, y: tuple[str, ...] = (), regex: str | None = None, x: str = STEP, **style: str) -> dict:
    """A line panel of metrics ``y`` (or every metric matching ``regex``) against ``x``."""
    panel: dict[str, Any] = {"kind": "line", "title": title, "x": x}
    panel.update({"regex": regex} if regex else {"y": list(y)})
    return {**panel, **style}


def table(title: str, key: str) -> dict:
    """A panel showing the last ``wandb.Table`` a run logged under ``key``."""
    return {"kind": "table", "title": title, "key": key}


def layout() -> dict:
    """Sections of panels, top to bottom; every line panel shares ``train/step`` unless it names another x."""
    return {"title": TITLE, "x_axis": STEP, "sections": [
        {"name": "Training", "panels": [
            line("loss", ("train/loss",)),
            line("loss vs tokens seen", ("train/loss",), x=TOKENS_SEEN),
            line("learning rate", ("train/lr",)),
            line("grad norm", ("train/grad_norm",)),
            line("tokens per step", ("train/tokens", "train/supervised_tokens")),
        ]},
        {"name": "Throughput", "panels": [
            line("tokens/s", ("train/tokens_per_s",)),
            line("MFU", ("train/mfu",)),
            line("TFLOP/s per device", ("train/tflops_per_device",)),
            line("step time (s)", ("train/step_s",)),
            line("share of the step waiting for data", ("data/wait_share",)),
        ]},
        {"name": "Data", "panels": [
            line("realised mixture (token share per source)", regex="mix/share/.*", plot_type="stacked-area"),
            line("scheduled mixture weight per source", regex="mix/weight/.*"),
            line("tokens per source", regex="data/tokens/.*"),
            line("packing efficiency", ("data/packing_efficiency",)),
            table("realised mixture", "mix/realised"),
        ]},
        {"name": "Forgetting", "panels": [line("forgetting metrics", regex="forgetting/.*")]},
        {"name": "Eval", "panels": [
            line("eval metrics", regex="eval/.*"),
            table("sample generations", "eval/generations"),
        ]},
        {"name": "System", "panels": [line("memory (GiB)", regex="system/.*")]},
    ]}


def to_json() -> str:
    """The layout as committed in ``docs/wandb_dashboard.json``."""
    return json.dumps(layout(), indent=2) + "\n"


def _panel(spec: dict) -> Any:
    import wandb_workspaces.reports.v2 as wr

    if spec["kind"] == "table":
        return wr.WeavePanelSummaryTable(table_name=spec["key"])
    return wr.LinePlot(title=spec["title"], x=spec["x"], y=spec.get("y", []), metric_regex=spec.get("regex"),
                       plot_type=spec.get("plot_type"))


def workspace(entity: str, project: str, name: str = TITLE) -> Any:
    """The layout as a ``wandb_workspaces`` workspace view (unsaved)."""
    import wandb_workspaces.workspaces as ws

    spec = layout()
    sections = [ws.Section(name=s["name"], panels=[_panel(p) for p in s["panels"]], is_open=True)
                for s in spec["sections"]]
    return ws.Workspace(entity=entity, project=project, name=name, sections=sections,
                        settings=ws.WorkspaceSettings(x_axis=spec["x_axis"]))


def report(entity: str, project: str, title: str = TITLE) -> Any:
    """The layout as a ``wandb_workspaces`` report, one heading and panel grid per section (unsaved)."""
    import wandb_workspaces.reports.v2 as wr

    blocks: list[Any] = []
    for s in layout()["sections"]:
        blocks += [wr.H2(text=s["name"]),
                   wr.PanelGrid(runsets=[wr.Runset(entity=entity, project=project)],
                                panels=[_panel(p) for p in s["panels"]])]
    return wr.Report(entity=entity, project=project, title=title, blocks=blocks,
                     description="Keel SFT runs: training, throughput, data mixture, forgetting, eval, system.")


def _check_ready() -> str | None:
    """Why the dashboard cannot be saved (no wandb-workspaces, no API key), or None."""
    try:
        import wandb_workspaces  # noqa: F401
    except ImportError:
        return "wandb-workspaces is not installed: pip install 'keel-sft[wandb]' (or wandb-workspaces)"
    import wandb

    try:
        wandb.Api()
    except wandb.errors.UsageError as err:
        return f"no W&B API key ({err}): set WANDB_API_KEY or run `wandb login`"
    return None


def main(argv: list[str] | None = None) -> int:
    """Save the dashboard to W&B, or write its layout as JSON."""
    p = argparse.ArgumentParser(prog="python -m keel.tracking.dashboard", description=__doc__.splitlines()[0])
    p.add_argument("--entity", help="W&B entity (user or team)")
    p.add_argument("--project", help="W&B project (Keel's default: keel)")
    p.add_argument("--kind", choices=("workspace", "report"), default="workspace")
    p.add_argument("--name", default=TITLE, help="view name or report title")
    p.add_argument("--json", metavar="PATH", help="write the layout to PATH instead ('-': stdout)")
    args = p.parse_args(argv)
    if args.json:
        if args.json == "-":
            sys.stdout.write(to_json())
        else:
            Path(args.json).write_text(to_json())
        return 0
    if not (args.entity and args.project):
        p.error("--entity and --project are required (or --json PATH)")
    problem = _check_ready()
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    build = workspace if args.kind == "workspace" else report
    saved = build(args.entity, args.project, args.name).save()
    print(f"saved {args.kind}: {saved.url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
