"""The package's layers, read from the source (imports inside functions and under TYPE_CHECKING count too):
keel.errors and keel.choices are leaves, keel.config imports nothing else of Keel, the data path, the model
and tracking never import what sits above them, and keel.data's modules import each other without a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import keel

PACKAGE = Path(keel.__file__).parent


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or path.is_dir()


def _imports(path: Path) -> set[str]:
    """Every keel module ``path`` imports, wherever the import statement is (``from keel.data import x``
    imports keel.data and, when x is a module, keel.data.x)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("keel"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if _is_module(f"{node.module}.{a.name}")}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("keel")}
    return found


GRAPH = {_module(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def _layer(module: str) -> str:
    return module.split(".")[1] if module.count(".") else module


def test_errors_and_choices_are_leaves_and_config_sits_on_them():
    assert GRAPH["keel.errors"] == set()
    assert GRAPH["keel.choices"] == {"keel.errors"}
    assert GRAPH["keel.config"] <= {"keel.errors", "keel.choices"}


def test_lower_layers_never_import_upper_ones():
    allowed = {"data": {"errors", "choices", "config", "data"},
               "model": {"errors", "choices", "config", "data", "model"},
               "tracking": {"errors", "choices", "config", "tracking"}}
    for module, imported in GRAPH.items():
        if _layer(module) in allowed:
            above = {m for m in imported if _layer(m) not in allowed[_layer(module)]}
            assert not above, f"{module} imports {sorted(above)}"


def test_the_data_modules_import_each_other_without_a_cycle():
    data = {m: {i for i in imported if i.startswith("keel.data.") and i in GRAPH} for m, imported in GRAPH.items()
            if m.startswith("keel.data.")}
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, f"import cycle: {' -> '.join((*path, module))}"
        if module in done:
            return
        for nxt in data.get(module, ()):
            visit(nxt, (*path, module))
        done.add(module)

    for module in data:
        visit(module, ())
