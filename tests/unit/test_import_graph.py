"""Dependencies point one way: features (tasks, translation) -> core (batch, serve, engine, spec, task); never back.

The graph is read from the source (every `import`, also those inside functions, so none can hide a cycle). Nodes are
genfarm's subpackages and its top-level modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import genfarm

ROOT = Path(genfarm.__file__).parent


def node(module: str) -> str:
    """genfarm.batch.job -> genfarm.batch; genfarm.spec -> genfarm.spec."""
    parts = module.split(".")
    if len(parts) > 1 and (ROOT / parts[1]).is_dir():
        return ".".join(parts[:2])
    return module if len(parts) <= 2 else ".".join(parts[:2])


def imports() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        module = ".".join(("genfarm", *path.relative_to(ROOT).with_suffix("").parts)).removesuffix(".__init__")
        source = node(module)
        for item in ast.walk(ast.parse(path.read_text())):
            names = ([alias.name for alias in item.names] if isinstance(item, ast.Import) else
                     [item.module] if isinstance(item, ast.ImportFrom) and item.module and item.level == 0 else [])
            for name in names:
                if name.startswith("genfarm.") and node(name) != source:
                    graph.setdefault(source, set()).add(node(name))
    return graph


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(current: str, path: list[str]) -> list[str] | None:
        state[current] = 1
        for target in sorted(graph.get(current, ())):
            if state.get(target) == 1:
                return path + [target]
            if state.get(target) is None and (found := visit(target, path + [target])):
                return found
        state[current] = 2
        return None

    for start in sorted(graph):
        if state.get(start) is None and (found := visit(start, [start])):
            return found
    return None


def test_no_import_cycles_between_genfarm_packages():
    assert cycle(imports()) is None


def test_core_imports_no_feature():
    graph = imports()
    for core in ("genfarm.batch", "genfarm.spec", "genfarm.task", "genfarm.engine", "genfarm.serve",
                 "genfarm.rows", "genfarm.storage"):
        assert not graph.get(core, set()) & {"genfarm.translation", "genfarm.tasks"}, core


def test_batch_names_no_task():
    text = " ".join(path.read_text() for path in (ROOT / "batch").glob("*.py")).lower()
    assert "translat" not in text and "article" not in text
