"""The house keeps its shape: no import cycle, no stage reaching into another stage, small modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("tasks", "flows", "deployments", "bench", "research")
STAGES = ("tasks.download.fetch", "tasks.validation.validate", "tasks.conversion.convert", "tasks.training.train",
          "tasks.evaluation.evaluate", "tasks.publishing.gate", "tasks.publishing.publish", "tasks.orchestration.fanout")
MAX_LINES = 300
MAX_TOP_LEVEL_MODULES = 8


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """Project modules ``path`` imports, wherever the import stands: at the top, inside functions, under
    ``if __name__ == "__main__"``."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
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


def test_an_import_under_a_main_guard_counts(tmp_path):
    assert imported_modules(ROOT / "flows" / "train.py", {"flows.cli"}) == set(), "the flow imports the CLI back"
    probe = tmp_path / "probe.py"
    probe.write_text('if __name__ == "__main__":\n    from flows.cli import main\n')
    assert imported_modules(probe, {"flows.cli"}) == {"flows.cli"}


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_imports_no_other_stage(stage):
    graph = import_graph()
    assert graph[stage] & (set(STAGES) - {stage}) == set()


def test_tasks_holds_few_modules_at_its_top_and_its_packages_name_the_pipeline():
    top = sorted(p.name for p in (ROOT / "tasks").glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top
    packages = {p.parent.name for p in (ROOT / "tasks").glob("*/__init__.py")}
    assert {"download", "validation", "conversion", "training", "evaluation", "publishing", "registry", "reporting",
            "orchestration", "serving"} <= packages


@pytest.mark.parametrize("package", sorted(p.parent.relative_to(ROOT).as_posix()
                                           for p in (ROOT / "tasks").rglob("__init__.py")))
def test_every_package_says_what_it_owns_and_what_it_may_import(package):
    doc = ast.get_docstring(ast.parse((ROOT / package / "__init__.py").read_text())) or ""
    assert len(doc) > 80 and ("import" in doc or package == "tasks"), f"{package}/__init__.py: {doc!r}"


FILE_IO = ("open(", "read_text", "write_text", "read_bytes", "write_bytes", "mkdir", "unlink", "open_registry",
           "np.save", "np.load", "json.load", "json.dump", "shutil.")


@pytest.mark.parametrize("module", ["train.py", "cli.py"])
def test_the_flows_do_no_file_io_of_their_own(module):
    source = (ROOT / "flows" / module).read_text()
    assert [call for call in FILE_IO if call in source] == []


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
