"""Code that runs in the child processes of test_processes.py.

Kept apart from the test module so that a spawned child imports only this
(and what it loads on purpose), like a fresh vLLM worker.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Any


def load_general_plugins_as_vllm_does() -> list[str]:
    """What ``vllm.plugins.load_general_plugins()`` does, without vLLM.

    Entry points of ``vllm.general_plugins`` through the standard library's
    ``importlib.metadata``, filtered by ``VLLM_PLUGINS`` split on ',' (no
    stripping), a load error logged and skipped, then every plugin called
    with no try/except: its exception aborts the process's start-up.
    """
    from importlib.metadata import entry_points

    allowed = os.environ.get("VLLM_PLUGINS")
    allowed_plugins = None if allowed is None else allowed.split(",")
    plugins = {}
    for entry_point in entry_points(group="vllm.general_plugins"):
        if allowed_plugins is None or entry_point.name in allowed_plugins:
            try:
                plugins[entry_point.name] = entry_point.load()
            except Exception:
                traceback.print_exc()
    for func in plugins.values():
        func()
    return list(plugins)


def report(queue: Any, call_register_again: bool = False) -> None:
    """Child main: load the plugins, then tell the parent what this process looks like."""
    result: dict[str, Any] = {"pid": os.getpid()}
    try:
        result["plugins"] = load_general_plugins_as_vllm_does()
        from vllm_custom_patches import PatchManager

        result["target_imported_by_plugins"] = "vcp_testdist.target" in sys.modules
        result["before_import"] = {s.name: s.state.value for s in PatchManager.status()}
        from vcp_testdist.target import Engine

        result["step"] = Engine().step()
        result["after_import"] = {s.name: s.state.value for s in PatchManager.status()}
        if call_register_again:
            from vllm_custom_patches import plugin

            applied = PatchManager.applied()
            plugin.register()
            result["unchanged_by_second_register"] = PatchManager.applied() == applied
        result["applied"] = PatchManager.applied()
    except BaseException as exc:  # reported, not lost in the child's stderr
        result["error"] = f"{type(exc).__name__}: {exc}"
    queue.put(result)
