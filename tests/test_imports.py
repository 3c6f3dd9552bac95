"""The import graph of ferlib (from the source, with ``ast``; nothing is imported): no cycle
among its modules, imports at the top or inside functions alike, and no module imports another
module's private name (``from ferlib.x import _y``)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "ferlib"
MODULES = sorted(path.stem for path in PACKAGE.glob("*.py"))


def imports_of(module: str) -> list[tuple[str, str | None]]:
    """(imported ferlib module, imported name or None) for every import in the module."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ferlib"):
            parts = node.module.split(".")
            for alias in node.names:
                if len(parts) > 1:
                    found.append((parts[1], alias.name))
                elif alias.name in MODULES:
                    found.append((alias.name, None))
                else:
                    found.append(("__init__", alias.name))
        elif isinstance(node, ast.Import):
            found += [(alias.name.split(".")[1], None) for alias in node.names
                      if alias.name.startswith("ferlib.")]
    return found


def graph() -> dict[str, set[str]]:
    return {module: {target for target, _ in imports_of(module)
                     if target != module and target != "__init__"}
            for module in MODULES}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_among_ferlib_modules():
    assert find_cycle(graph()) is None


def test_no_module_imports_a_private_name_of_another():
    offenders = [f"{module}: from ferlib.{target} import {name}"
                 for module in MODULES for target, name in imports_of(module)
                 if name and name.startswith("_") and target != module]
    assert not offenders, offenders
