"""The registry: the patch classes this process knows, and the ledger of what is applied.

Plain state under one re-entrant lock, shared by the manager's operations
(``_ledger``) and read by the status and the test helpers.  It knows patch
classes only by their spec, so defining a patch needs nothing but this.
"""

from __future__ import annotations

import difflib
import os
import weakref
from dataclasses import dataclass
from types import CodeType
from typing import Any

from .errors import PatchDefinitionError, UnknownPatchError
from .forksafe import ForkSafeRLock
from .graft import Change
from .inflight import Lingerers
from .log import logger
from .spec import PatchLike, PatchSpec
from .stacks import Stack
from .status import PatchState

__all__ = ["REGISTRY", "Applied", "Registry", "unknown_name_message"]


@dataclass
class Applied:
    """What one applied patch changed on its target: enough to undo it exactly."""

    patch: type[PatchLike]
    target: type
    changes: list[Change]
    overrides: tuple[str, ...]
    additions: tuple[str, ...]
    abstracts: dict[type, object]
    """``__abstractmethods__`` the apply changed: class -> what it held before."""
    gained: bool
    """The apply made a member available: an addition, or a ``None`` original replaced."""
    lost: bool
    """The apply made a member unavailable: a member set to ``None``."""
    codes: frozenset[CodeType]
    """The code of the grafted members: a thread running it may still need an ``_original_x``."""
    stacked: tuple[str, ...] = ()
    """Overrides that are layers of stacks (``Registry.stacks``), not in ``changes``."""


class Registry:
    """Every known patch class by name, the applied ones, and who owns which member."""

    def __init__(self) -> None:
        # Re-entrant: applying a patch can import a module whose body defines
        # (and so registers) more patches, on the same thread.  Renewed in a
        # forked child if another thread held it (see _forksafe).
        self.lock = ForkSafeRLock()
        self.patches: dict[str, type[PatchLike]] = {}
        self.applied: dict[str, Applied] = {}  # in order of application
        self.owners: dict[type, dict[str, str]] = {}  # target -> member -> patch name; stacks apart
        self.stacks: dict[tuple[type, str], Stack] = {}  # (target, member) -> its applied stackable layers
        # Each class's __abstractmethods__ as it was before a patch changed it, so that the
        # very same object goes back when the set is the same again, whatever the order of
        # rollbacks (abcs.refresh_abc_state).
        self.abc_before: weakref.WeakKeyDictionary[type, object] = weakref.WeakKeyDictionary()
        self.outcomes: dict[str, tuple[PatchState, str]] = {}
        self.lingerers = Lingerers(self.lock)

    def register(self, patch_cls: type[PatchLike]) -> type[PatchLike]:
        """Register a patch class under its name; a second class of the same name is refused."""
        if not (isinstance(patch_cls, type) and isinstance(vars(patch_cls).get("_vcp_spec"), PatchSpec)):
            raise PatchDefinitionError(
                f"{patch_cls!r} is not a patch class; define it as 'class P(VLLMPatch[Target])'."
            )
        name = patch_cls._vcp_spec.name
        with self.lock:
            existing = self.patches.get(name)
            if existing is not None and existing is not patch_cls:
                if _origin(existing) != _origin(patch_cls):
                    raise PatchDefinitionError(
                        f"two patch classes are named {name!r}: {_origin(existing)} and "
                        f"{_origin(patch_cls)}; set a distinct 'name' on one of them."
                    )
                if name in self.applied:
                    logger.warning(
                        "Patch %r was redefined while applied; the applied definition stays "
                        "until it is rolled back and applied again.",
                        name,
                    )
            self.patches[name] = patch_cls
        return patch_cls

    def get(self, name: str) -> type[PatchLike]:
        """The patch class registered under ``name``; :class:`UnknownPatchError` if none."""
        with self.lock:
            try:
                return self.patches[name]
            except (KeyError, TypeError):
                raise UnknownPatchError(unknown_name_message(name, self.patches)) from None

    def set_outcome(self, name: str, state: PatchState, reason: str) -> None:
        """Record why a patch that is not applied stands where it does."""
        with self.lock:
            if name not in self.applied:
                self.outcomes[name] = (state, reason)


REGISTRY = Registry()
"""The process-wide registry."""
if hasattr(os, "register_at_fork"):
    # Runs after _forksafe's handler (registered when it was imported, above), so a
    # sweeper started here finds the lock renewed if a vanished thread held it.
    os.register_at_fork(after_in_child=REGISTRY.lingerers.after_fork_in_child)


def _origin(patch_cls: type) -> str:
    return f"{patch_cls.__module__}.{patch_cls.__qualname__}"


def unknown_name_message(name: object, known: dict[str, Any] | list[str]) -> str:
    names = sorted(known)
    close = difflib.get_close_matches(str(name), names, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    listed = ", ".join(names) if names else "none"
    return f"no patch named {name!r}.{hint} Available: {listed}."
