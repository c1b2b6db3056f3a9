"""The house keeps its shape: no import cycle, no stage reaching into another stage, small modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("tasks", "flows", "deployments", "bench")
STAGES = ("download", "validate", "convert", "train", "evaluate", "gate", "publish", "fanout")
MAX_LINES = 300


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _is_main_guard(node: ast.AST) -> bool:
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__")


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """Project modules ``path`` imports, at the top or inside functions (not under ``if __name__ == ...``)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _is_main_guard(node):
            return
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                found.add(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return {name for name in found if name in known}


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imported_modules(path, set(modules)) - {name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}

    def walk(node: str, trail: list[str]) -> list[str] | None:
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                return trail[trail.index(dep):] + [node, dep] if dep in trail else [node, dep]
            if dep not in state and (cycle := walk(dep, trail + [node])):
                return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := walk(start, [])):
            return cycle
    return None


def test_the_import_graph_has_no_cycle():
    assert find_cycle(import_graph()) is None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) is not None
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_imports_no_other_stage(stage):
    graph = import_graph()
    others = {f"tasks.{s}" for s in STAGES} - {f"tasks.{stage}"}
    assert graph[f"tasks.{stage}"] & others == set()


def test_the_flow_module_holds_no_stage_logic():
    """flows/train.py wires tasks: it defines flows and naming helpers, no stage function."""
    tree = ast.parse((ROOT / "flows" / "train.py").read_text())
    functions = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
    flows = [f.name for f in functions if any("flow" in ast.unparse(d) for d in f.decorator_list)]
    assert flows == ["train_dataset", "train_mnist"]
    assert all(len(f.body) <= 30 for f in functions)


def test_no_module_outside_tests_is_over_300_lines():
    long = {name: n for name, path in project_modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}
