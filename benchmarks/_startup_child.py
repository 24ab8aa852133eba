"""What runs inside each fresh interpreter of the start-up benchmark (and of tests/runtime/test_startup_guard.py).

Run as ``python -P benchmarks/_startup_child.py MODE [--entry-point NAME=VALUE] [--import-targets M,...]``
(``-P``: the script's folder is not put on ``sys.path``, so every child scans the
same path).  Standard library only, and nothing is imported before a measured
step that the step would otherwise import itself.  Prints one line
``STARTUP-JSON {...}`` at the end (vLLM logs to stdout, so the parent looks for
that prefix).  Times are ``time.perf_counter()`` differences in seconds.

Modes:

``scan``
    ``import importlib.metadata`` (timed apart), then
    ``entry_points(group="vllm.general_plugins")``: the baseline, no load, no call.
``plugin``
    The same scan, then what ``vllm.plugins.load_general_plugins()`` does with
    our entry point: ``ep.load()`` then the call with no arguments.  Records the
    modules that load + call imported.  With ``--import-targets`` the listed
    modules are imported afterwards (timed apart), which applies pending patches.
    ``--entry-point NAME=VALUE`` loads that entry point instead of
    ``custom_patches`` (the guard test's deliberately slow stand-in).
``vllm``
    ``import vllm.plugins`` (timed apart, not part of the step), then vLLM's own
    ``vllm.plugins.load_general_plugins()``.
"""

from __future__ import annotations

import os
import sys
import time

GROUP = "vllm.general_plugins"
OUR_ENTRY_POINT = "custom_patches"
MARKER = "STARTUP-JSON "


def _vllm_modules(names: object) -> list[str]:
    return sorted(m for m in names if m == "vllm" or m.startswith("vllm"))  # type: ignore[attr-defined]


def _arg(argv: list[str], flag: str) -> str | None:
    if flag in argv:
        return argv[argv.index(flag) + 1]
    return None


def main(argv: list[str]) -> dict[str, object]:
    clock = time.perf_counter
    mode = argv[0]
    result: dict[str, object] = {"mode": mode, "pid": os.getpid()}
    at_start = set(sys.modules)
    result["modules_at_start"] = len(at_start)

    if mode == "vllm":
        t0 = clock()
        import vllm.plugins

        t1 = clock()
        before = set(sys.modules)
        vllm.plugins.load_general_plugins()
        t2 = clock()
        new = set(sys.modules) - before
        result.update(
            import_vllm_plugins_s=t1 - t0,
            load_general_plugins_s=t2 - t1,
            modules_imported_by_step=len(new),
            our_plugin_loaded="vllm_custom_patches.plugin" in sys.modules,
            our_modules_imported_by_step=sorted(m for m in new if m.startswith("vllm_custom_patches")),
        )
        return result

    t0 = clock()
    from importlib.metadata import EntryPoint, entry_points

    t1 = clock()
    eps = entry_points(group=GROUP)
    t2 = clock()
    result.update(
        import_importlib_metadata_s=t1 - t0,
        scan_s=t2 - t1,
        entry_points=sorted(ep.name for ep in eps),
    )
    if mode == "scan":
        # After the measurement: the patch names the children can see (the parent excludes the non-generated ones).
        result["patch_entry_points"] = sorted(ep.name for ep in entry_points(group="vllm_custom_patches"))
        return result
    if mode != "plugin":
        raise SystemExit(f"unknown mode {mode!r}")

    override = _arg(argv, "--entry-point")
    before = set(sys.modules)
    t3 = clock()
    if override is None:
        (ep,) = [ep for ep in eps if ep.name == OUR_ENTRY_POINT]
    else:
        name, _, value = override.partition("=")
        ep = EntryPoint(name, value, GROUP)
    func = ep.load()
    t4 = clock()
    error = None
    try:
        func()
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    t5 = clock()
    new = set(sys.modules) - before
    result.update(
        load_s=t4 - t3,
        call_s=t5 - t4,
        register_s=t5 - t3,
        error=error,
        modules_imported_by_register=len(new),
        vllm_modules_imported_by_register=_vllm_modules(new),
        vllm_modules_loaded_at_end=_vllm_modules(sys.modules),
        imported_by_register={
            name: name in new
            for name in ("importlib_metadata", "packaging", "wrapt", "vllm_custom_patches._runtime.activation")
        },
    )
    targets = _arg(argv, "--import-targets")
    if targets:
        import importlib

        t6 = clock()
        for module in targets.split(","):
            importlib.import_module(module)
        t7 = clock()
        result["import_targets_s"] = t7 - t6
    if "vllm_custom_patches._core.versions" in sys.modules:
        # How much of the step a version gate's detection was (repeated now, so warm; informative only).
        from vllm_custom_patches._core.versions import _installed_vllm_version

        _installed_vllm_version.cache_clear()
        t8 = clock()
        _installed_vllm_version()
        result["version_detection_again_s"] = clock() - t8
    if "vllm_custom_patches" in sys.modules:
        from vllm_custom_patches import PatchManager

        states: dict[str, int] = {}
        for status in PatchManager.status():
            states[str(status.state.value)] = states.get(str(status.state.value), 0) + 1
        result["patch_states"] = states
        result["applied"] = len(PatchManager.applied())
    return result


if __name__ == "__main__":
    import json

    out = main(sys.argv[1:])
    sys.stdout.flush()
    print(MARKER + json.dumps(out), flush=True)
