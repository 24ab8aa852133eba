"""``PatchManager``: the public face of the registry and the ledger."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Union, cast

from . import ledger as _ledger
from .errors import PatchError, UnknownPatchError
from .graft import mro_lookup
from .registry import REGISTRY, Registry, unknown_name_message
from .spec import PatchSpec
from .status import PatchState, PatchStatus
from .targets import resolve_target

if TYPE_CHECKING:
    from .patch import VLLMPatch

__all__ = ["PatchManager", "PatchRef", "PatchState", "PatchStatus", "unknown_name_message"]

PatchRef = Union[str, "type[VLLMPatch[Any]]"]


class PatchManager:
    """The process-wide registry of patches; every method is a class method.

    Patch classes register themselves when defined.  The manager applies them,
    records exactly what each changed, refuses conflicts and rolls any of them
    back.  All methods are thread-safe.
    """

    _registry: ClassVar[Registry] = REGISTRY

    def __init__(self) -> None:
        raise TypeError("PatchManager is used through its class methods; do not instantiate it.")

    # -- registry ---------------------------------------------------------

    @classmethod
    def register(cls, patch_cls: type[VLLMPatch[Any]]) -> type[VLLMPatch[Any]]:
        """Register a patch class (done automatically when it is defined); returns it."""
        cls._registry.register(patch_cls)
        return patch_cls

    @classmethod
    def get(cls, name: str) -> type[VLLMPatch[Any]]:
        """The patch class registered under ``name``; :class:`UnknownPatchError` if none."""
        # Only VLLMPatch subclasses register (the registry checks), so the cast holds.
        return cast("type[VLLMPatch[Any]]", cls._registry.get(name))

    @classmethod
    def names(cls) -> list[str]:
        """Names of all registered patches, in order of registration."""
        with cls._registry.lock:
            return list(cls._registry.patches)

    # -- applying ---------------------------------------------------------

    @classmethod
    def apply(cls, patch: PatchRef) -> bool:
        """Apply a patch by name or class.

        Returns ``True`` if it was applied now and ``False`` if it already was.
        Raises a :class:`PatchError` subclass if it cannot be applied; the
        target is then exactly as it was.  A patch that defines
        ``check_live`` has it called on every live instance of its target
        first (see :meth:`VLLMPatch.check_live`); it may refuse the apply.
        """
        return _ledger.apply(cls._resolve(patch))

    @classmethod
    def rollback(cls, patch: PatchRef) -> bool:
        """Roll a patch back exactly; ``False`` if it was not applied.

        Everything the patch set on its target is put back as it was (raw,
        same identity) or deleted if the target did not hold it.  If code
        outside this patch has replaced one of its members since, nothing is
        touched and :class:`PatchConflictError` says which.  A call already
        inside the patch keeps its ``_original_x`` until it returns.
        """
        return _ledger.rollback(patch if isinstance(patch, str) else cls._resolve(patch)._vcp_spec.name)

    @classmethod
    def rollback_all(cls) -> list[str]:
        """Roll back every applied patch, last applied first; returns their names in that order."""
        return _ledger.rollback_all()

    @classmethod
    def is_applied(cls, patch: PatchRef) -> bool:
        """Whether the patch (by name or class) is applied now."""
        name = patch if isinstance(patch, str) else getattr(getattr(patch, "_vcp_spec", None), "name", None)
        with cls._registry.lock:
            return name in cls._registry.applied

    @classmethod
    def applied(cls) -> list[str]:
        """Names of the applied patches, in order of application."""
        with cls._registry.lock:
            return list(cls._registry.applied)

    @classmethod
    def status(cls) -> list[PatchStatus]:
        """One record per registered patch, in order of registration.

        A layer of a stack carries the stack's chain (``stacks``), outermost
        layer first, ending at vLLM's original.

        Never imports anything: overrides and additions of a patch that is not
        applied are shown only when its target's module is already imported.
        """
        reg = cls._registry
        with reg.lock:
            records = []
            for name, patch_cls in reg.patches.items():
                spec = patch_cls._vcp_spec
                gate = patch_cls._vcp_gate
                applied = reg.applied.get(name)
                stacks: tuple[str, ...] = ()
                if applied is not None:
                    state, reason = PatchState.APPLIED, ""
                    overrides, additions = applied.overrides, applied.additions
                    stacks = tuple(reg.stacks[(applied.target, member)].describe() for member in applied.stacked)
                else:
                    state, reason = reg.outcomes.get(name, (PatchState.AVAILABLE, ""))
                    overrides, additions = _preview(spec)
                records.append(
                    PatchStatus(
                        name=name,
                        target=spec.target_label,
                        state=state,
                        reason=reason,
                        overrides=overrides,
                        additions=additions,
                        versions=str(gate) if gate is not None else "",
                        description=spec.description,
                        stackable=spec.stackable,
                        order=spec.order,
                        exclusive=tuple(sorted(spec.exclusive)),
                        stacks=stacks,
                    )
                )
            return records

    # -- internals (used by the plugin and the test helpers) ---------------

    @classmethod
    def _resolve(cls, patch: PatchRef) -> type[VLLMPatch[Any]]:
        if isinstance(patch, str):
            return cls.get(patch)
        if isinstance(patch, type) and isinstance(vars(patch).get("_vcp_spec"), PatchSpec):
            return patch
        raise UnknownPatchError(f"{patch!r} is neither a patch name nor a patch class.")

    @classmethod
    def _apply_on_import(cls, patch: PatchRef) -> bool:
        """:meth:`apply` for the post-import hook, the moment the target's module was imported.

        Nothing can have been built from the target yet, so the patch's
        ``check_live`` has nothing to check, and the heap is not walked to
        find out at each process's start-up.
        """
        return _ledger.apply(cls._resolve(patch), live_check=False)

    @classmethod
    def _set_outcome(cls, name: str, state: PatchState, reason: str) -> None:
        cls._registry.set_outcome(name, state, reason)


def _preview(spec: PatchSpec) -> tuple[tuple[str, ...], tuple[str, ...]]:
    try:
        target = resolve_target(spec.target, spec.name, import_module=False)
    except PatchError:
        return (), ()
    if target is None:
        return (), ()
    overrides = tuple(name for name in spec.members if mro_lookup(target, name) is not None)
    return overrides, tuple(name for name in spec.members if name not in overrides)
