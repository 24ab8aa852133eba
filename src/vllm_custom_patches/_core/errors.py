"""The exception hierarchy.

Every error the framework raises on purpose derives from :class:`PatchError`,
so callers (and vLLM's start-up) can catch one type.  The definition and
configuration errors also derive from the built-in type a Python user would
expect (``TypeError`` for a malformed class, ``ValueError`` for a bad setting,
``LookupError`` for an unknown name).
"""

from __future__ import annotations

__all__ = [
    "PatchApplyError",
    "PatchConfigError",
    "PatchConflictError",
    "PatchDefinitionError",
    "PatchError",
    "PatchLoadError",
    "PatchTargetError",
    "PatchVersionError",
    "UnknownPatchError",
]


class PatchError(Exception):
    """Base class of every error raised by vllm-custom-patches."""


class PatchDefinitionError(PatchError, TypeError):
    """A patch class is malformed (raised when the class statement runs)."""


class PatchTargetError(PatchError):
    """The target cannot be imported, or lacks a member the patch relies on."""


class PatchConflictError(PatchError):
    """Another patch, or code outside the framework, already owns a member."""


class PatchVersionError(PatchError):
    """The installed vLLM version does not satisfy the patch's version gate."""


class PatchLoadError(PatchError):
    """A module that should define patches failed to import; see ``__cause__``.

    Raised for an entry point of the ``vllm_custom_patches`` group and for a
    file in ``VLLM_CUSTOM_PATCHES_PATH``.  Deliberately not an ``ImportError``:
    code that tolerates a missing optional module must not swallow it.
    """


class PatchApplyError(PatchError):
    """Something else failed while applying or rolling back; see ``__cause__``."""


class UnknownPatchError(PatchError, LookupError):
    """No patch of that name is known."""


class PatchConfigError(PatchError, ValueError):
    """An environment variable or other setting has a value that cannot work."""
