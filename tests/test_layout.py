"""The package's architecture, enforced: wings, the direction of their imports, no import circle.

The package is grouped into wings (``_core``, ``_runtime``, ``_ops``,
``_upgrade``, ``_cli``), the public kit ``testing``, and the faces users name
(``__init__``, ``plugin``, ``endpoint``, ``__main__``) plus ``_env``, the list
of setting names every wing may read.  See docs/architecture.md.

- The core imports nothing from any wing, the kit or a face.
- A wing imports the core freely; another wing only through that wing's
  named interface (:data:`INTERFACES`).
- No import circle between modules, counting imports deferred into
  functions and imports made only for type checkers.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "vllm_custom_patches"

WINGS = ("_core", "_runtime", "_ops", "_upgrade", "_cli")
INTERFACES: dict[str, set[str]] = {
    # What one wing offers the others (the core offers everything it has).
    "_runtime": {"activation", "discovery", "selection", "telemetry", "vllm_env"},
    "_ops": {"agent", "figures", "guards", "remote", "vllm_metrics"},
    "_upgrade": {"doctor", "fingerprint", "signatures", "static", "surface", "vllm_views"},
    "_cli": {"main"},
    "testing": {"__init__"},
}
SHARED = {"_env"}
"""Top-level modules every wing may import: the names of the settings (imports nothing)."""


def _module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts) or "__init__"


def imports(path: Path, package: Path, known: set[str]) -> set[str]:
    """Package modules ``path`` imports anywhere (functions and ``TYPE_CHECKING`` blocks included)."""
    tree = ast.parse(path.read_text(), str(path))
    here = list(path.relative_to(package).parent.parts)
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)]
                prefix = [*base, *(node.module.split(".") if node.module else [])]
            elif node.module and node.module.split(".")[0] == "vllm_custom_patches":
                prefix = node.module.split(".")[1:]
            else:
                continue
            for alias in node.names:
                # ``from pkg import x``: x is a submodule, or a name defined by pkg itself.
                sub = ".".join([*prefix, alias.name])
                found.add(sub if sub in known else ".".join(prefix) or "__init__")
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".", 1)[1] for a in node.names if a.name.startswith("vllm_custom_patches."))
    return found & known


def graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package modules it imports (names relative to the package)."""
    paths = {_module_name(p, package): p for p in package.rglob("*.py")}
    return {name: imports(path, package, set(paths)) - {name} for name, path in paths.items()}


def _wing(module: str) -> str:
    return module.split(".", maxsplit=1)[0]


def violations(g: dict[str, set[str]]) -> list[str]:
    found = []
    for module, targets in sorted(g.items()):
        wing = _wing(module)
        if wing not in WINGS:
            continue  # faces and the kit may use any wing (the kit only the core: checked below)
        for target in sorted(targets):
            other = _wing(target)
            if other == wing or target in SHARED:
                continue
            if wing == "_core":
                found.append(f"the core imports {target} ({module})")
            elif other == "_core":
                continue
            elif other not in INTERFACES or (
                target.split(".", 1)[-1] not in INTERFACES[other] and not (other == "testing" and target == "testing")
            ):
                found.append(f"{module} imports {target}, which is not in {other}'s interface")
    return found


def cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(g.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(g):
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


def test_every_module_lives_in_a_wing_the_kit_or_is_a_face() -> None:
    faces = {"__init__", "__main__", "plugin", "endpoint", "_env"}
    stray = sorted(m for m in graph() if _wing(m) not in {*WINGS, "testing"} and m not in faces)
    assert stray == [], f"modules outside the wings: {stray}; put each in the wing it serves"


def test_each_wing_says_what_it_is_for() -> None:
    for wing in WINGS:
        doc = ast.get_docstring(ast.parse((PACKAGE / wing / "__init__.py").read_text()))
        assert doc and len(doc) > 40, f"{wing}/__init__.py needs a docstring saying what the wing is for"


def test_the_core_depends_on_no_wing_and_wings_talk_through_interfaces() -> None:
    assert violations(graph()) == []


def test_the_kit_uses_only_the_core() -> None:
    g = graph()
    outside = sorted(
        (m, t)
        for m, ts in g.items()
        if _wing(m) == "testing"
        for t in ts
        if _wing(t) not in {"testing", "_core"} and t not in SHARED
    )
    assert outside == []


def test_the_package_has_no_import_cycle() -> None:
    found = cycle(graph())
    assert found is None, f"import cycle: {' -> '.join(found)}"


def test_the_patch_class_and_the_gates_do_not_need_the_manager() -> None:
    g = graph()
    assert "_core.manager" not in g["_core.patch"] and "_core.patch" not in g["_core.versions"]
    # Definition-time analysis stands alone.
    assert g["_core.spec"] <= {"_core.errors", "_core.graft", "_core.targets"}


def test_the_checks_can_fail(tmp_path: Path) -> None:
    # A hand-made package breaking each rule once: the checks see every break.
    files = {
        "_core/__init__.py": '"""core"""',
        "_core/patch.py": "from .._ops import remote\nfrom .manager import M\n",
        "_core/manager.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .patch import P\n",
        "_ops/__init__.py": '"""ops"""',
        "_ops/remote.py": "def f():\n    from .._upgrade import static\n",
        "_ops/switch.py": "from .._runtime.hooks import x\nfrom .._core import patch\n",
        "_runtime/__init__.py": "",
        "_runtime/hooks.py": "",
        "_upgrade/__init__.py": "",
        "_upgrade/static.py": "",
        "__init__.py": "",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    g = graph(tmp_path)
    assert violations(g) == [
        "the core imports _ops.remote (_core.patch)",
        "_ops.switch imports _runtime.hooks, which is not in _runtime's interface",
    ]
    assert cycle(g) == ["_core.manager", "_core.patch", "_core.manager"]  # a type-only import closes it
    assert "_upgrade.static" in g["_ops.remote"]  # imports deferred into functions count
