"""vllm-custom-patches: change a few methods of vLLM classes in place, exactly and reversibly.

Write the methods you change in ``class MyPatch(VLLMPatch[Target])``; apply
it with ``MyPatch.apply()`` or by listing it in ``VLLM_CUSTOM_PATCHES``; roll it
back with ``MyPatch.rollback()``.  See the README for the full guide.
"""

from ._errors import (
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
from ._manager import PatchManager, PatchState, PatchStatus
from ._patch import VLLMPatch
from ._versions import VLLMVersion, detect_vllm_version, max_vllm_version, min_vllm_version, vllm_versions

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
    "UnknownPatchError",
    "VLLMPatch",
    "VLLMVersion",
    "detect_vllm_version",
    "max_vllm_version",
    "min_vllm_version",
    "vllm_versions",
]

__version__ = "0.1.0"
