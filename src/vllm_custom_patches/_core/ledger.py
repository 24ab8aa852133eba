"""Applying and rolling back: the operations on the registry's ledger.

Every change is made under the registry's lock, and recorded so that
rollback can put back exactly what was there.
"""

from __future__ import annotations

from .abcs import refresh_abc_state
from .errors import PatchApplyError, PatchConflictError, PatchError, PatchVersionError
from .graft import MISSING, ORIGINAL_PREFIX, Transaction, rebind, restore
from .inflight import Lingering, codes_of, threads_running
from .live import check_live_instances
from .log import logger
from .planning import check_conflicts, plan_apply
from .registry import REGISTRY, Applied
from .spec import PatchLike, PatchSpec
from .status import PatchState
from .targets import resolve_target
from .versions import check_gate

__all__ = ["apply", "rollback", "rollback_all"]


def apply(patch_cls: type[PatchLike], *, live_check: bool = True) -> bool:
    """Apply a patch class; ``True`` if applied now, ``False`` if it already was (see PatchManager.apply).

    ``live_check=False`` only where no instance of the target can exist yet
    (the post-import hook): the patch's ``check_live`` is then not run and
    the heap is not walked.
    """
    spec = patch_cls._vcp_spec
    reg = REGISTRY
    with reg.lock:
        if spec.name in reg.applied:
            return False
    try:
        check_gate(spec.name, patch_cls._vcp_gate)
    except PatchVersionError as exc:
        reg.set_outcome(spec.name, PatchState.SKIPPED, str(exc))
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
            record = _graft(patch_cls, spec, target, live_check)
            reg.applied[spec.name] = record
            owners = reg.owners.setdefault(target, {})
            for change in record.changes:
                owners[change.name] = spec.name
            reg.outcomes.pop(spec.name, None)
    except PatchError as exc:
        reg.set_outcome(spec.name, PatchState.FAILED, str(exc))
        raise
    logger.info(
        "Applied patch %r to %s (%s)", spec.name, spec.target_label, _describe(record.overrides, record.additions)
    )
    return True


def rollback(name: str) -> bool:
    """Roll the patch of that name back exactly; ``False`` if it was not applied (see PatchManager.rollback)."""
    reg = REGISTRY
    with reg.lock:
        record = reg.applied.get(name)
        if record is None:
            return False
        target = record.target
        for change in record.changes:
            if vars(target).get(change.name, MISSING) is not change.new:
                raise PatchConflictError(
                    f"cannot roll back patch {name!r}: {target.__qualname__}.{change.name} "
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
                ", ".join(f"{target.__qualname__}.{change.name}" for change in originals),
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
            f"patch {name!r}: {len(errors)} member(s) of {target.__qualname__} could not be restored: {errors[0]!r}"
        ) from errors[0]
    logger.info("Rolled back patch %r from %s", name, _label(target))
    return True


def rollback_all() -> list[str]:
    """Roll back every applied patch, last applied first; returns their names in that order."""
    reg = REGISTRY
    done: list[str] = []
    failures: list[tuple[str, PatchError]] = []
    with reg.lock:
        for name in reversed(list(reg.applied)):
            try:
                if rollback(name):
                    done.append(name)
            except PatchError as exc:
                failures.append((name, exc))
    if failures:
        listed = "; ".join(f"{name}: {exc}" for name, exc in failures)
        raise PatchApplyError(f"rolled back {done}, but not: {listed}") from failures[0][1]
    return done


def _graft(patch_cls: type[PatchLike], spec: PatchSpec, target: type, live_check: bool) -> Applied:
    plan = plan_apply(spec, target)
    check_conflicts(REGISTRY, spec, target, plan)
    if live_check:
        # Last of the checks (it walks the heap), and before any change: a
        # refusal leaves nothing to undo, and no call ever ran the patch.
        check_live_instances(patch_cls, spec, target)
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
            lingering = not own and REGISTRY.lingerers.lingering(target, member) is not None
            tx.set(member, value, set_name=own, absent_before=lingering)
            if lingering:
                REGISTRY.lingerers.adopt(target, member)
    except BaseException as exc:
        undo_errors = tx.undo()
        if undo_errors:
            raise PatchApplyError(
                f"patch {spec.name!r}: setting {target.__qualname__}.{member} failed "
                f"({type(exc).__name__}: {exc}) and {len(undo_errors)} earlier change(s) "
                f"could not be undone ({undo_errors[0]!r}); {target.__qualname__} is inconsistent."
            ) from exc
        if not isinstance(exc, Exception) or isinstance(exc, PatchError):
            raise
        raise PatchApplyError(
            f"patch {spec.name!r}: setting {target.__qualname__}.{member} failed: "
            f"{type(exc).__name__}: {exc}. {target.__qualname__} was left unchanged."
        ) from exc
    # Members came and went: what abc computed from them may be stale.
    gained = bool(plan.additions) or any(original is None for _, original in plan.overrides)
    lost = any(value is None for value in spec.members.values())
    abstracts = refresh_abc_state(target, gained=gained, lost=lost)
    return Applied(
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


def _describe(overrides: tuple[str, ...], additions: tuple[str, ...]) -> str:
    parts = []
    if overrides:
        parts.append("overrides " + ", ".join(overrides))
    if additions:
        parts.append("adds " + ", ".join(additions))
    return "; ".join(parts) or "no members"


def _label(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"
