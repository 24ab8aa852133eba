"""Regression guard for the plugin's start-up cost (benchmark section 4, ``startup``, in brief).

vLLM calls our ``vllm.general_plugins`` entry point in every process it starts,
so with ``VLLM_CUSTOM_PATCHES`` unset it must stay close to free.  Each check
runs in a fresh interpreter:

* **exactly**: importing ``vllm_custom_patches.plugin`` and calling
  ``register()`` imports nothing but the package's ``__init__`` (whose public
  names load on first use), ``_env`` and ``plugin`` themselves: no ``vllm``
  module, no dependency (``wrapt``, ``packaging``, ``importlib_metadata``),
  none of the framework's core; it installs no import hook and scans no
  distribution metadata (both ``importlib.metadata`` and the
  ``importlib_metadata`` backport are watched).
* **by time**: ``ep.load()`` + ``register()`` must cost at most ``BOUND_MS``
  on top of the ``import importlib.metadata`` + ``entry_points(group=...)``
  scan that vLLM itself does first (the issue's bound: 5 ms).  Measured about
  1 ms on 2 shared cores (it was ~23-32 ms when the package imported its whole
  core); the median of ``CHILDREN`` interpreters is used and a failing
  measurement is repeated once before the test fails.  The last test proves
  the guard can fail: a register() whose module first imports a generated
  dependency tree of ``HEAVY_MODULES`` modules (a miniature of importing vLLM,
  which is ~2,500 modules and seconds) costs ~250 ms.
"""

from __future__ import annotations

import compileall
import json
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.startup import child_env, run_child  # noqa: E402

BOUND_MS = 5.0
"""ep.load() + register() with VLLM_CUSTOM_PATCHES unset, in ms, median of CHILDREN; observed ~1 ms."""
CHILDREN = 5
ATTEMPTS = 2
HEAVY_MODULES = 300
CLASSES_PER_MODULE = 60
"""The stand-in's dependency tree: 18,000 small classes in 300 modules (bytecode compiled) load in ~0.25 s here."""

ALLOWED_NEW = {"vllm_custom_patches", "vllm_custom_patches._env", "vllm_custom_patches.plugin"}
"""Every module of this package that importing the plugin and calling register() (unset) may import."""
FORBIDDEN = ("vllm", "wrapt", "torch", "packaging", "importlib_metadata")

# Runs in the child: watch every way to scan distribution metadata, then import and call the plugin.
_EXACT_CHILD = textwrap.dedent(
    """
    import json, sys
    import importlib.metadata as stdlib_md
    import importlib_metadata as backport_md

    scans = []

    def watch(owner, attr, label):
        original = owner.__dict__[attr]
        func = original.__func__

        def spy(cls, *args, **kwargs):
            scans.append(label)
            return func(cls, *args, **kwargs)

        setattr(owner, attr, classmethod(spy))

    watch(stdlib_md.Distribution, "discover", "importlib.metadata.Distribution.discover")
    watch(backport_md.Distribution, "discover", "importlib_metadata.Distribution.discover")
    watch(backport_md.MetadataPathFinder, "find_distributions", "importlib_metadata.MetadataPathFinder.find_distributions")

    before = set(sys.modules)
    meta_path = list(sys.meta_path)
    from vllm_custom_patches.plugin import register
    register()
    register()
    result = {
        "new": sorted(set(sys.modules) - before),
        "all": sorted(sys.modules),
        "scans": list(scans),
        "meta_path_changed": sys.meta_path != meta_path,
    }
    # Control: the spies do see a scan through either library.
    stdlib_md.entry_points(group="vllm.general_plugins")
    backport_md.entry_points(group="vllm_custom_patches")
    backport_md.version("packaging")
    result["control"] = sorted(set(scans[len(result["scans"]):]))
    print("RESULT " + json.dumps(result))
    """
)


def _top(module: str) -> str:
    return module.split(".", maxsplit=1)[0]


@pytest.mark.parametrize("value", [None, "", " \t "], ids=["unset", "empty", "blank"])
def test_unset_register_imports_no_vllm_and_scans_nothing(value: str | None) -> None:
    extra = {} if value is None else {"VLLM_CUSTOM_PATCHES": value}
    # Settings that only matter once something is selected: not even read.
    extra |= {"VLLM_CUSTOM_PATCHES_STRICT": "garbage", "VLLM_CUSTOM_PATCHES_PATH": "/nonexistent"}
    proc = subprocess.run(
        [sys.executable, "-P", "-c", _EXACT_CHILD],
        env=child_env(None, **extra),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    result = json.loads(line[len("RESULT ") :])

    assert result["scans"] == [], f"register() with VLLM_CUSTOM_PATCHES unset scanned metadata: {result['scans']}"
    assert result["control"] == [
        "importlib.metadata.Distribution.discover",
        "importlib_metadata.Distribution.discover",
        "importlib_metadata.MetadataPathFinder.find_distributions",
    ], "the spies no longer see metadata scans; fix the test"
    # "new": the child itself imports importlib_metadata (to watch it) before the plugin.
    bad = [m for m in result["new"] if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)]
    assert bad == [], f"imported while nothing is selected: {bad}"
    assert not result["meta_path_changed"], "an import hook was installed while nothing is selected"
    ours = {m for m in result["new"] if _top(m) == "vllm_custom_patches"}
    assert ours == ALLOWED_NEW, (
        f"register() with nothing selected imported more of the package: {sorted(ours - ALLOWED_NEW)}"
    )
    foreign = sorted(
        {_top(m) for m in result["new"]} - {"vllm_custom_patches"} - set(sys.stdlib_module_names) - {"__main__"}
    )
    assert foreign == [], f"import vllm_custom_patches.plugin pulled in unexpected packages: {foreign}"


def test_public_names_still_import_on_first_use() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            (
                "import sys, vllm_custom_patches as v\n"
                "assert 'vllm_custom_patches._core.manager' not in sys.modules\n"
                "names = {n: getattr(v, n) for n in v.__all__}\n"
                "assert names['VLLMPatch'].__module__ == 'vllm_custom_patches._core.patch'\n"
                "assert set(v.__all__) <= set(dir(v))\n"
                "from vllm_custom_patches import PatchManager, min_vllm_version\n"
                "print('ok', len(names))"
            ),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["ok", "20"]


def _costs_ms(args: list[str], env: dict[str, str]) -> list[float]:
    """ep.load() + register() in ms, one per fresh interpreter (each has paid for the scan just before)."""
    costs = []
    for _ in range(CHILDREN):
        result = run_child(args, env, timeout=120)
        assert result["error"] is None, result["error"]
        assert result["vllm_modules_loaded_at_end"] == result["vllm_modules_imported_by_register"]
        costs.append(result["register_s"] * 1000)
    return costs


def guard(args: list[str], env: dict[str, str]) -> list[float]:
    """Median cost per attempt, measuring again while it exceeds BOUND_MS (at most ATTEMPTS times)."""
    medians: list[float] = []
    for _ in range(ATTEMPTS):
        medians.append(statistics.median(_costs_ms(args, env)))
        if medians[-1] <= BOUND_MS:
            break
    return medians


def test_unset_register_costs_at_most_5_ms_on_top_of_the_entry_point_scan(tmp_path: Path) -> None:
    # Bytecode cached in its own folder, as for an installed package (after the first child).
    medians = guard(["plugin"], child_env(None, tmp_path / "pycache"))
    assert medians[-1] <= BOUND_MS, (
        f"ep.load() + register() with VLLM_CUSTOM_PATCHES unset costs {medians[-1]:.2f} ms in a fresh "
        f"interpreter (bound {BOUND_MS} ms; attempts {[round(m, 2) for m in medians]}). "
        f"Run `python benchmarks/run.py --only startup` for the full picture."
    )


@pytest.fixture(scope="module")
def heavy_standin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A module whose register is ours, but whose import first drags in HEAVY_MODULES generated modules."""
    root = tmp_path_factory.mktemp("slow-register")
    package = root / "vcp_heavy_dependency"
    package.mkdir()
    body = "".join(
        f"\n\nclass C{j}:\n    x = {j}\n\n    def f(self, a):\n        return a + {j}\n"
        for j in range(CLASSES_PER_MODULE)
    )
    for i in range(HEAVY_MODULES):
        (package / f"m{i}.py").write_text('"""Generated: stands in for a heavy dependency."""\n' + body)
    (package / "__init__.py").write_text("".join(f"from . import m{i}\n" for i in range(HEAVY_MODULES)))
    (root / "vcp_slow_register.py").write_text(
        "import vcp_heavy_dependency  # noqa: F401  - the regression: a heavy import at load time\n"
        "from vllm_custom_patches.plugin import register  # noqa: F401\n"
    )
    compileall.compile_dir(str(root), quiet=1)  # as an installed package would be
    return root


def test_guard_fails_for_a_register_that_imports_a_heavy_dependency(heavy_standin: Path) -> None:
    args = ["plugin", "--entry-point", "custom_patches=vcp_slow_register:register"]
    medians = guard(args, child_env(heavy_standin))
    assert len(medians) == ATTEMPTS and all(m > BOUND_MS for m in medians), (
        f"the guard did not catch a register() whose import pulls in {HEAVY_MODULES} modules: "
        f"{[round(m, 2) for m in medians]} ms vs bound {BOUND_MS} ms"
    )
