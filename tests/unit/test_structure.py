"""processor/'s import graph has no cycle: every import a module runs (at module level or inside a function; not
those under `if TYPE_CHECKING:`) is an edge, importing `processor.a.b` runs `processor.a` too."""

from __future__ import annotations

import ast
from pathlib import Path

import processor

ROOT = Path(processor.__file__).resolve().parent


def module_names() -> dict[str, Path]:
    names = {}
    for path in ROOT.rglob("*.py"):
        parts = ("processor",) + path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported(tree: ast.AST, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The processor modules an AST imports when it runs, parents included."""
    found: set[str] = set()

    def add(name: str) -> None:
        parts = name.split(".")
        for end in range(2, len(parts) + 1):  # processor.a.b runs processor.a first
            if ".".join(parts[:end]) in known:
                found.add(".".join(parts[:end]))

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            add(target)
            for alias in node.names:  # `from processor import codec` imports the module processor.codec
                if f"{target}.{alias.name}" in known:
                    add(f"{target}.{alias.name}")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    # A module's own packages are already being imported when it runs (engines/__init__ importing its engines).
    return {name for name in found if name != module and not module.startswith(name + ".")}


def import_graph() -> dict[str, set[str]]:
    names = module_names()
    known = set(names)
    return {name: imported(ast.parse(path.read_text()), name, path.name == "__init__.py", known) for name, path in names.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path that returns to its start, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = dfs(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = dfs(node)
            if cycle:
                return cycle
    return None


def test_processor_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " → ".join(cycle or [])


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = import_graph()
    graph["processor.errors"] = graph["processor.errors"] | {"processor.loop"}
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1]


def test_type_checking_imports_are_not_edges_and_function_level_ones_are():
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from processor.loop import Worker\n"
                     "def f():\n    from processor.codec import AvroCodec\n")
    assert imported(tree, "processor.x", False, {"processor.loop", "processor.codec"}) == {"processor.codec"}


def test_source_types_are_a_leaf():
    assert import_graph()["processor.source"] == set()


def test_engines_import_nothing_from_above_them_nor_the_operator_tools():
    graph = import_graph()
    above = {"processor.prompt", "processor.loop", "processor.pipeline", "processor.intake", "processor.records"}
    for name, imports in graph.items():
        if name.startswith("processor.engines"):
            assert not imports & above and not any(i.startswith("processor.ops") for i in imports), (name, imports)


def test_the_worker_holds_no_generation_mode_or_guarantee_branch():
    tree = ast.parse((ROOT / "loop.py").read_text())
    tests = [n.test for n in ast.walk(tree) if isinstance(n, (ast.If, ast.IfExp, ast.While))]
    tests += [n for n in ast.walk(tree) if isinstance(n, (ast.BoolOp, ast.Compare))]
    names = {n.id for t in tests for n in ast.walk(t) if isinstance(n, ast.Name)}
    names |= {n.attr for t in tests for n in ast.walk(t) if isinstance(n, ast.Attribute)}
    assert not names & {"GenerationMode", "ProcessingGuarantee", "generation_mode", "processing_guarantee", "continuous", "transactional"}


MAX_MODULE_LINES = 400
MAX_CLASS_LINES = 250


def test_no_module_is_longer_than_400_lines_nor_any_class_than_250():
    """Issue 17's size measures (`wc -l` of each module under processor/, a class from its first decorator to its
    last line): past them a module or class holds more than one concern, and is split by moving code, not squeezing it."""
    too_long = []
    for name, path in sorted(module_names().items()):
        text = path.read_text()
        lines = text.count("\n")
        if lines > MAX_MODULE_LINES:
            too_long.append(f"module {name}: {lines} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef):
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                length = (node.end_lineno or node.lineno) - first + 1
                if length > MAX_CLASS_LINES:
                    too_long.append(f"class {name}.{node.name}: {length} lines")
    assert not too_long, too_long
