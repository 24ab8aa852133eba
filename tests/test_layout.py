"""The package's module graph: no import cycles, not even through imports deferred into functions.

A deferred ``from ._manager import PatchManager`` inside a method hides a
cycle from the interpreter but not from the reader: the patch class would
still need the manager to exist.  Only imports under ``if TYPE_CHECKING:``
(annotations) are exempt.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "vllm_custom_patches"


def _imports(path: Path) -> set[str]:
    """The package modules ``path`` imports anywhere, except under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text(), str(path))
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.level == 1:
                found.update(alias.name for alias in node.names)
            elif node.module and node.module.startswith("vllm_custom_patches."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("vllm_custom_patches."))
    return found


def _graph() -> dict[str, set[str]]:
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    return {p.stem: _imports(p) & modules for p in PACKAGE.glob("*.py")}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


def test_the_package_has_no_import_cycle() -> None:
    cycle = _cycle(_graph())
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_the_patch_class_and_the_gates_do_not_need_the_manager() -> None:
    graph = _graph()
    assert "_manager" not in graph["_patch"] and "_patch" not in graph["_versions"]
    assert graph["_spec"] <= {"_errors", "_graft", "_targets"}  # definition-time analysis stands alone


def test_the_cycle_finder_finds_a_cycle() -> None:
    # The check can fail: the deferred imports the package used to have form one.
    assert _cycle({"_patch": {"_manager"}, "_manager": {"_patch", "_log"}, "_log": set()}) == [
        "_manager",
        "_patch",
        "_manager",
    ]
