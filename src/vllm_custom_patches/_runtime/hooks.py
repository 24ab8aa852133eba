"""Waiting for a module to be imported, and asking whether it can be, without importing it."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from types import ModuleType

__all__ = ["module_findable", "when_imported"]


def module_findable(module_name: str) -> bool:
    """Whether ``module_name`` looks importable, judged without importing anything.

    ``find_spec("a.b.c")`` imports ``a.b`` to read its ``__path__``, so only
    the first level below the deepest package already imported is looked up;
    deeper levels are given the benefit of the doubt.
    """
    parts = module_name.split(".")
    for depth in range(len(parts), 0, -1):
        prefix = ".".join(parts[:depth])
        if prefix not in sys.modules:
            continue
        if sys.modules[prefix] is None:  # import blocked on purpose
            return False
        if depth == len(parts):
            return True
        return _find(".".join(parts[: depth + 1]))
    return _find(parts[0])


def _find(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # e.g. the parent is a module, not a package
        return False


def when_imported(module_name: str, hook: Callable[[ModuleType], None]) -> None:
    """Call ``hook(module)`` right after ``module_name`` is first imported (now, if it already is).

    An exception raised by ``hook`` propagates out of that ``import``
    statement and the module is not left in ``sys.modules``.
    """
    # wrapt's post-import hooks put a finder first on sys.meta_path; imported
    # late so that a process which selects nothing never installs it.
    import wrapt

    wrapt.register_post_import_hook(hook, module_name)
