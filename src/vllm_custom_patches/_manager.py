"""``PatchManager``: the process-wide registry of patches and the ledger of what is applied."""

from __future__ import annotations

import difflib
import enum
import os
import threading
from types import CodeType
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union

from ._errors import (
    PatchApplyError,
    PatchConflictError,
    PatchDefinitionError,
    PatchError,
    PatchTargetError,
    PatchVersionError,
    UnknownPatchError,
)
from ._abcs import refresh_abc_state
from ._graft import (
    MISSING,
    ORIGINAL_PREFIX,
    Change,
    Transaction,
    descendants,
    is_override_marked,
    mro_lookup,
    rebind,
    restore,
)
from ._inflight import Lingerers, Lingering, codes_of, threads_running
from ._log import logger
from ._patch import PatchSpec, VLLMPatch
from ._targets import resolve_target
from ._versions import check_gate

__all__ = ["PatchManager", "PatchState", "PatchStatus"]

PatchRef = Union[str, "type[VLLMPatch[Any]]"]


class PatchState(str, enum.Enum):
    """Where a known patch stands in this process."""

    APPLIED = "applied"
    AVAILABLE = "available"
    """Known and not applied; nothing has been tried or it was rolled back."""
    PENDING = "pending"
    """Selected; waits for its target's module to be imported."""
    SKIPPED = "skipped"
    """Not applied on purpose (version gate, or skipped by the selection policy)."""
    FAILED = "failed"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class PatchStatus:
    """One patch as :meth:`PatchManager.status` reports it."""

    name: str
    target: str
    """The target as ``module:Qual.Name``."""
    state: PatchState
    reason: str = ""
    """Why it is skipped, failed or pending; empty otherwise."""
    overrides: tuple[str, ...] = ()
    """Members that replace one of the target's (known once the target is imported)."""
    additions: tuple[str, ...] = ()
    """Members the target did not have."""
    versions: str = ""
    """The vLLM version gate, as a PEP 440 specifier set; empty if none."""
    description: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "target": self.target,
            "state": self.state.value,
            "reason": self.reason,
            "overrides": list(self.overrides),
            "additions": list(self.additions),
            "versions": self.versions,
            "description": self.description,
        }


@dataclass
class _Applied:
    patch: type[VLLMPatch[Any]]
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


@dataclass
class _Plan:
    overrides: list[tuple[str, object]] = field(default_factory=list)  # (name, raw original)
    holders: dict[str, type] = field(default_factory=dict)  # override -> class whose __dict__ holds the original
    additions: list[str] = field(default_factory=list)


class _Registry:
    def __init__(self) -> None:
        # Re-entrant: applying a patch can import a module whose body defines
        # (and so registers) more patches, on the same thread.
        self.lock = threading.RLock()
        self.patches: dict[str, type[VLLMPatch[Any]]] = {}
        self.applied: dict[str, _Applied] = {}  # in order of application
        self.owners: dict[type, dict[str, str]] = {}  # target -> member -> patch name
        self.outcomes: dict[str, tuple[PatchState, str]] = {}
        self.lingerers = Lingerers(self.lock)


_registry = _Registry()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_registry.lingerers.after_fork_in_child)


class PatchManager:
    """The process-wide registry of patches; every method is a class method.

    Patch classes register themselves when defined.  The manager applies them,
    records exactly what each changed, refuses conflicts and rolls any of them
    back.  All methods are thread-safe.
    """

    _registry: ClassVar[_Registry] = _registry

    def __init__(self) -> None:
        raise TypeError("PatchManager is used through its class methods; do not instantiate it.")

    # -- registry ---------------------------------------------------------

    @classmethod
    def register(cls, patch_cls: type[VLLMPatch[Any]]) -> type[VLLMPatch[Any]]:
        """Register a patch class (done automatically when it is defined); returns it."""
        if not (isinstance(patch_cls, type) and issubclass(patch_cls, VLLMPatch) and "_vcp_spec" in vars(patch_cls)):
            raise PatchDefinitionError(
                f"{patch_cls!r} is not a patch class; define it as 'class P(VLLMPatch[Target])'."
            )
        name = patch_cls._vcp_spec.name
        reg = cls._registry
        with reg.lock:
            existing = reg.patches.get(name)
            if existing is not None and existing is not patch_cls:
                if _origin(existing) != _origin(patch_cls):
                    raise PatchDefinitionError(
                        f"two patch classes are named {name!r}: {_origin(existing)} and "
                        f"{_origin(patch_cls)}; set a distinct 'name' on one of them."
                    )
                if name in reg.applied:
                    logger.warning(
                        "Patch %r was redefined while applied; the applied definition stays "
                        "until it is rolled back and applied again.",
                        name,
                    )
            reg.patches[name] = patch_cls
        return patch_cls

    @classmethod
    def get(cls, name: str) -> type[VLLMPatch[Any]]:
        """The patch class registered under ``name``; :class:`UnknownPatchError` if none."""
        reg = cls._registry
        with reg.lock:
            try:
                return reg.patches[name]
            except (KeyError, TypeError):
                raise UnknownPatchError(unknown_name_message(name, reg.patches)) from None

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
        target is then exactly as it was.
        """
        patch_cls = cls._resolve(patch)
        spec = patch_cls._vcp_spec
        reg = cls._registry
        with reg.lock:
            if spec.name in reg.applied:
                return False
        try:
            check_gate(spec.name, patch_cls._vcp_gate)
        except PatchVersionError as exc:
            cls._set_outcome(spec.name, PatchState.SKIPPED, str(exc))
            raise
        try:
            # Imports happen outside the lock: a module body that registers
            # patches on another thread must not wait for us while we wait
            # for its import lock.
            target = resolve_target(spec.target, spec.name)
            assert target is not None
            with reg.lock:
                if spec.name in reg.applied:
                    return False
                record = cls._graft(patch_cls, spec, target)
                reg.applied[spec.name] = record
                owners = reg.owners.setdefault(target, {})
                for change in record.changes:
                    owners[change.name] = spec.name
                reg.outcomes.pop(spec.name, None)
        except PatchError as exc:
            cls._set_outcome(spec.name, PatchState.FAILED, str(exc))
            raise
        logger.info(
            "Applied patch %r to %s (%s)", spec.name, spec.target_label, _describe(record.overrides, record.additions)
        )
        return True

    @classmethod
    def rollback(cls, patch: PatchRef) -> bool:
        """Roll a patch back exactly; ``False`` if it was not applied.

        Everything the patch set on its target is put back as it was (raw,
        same identity) or deleted if the target did not hold it.  If code
        outside this patch has replaced one of its members since, nothing is
        touched and :class:`PatchConflictError` says which.
        """
        name = patch if isinstance(patch, str) else cls._resolve(patch)._vcp_spec.name
        reg = cls._registry
        with reg.lock:
            record = reg.applied.get(name)
            if record is None:
                return False
            target = record.target
            for change in record.changes:
                if vars(target).get(change.name, MISSING) is not change.new:
                    raise PatchConflictError(
                        f"cannot roll back patch {name!r}: {_qualname(target)}.{change.name} "
                        f"was replaced after the patch was applied, by code outside this "
                        f"patch. Undo that change first; nothing was rolled back."
                    )
            # The target's own members first, so new calls reach the originals
            # at once; each ``_original_x`` then goes only when no thread is
            # still inside the patch's code, which may yet call it.
            originals = [change for change in record.changes if change.name.startswith(ORIGINAL_PREFIX)]
            members = [change for change in record.changes if not change.name.startswith(ORIGINAL_PREFIX)]
            errors: list[BaseException] = []
            for change in reversed(members):
                try:
                    restore(target, change)
                except Exception as exc:
                    errors.append(exc)
            codes = record.codes
            busy = threads_running(codes) if originals else 0
            for change in reversed(originals):
                if busy:
                    reg.lingerers.add(Lingering(name, target, change.name, change.new, codes))
                    continue
                try:
                    restore(target, change)
                except Exception as exc:
                    errors.append(exc)
            if busy:
                logger.info(
                    "Patch %r: %d thread(s) are still inside its code; %s stay until they return",
                    name,
                    busy,
                    ", ".join(f"{_qualname(target)}.{change.name}" for change in originals),
                )
            # What the apply gained is lost now, and the other way round.
            refresh_abc_state(target, gained=record.lost, lost=record.gained, before=record.abstracts)
            del reg.applied[name]
            owners = reg.owners.get(target, {})
            for change in record.changes:
                owners.pop(change.name, None)
            if not owners:
                reg.owners.pop(target, None)
            reg.outcomes.pop(name, None)
        if errors:
            raise PatchApplyError(
                f"patch {name!r}: {len(errors)} member(s) of {_qualname(target)} could not be "
                f"restored: {errors[0]!r}"
            ) from errors[0]
        logger.info("Rolled back patch %r from %s", name, _label(target))
        return True

    @classmethod
    def rollback_all(cls) -> list[str]:
        """Roll back every applied patch, last applied first; returns their names in that order."""
        reg = cls._registry
        done: list[str] = []
        failures: list[tuple[str, PatchError]] = []
        with reg.lock:
            for name in reversed(list(reg.applied)):
                try:
                    if cls.rollback(name):
                        done.append(name)
                except PatchError as exc:
                    failures.append((name, exc))
        if failures:
            listed = "; ".join(f"{name}: {exc}" for name, exc in failures)
            raise PatchApplyError(f"rolled back {done}, but not: {listed}") from failures[0][1]
        return done

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
                if applied is not None:
                    state, reason = PatchState.APPLIED, ""
                    overrides, additions = applied.overrides, applied.additions
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
                    )
                )
            return records

    # -- internals (used by the plugin and the test helpers) ---------------

    @classmethod
    def _resolve(cls, patch: PatchRef) -> type[VLLMPatch[Any]]:
        if isinstance(patch, str):
            return cls.get(patch)
        if isinstance(patch, type) and issubclass(patch, VLLMPatch) and "_vcp_spec" in vars(patch):
            return patch
        raise UnknownPatchError(f"{patch!r} is neither a patch name nor a patch class.")

    @classmethod
    def _set_outcome(cls, name: str, state: PatchState, reason: str) -> None:
        with cls._registry.lock:
            if name not in cls._registry.applied:
                cls._registry.outcomes[name] = (state, reason)

    @classmethod
    def _graft(cls, patch_cls: type[VLLMPatch[Any]], spec: PatchSpec, target: type) -> _Applied:
        plan = _plan(spec, target)
        cls._check_conflicts(spec, target, plan)
        originals = dict(plan.overrides)
        tx = Transaction(target)
        # Each original goes in before its replacement, so a thread calling the
        # target meanwhile never finds a graft whose original is missing.
        steps: list[tuple[str, object, bool]] = []  # (name, value, is the member itself)
        for member, value in spec.members.items():
            if member in originals:
                steps.append((ORIGINAL_PREFIX + member, originals[member], False))
            steps.append((member, rebind(value, target), True))
        member = ""
        try:
            for member, value, own in steps:
                lingering = not own and cls._registry.lingerers.lingering(target, member) is not None
                tx.set(member, value, set_name=own, absent_before=lingering)
                if lingering:
                    cls._registry.lingerers.adopt(target, member)
        except BaseException as exc:
            undo_errors = tx.undo()
            if undo_errors:
                raise PatchApplyError(
                    f"patch {spec.name!r}: setting {_qualname(target)}.{member} failed "
                    f"({type(exc).__name__}: {exc}) and {len(undo_errors)} earlier change(s) "
                    f"could not be undone ({undo_errors[0]!r}); {_qualname(target)} is inconsistent."
                ) from exc
            if not isinstance(exc, Exception) or isinstance(exc, PatchError):
                raise
            raise PatchApplyError(
                f"patch {spec.name!r}: setting {_qualname(target)}.{member} failed: "
                f"{type(exc).__name__}: {exc}. {_qualname(target)} was left unchanged."
            ) from exc
        # Members came and went: what abc computed from them may be stale.
        gained = bool(plan.additions) or any(original is None for _, original in plan.overrides)
        lost = any(value is None for value in spec.members.values())
        abstracts = refresh_abc_state(target, gained=gained, lost=lost)
        return _Applied(
            patch=patch_cls,
            target=target,
            changes=list(tx.changes),
            overrides=tuple(name for name, _ in plan.overrides),
            additions=tuple(plan.additions),
            abstracts=abstracts,
            gained=gained,
            lost=lost,
            codes=codes_of(spec.members.values()),
        )

    @classmethod
    def _check_conflicts(cls, spec: PatchSpec, target: type, plan: _Plan) -> None:
        reg = cls._registry
        reg.lingerers.sweep()
        owners = reg.owners.get(target, {})
        originals = [ORIGINAL_PREFIX + name for name, _ in plan.overrides]
        for member in [*spec.members, *originals]:
            other = owners.get(member)
            if other is not None:
                raise PatchConflictError(
                    f"patch {spec.name!r} conflicts with applied patch {other!r}: both set "
                    f"{_qualname(target)}.{member}. Roll {other!r} back first, or merge the two."
                )
        related = _sharing_instances(target)
        for original in originals:
            if original in vars(target) and reg.lingerers.lingering(target, original) is None:
                raise PatchConflictError(
                    f"patch {spec.name!r}: {_qualname(target)} already has its own "
                    f"{original!r}, not made by vllm-custom-patches; the original of "
                    f"{original[len(ORIGINAL_PREFIX):]!r} cannot be kept under that name."
                )
            # Two ``_original_x`` in the MRO of one instance (a base and a
            # subclass, or two sides of a diamond) make ``self._original_x``
            # inside one graft find the other's original: endless recursion.
            for klass in related:
                if original in vars(klass):
                    lingering = reg.lingerers.lingering(klass, original)
                    owner = reg.owners.get(klass, {}).get(original)
                    if lingering is not None:
                        who = f"patch {lingering.patch!r}, rolled back and kept while calls into it finish"
                    elif owner is not None:
                        who = f"applied patch {owner!r}"
                    else:
                        who = "code outside vllm-custom-patches"
                    raise PatchConflictError(
                        f"patch {spec.name!r} cannot replace {_qualname(target)}."
                        f"{original[len(ORIGINAL_PREFIX):]}: {_qualname(klass)}.{original} "
                        f"(set by {who}) is in the same class hierarchy (the MRO of the same "
                        f"instances), and self.{original} would resolve to the wrong original. "
                        f"Patch this member on one class of the hierarchy only."
                    )
        for member, holder in plan.holders.items():
            # The original would be another patch's member (say, a helper it
            # added to a base class): the two would stack, and rolling that
            # patch back would leave this one calling its code.
            other = reg.owners.get(holder, {}).get(member)
            if other is not None:
                raise PatchConflictError(
                    f"patch {spec.name!r} conflicts with applied patch {other!r}: it would keep "
                    f"{_qualname(holder)}.{member}, which {other!r} set, as the original of "
                    f"{_qualname(target)}.{member}, and the two would stack. Roll {other!r} back "
                    f"first, or merge the two."
                )


def _plan(spec: PatchSpec, target: type) -> _Plan:
    plan = _Plan()
    for name, member in spec.members.items():
        found = mro_lookup(target, name)
        if found is None:
            if is_override_marked(member):
                raise PatchTargetError(
                    f"patch {spec.name!r}: {name!r} is marked @override but "
                    f"{_qualname(target)} has no member {name!r}; the target changed, "
                    f"or the name is misspelt."
                )
            if name in spec.original_refs:
                raise PatchTargetError(
                    f"patch {spec.name!r}: {name!r} calls self.{ORIGINAL_PREFIX}{name} but "
                    f"{_qualname(target)} has no member {name!r} to keep as the original."
                )
            plan.additions.append(name)
            continue
        holder, original = found
        if name == "__new__" and original is object.__new__:
            # Deleting __new__ again does not restore CPython's tp_new slot:
            # after rollback ``Target(arg)`` would raise "object.__new__()
            # takes exactly one argument".  No exact rollback, so no apply.
            raise PatchTargetError(
                f"patch {spec.name!r} replaces {_qualname(target)}.__new__, which "
                f"{_qualname(target)} inherits from object; CPython cannot restore that "
                f"slot on rollback. Patch __init__ instead, or give the class hierarchy "
                f"a __new__ of its own to patch."
            )
        plan.overrides.append((name, original))
        plan.holders[name] = holder
    return plan


def _preview(spec: PatchSpec) -> tuple[tuple[str, ...], tuple[str, ...]]:
    try:
        target = resolve_target(spec.target, spec.name, import_module=False)
    except PatchError:
        return (), ()
    if target is None:
        return (), ()
    overrides = tuple(name for name in spec.members if mro_lookup(target, name) is not None)
    return overrides, tuple(name for name in spec.members if name not in overrides)


def _sharing_instances(cls: type) -> list[type]:
    """Every class other than ``cls`` in the MRO of ``cls`` or of one of its subclasses.

    These are the classes whose members an instance of ``cls`` (or of a
    subclass) can see: ancestors, descendants, and in multiple inheritance
    the siblings that a common subclass puts next to ``cls``.
    """
    related: dict[type, None] = {}
    for sub in descendants(cls):
        for klass in sub.__mro__:
            if klass is not cls:
                related[klass] = None
    return list(related)


def _describe(overrides: tuple[str, ...], additions: tuple[str, ...]) -> str:
    parts = []
    if overrides:
        parts.append("overrides " + ", ".join(overrides))
    if additions:
        parts.append("adds " + ", ".join(additions))
    return "; ".join(parts) or "no members"


def _origin(patch_cls: type) -> str:
    return f"{patch_cls.__module__}.{patch_cls.__qualname__}"


def _qualname(cls: type) -> str:
    return cls.__qualname__


def _label(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def unknown_name_message(name: object, known: dict[str, Any] | list[str]) -> str:
    names = sorted(known)
    close = difflib.get_close_matches(str(name), names, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    listed = ", ".join(names) if names else "none"
    return f"no patch named {name!r}.{hint} Available: {listed}."
