"""vllm-custom-patches: change a few methods of vLLM classes in place, exactly and reversibly.

Write the methods you change in ``class MyPatch(VLLMPatch[Target])``; apply
it with ``MyPatch.apply()`` or by listing it in ``VLLM_CUSTOM_PATCHES``; roll it
back with ``MyPatch.rollback()``.  See the README for the full guide.

The public names are imported on first use: vLLM imports this package's
plugin in every process it starts, and with no patch selected that must cost
next to nothing (see :mod:`vllm_custom_patches.plugin`).
"""

from __future__ import annotations

# Not ``typing.TYPE_CHECKING``: importing typing would be most of this
# module's cost.  Type checkers treat any ``TYPE_CHECKING`` name as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from ._core.errors import (
        PatchApplyError,
        PatchConfigError,
        PatchConflictError,
        PatchDefinitionError,
        PatchError,
        PatchLoadError,
        PatchTargetError,
        PatchVersionError,
        UnknownPatchError,
    )
    from ._core.kinds import changes_kind
    from ._core.manager import PatchManager
    from ._core.patch import VLLMPatch
    from ._core.status import PatchState, PatchStatus
    from ._core.typed import TypedAs
    from ._core.versions import VLLMVersion, detect_vllm_version, max_vllm_version, min_vllm_version, vllm_versions
del TYPE_CHECKING

__all__ = [
    "PatchApplyError",
    "PatchConfigError",
    "PatchConflictError",
    "PatchDefinitionError",
    "PatchError",
    "PatchLoadError",
    "PatchManager",
    "PatchState",
    "PatchStatus",
    "PatchTargetError",
    "PatchVersionError",
    "TypedAs",
    "UnknownPatchError",
    "VLLMPatch",
    "VLLMVersion",
    "changes_kind",
    "detect_vllm_version",
    "max_vllm_version",
    "min_vllm_version",
    "vllm_versions",
]

__version__ = "0.1.0"

# Where each public name lives.
_HOMES = {
    **dict.fromkeys(
        (
            "PatchApplyError",
            "PatchConfigError",
            "PatchConflictError",
            "PatchDefinitionError",
            "PatchError",
            "PatchLoadError",
            "PatchTargetError",
            "PatchVersionError",
            "UnknownPatchError",
        ),
        "_core.errors",
    ),
    "PatchManager": "_core.manager",
    "PatchState": "_core.status",
    "PatchStatus": "_core.status",
    "TypedAs": "_core.typed",
    "VLLMPatch": "_core.patch",
    "changes_kind": "_core.kinds",
    **dict.fromkeys(
        ("VLLMVersion", "detect_vllm_version", "max_vllm_version", "min_vllm_version", "vllm_versions"),
        "_core.versions",
    ),
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f"{__name__}.{home}"), name)
    globals()[name] = value  # later lookups are plain module attributes
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
