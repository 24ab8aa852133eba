"""Applying and rolling back: the operations on the registry's ledger.

Every change is made under the registry's lock, and recorded so that
rollback can put back exactly what was there.
"""

from __future__ import annotations

from dataclasses import replace

from .abcs import refresh_abc_state
from .errors import PatchApplyError, PatchConflictError, PatchError, PatchVersionError
from .graft import MISSING, ORIGINAL_PREFIX, Change, Transaction, mro_lookup, rebind, restore
from .inflight import Lingering, LingeringLayer, codes_of, threads_running
from .instrument import Instrument, installed, instrumented_member, instrumented_original
from .live import check_live_instances
from .log import logger
from .planning import check_conflicts, plan_apply
from .registry import REGISTRY, Applied, Registry
from .spec import Originals, PatchLike, PatchSpec
from .stacks import Layer, Stack, link, relink
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
        held = [(change.name, change.new) for change in record.changes]
        for member in record.stacked:
            stack = reg.stacks[(target, member)]
            held += [(member, stack.top_held), (ORIGINAL_PREFIX + member, stack.original_held)]
        for member, value in held:
            if vars(target).get(member, MISSING) is not value:
                raise PatchConflictError(
                    f"cannot roll back patch {name!r}: {target.__qualname__}.{member} "
                    f"was replaced after the patch was applied, by code outside this "
                    f"patch. Undo that change first; nothing was rolled back."
                )
        # The target's own members first, so new calls reach the originals
        # at once; each ``_original_x`` then goes only when no thread is
        # still inside the patch's code, which may yet call it.
        originals = [change for change in record.changes if change.name.startswith(ORIGINAL_PREFIX)]
        members = [change for change in record.changes if not change.name.startswith(ORIGINAL_PREFIX)]
        bases = {change.name[len(ORIGINAL_PREFIX) :]: change.new for change in originals}
        errors: list[BaseException] = []
        for change in reversed(members):
            try:
                restore(target, change)
            except Exception as exc:
                errors.append(exc)
        gained, lost = record.lost, record.gained  # what the apply gained is lost now, and the other way round
        for member in record.stacked:
            bases[member] = reg.stacks[(target, member)].reached_base
            try:
                came, went = _leave(reg, target, member, name)
            except Exception as exc:
                errors.append(exc)
                continue
            gained, lost = gained or came, lost or went
        codes = record.codes
        busy = threads_running(codes) if record.overrides else 0
        for change in reversed(originals):
            if busy:
                reg.lingerers.add(Lingering(name, target, change.name, change.new, codes))
                continue
            try:
                restore(target, change)
            except Exception as exc:
                errors.append(exc)
        table = record.patch._vcp_originals
        table.additions = None
        key = (-record.patch._vcp_spec.order, name)
        for member in record.overrides:
            if busy:
                stacked = member in record.stacked
                reg.lingerers.add_layer(
                    LingeringLayer(name, table, target, member, key if stacked else None, bases[member], codes)
                )
                if stacked:  # its place kept, its next layer concrete (see stacks.relink)
                    relink(reg.stacks, reg.lingerers, target, member)
            else:
                table.forget(member)
        if busy:
            logger.info(
                "Patch %r: %d thread(s) are still inside its code; %s stay until they return",
                name,
                busy,
                ", ".join(
                    [f"{target.__qualname__}.{change.name}" for change in originals]
                    + [f"its original({member!r})" for member in record.stacked]
                ),
            )
        refresh_abc_state(target, gained=gained, lost=lost, before=reg.abc_before)
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


def _leave(reg: Registry, target: type, member: str, name: str) -> tuple[bool, bool]:
    """Take patch ``name``'s layer out of the stack on ``target.member``; whether a member came or went (abc)."""
    stack = reg.stacks[(target, member)]
    rest = stack.without(name)
    before = _shown(target, member)
    if not rest.layers:
        # The last layer: exactly what a single patch's rollback puts back.
        del reg.stacks[(target, member)]
        restore(target, Change(member, stack.old, stack.top_held))
        restore(target, Change(ORIGINAL_PREFIX + member, MISSING, stack.original_held))
    elif stack.layers[0].patch == name:
        # The outermost: the next one out takes its place on the target.
        restore(target, Change(member, rest.layers[0].member, stack.top_held))
        reg.stacks[(target, member)] = replace(rest, top_held=vars(target).get(member, MISSING))
    else:
        reg.stacks[(target, member)] = rest
    # The layer outward of it now skips it; its own entry stays as it is (it may linger).
    relink(reg.stacks, reg.lingerers, target, member)
    after = _shown(target, member)
    return before is None and after is not None, after is None and before is not None


def _shown(target: type, member: str) -> object:
    """What the target offers under ``member``, raw: its own or inherited (``MISSING``: nothing)."""
    found = mro_lookup(target, member)
    return found[1] if found is not None else MISSING


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
    reg = REGISTRY
    plan = plan_apply(spec, target, reg.stacks)
    check_conflicts(reg, spec, target, plan)
    if live_check:
        # Last of the checks (it walks the heap), and before any change: a
        # refusal leaves nothing to undo, and no call ever ran the patch.
        check_live_instances(patch_cls, spec, target)
    originals = dict(plan.overrides)
    stacked = tuple(originals) if spec.stackable else ()
    table = patch_cls._vcp_originals
    table_before = {member: table.state(member) for member in originals}
    tx = Transaction(target)
    # Read once: one apply is instrumented all through, or not at all.
    instrument = installed()
    # Each original goes in before its replacement, so a thread calling the
    # target meanwhile never finds a graft whose original is missing; the
    # patch's original() entries go in first of all, for the same reason.
    steps: list[tuple[str, object, bool]] = []  # (name, value, is the member itself)
    for member, value in spec.members.items():
        if member in stacked:
            continue
        if member in originals:
            original = instrumented_original(instrument, target, member, originals[member])
            steps.append((ORIGINAL_PREFIX + member, original, False))
        steps.append((member, instrumented_member(instrument, spec.name, target, member, rebind(value, target)), True))
    joined: dict[str, Stack] = {}
    shown = {member: _shown(target, member) for member in stacked}
    member = ""
    try:
        for member in originals:
            if member not in stacked:
                table.link_through(member, target)
        for member, value, own in steps:
            _set(tx, member, value, own)
        for member in stacked:
            joined[member] = _join(tx, spec, table, target, member, plan.holders[member], originals[member], instrument)
    except BaseException as exc:
        undo_errors = tx.undo()
        for name, state in table_before.items():
            table.restore(name, state)
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
    # Nothing can fail from here on: the stacks take their new shape, and the
    # layers outward of the new ones are pointed at them.
    for member in originals:
        reg.lingerers.adopt_layer(target, member, spec.name)
    for member, stack in joined.items():
        reg.stacks[(target, member)] = stack
        relink(reg.stacks, reg.lingerers, target, member)
    table.additions = tuple(plan.additions)
    # Members came and went: what abc computed from them may be stale.  A
    # layer that joins inward of others changes nothing the target shows.
    plain = [original for member, original in plan.overrides if member not in stacked]
    gained = bool(plan.additions) or any(original is None for original in plain)
    gained = gained or any(shown[member] is None and _shown(target, member) is not None for member in stacked)
    lost = any(value is None for value in spec.members.values())
    abstracts = refresh_abc_state(target, gained=gained, lost=lost, before=reg.abc_before)
    stack_names = {*stacked, *(ORIGINAL_PREFIX + member for member in stacked)}
    grafted = [value for _, value, own in steps if own] + [stack.layer(spec.name).member for stack in joined.values()]
    return Applied(
        patch=patch_cls,
        target=target,
        # The stacks' own changes are the stacks' to undo, not this patch's.
        changes=[change for change in tx.changes if change.name not in stack_names],
        overrides=tuple(name for name, _ in plan.overrides),
        additions=tuple(plan.additions),
        abstracts=abstracts,
        gained=gained,
        lost=lost,
        # With an instrument, a thread inside its stand-in is about to run (or has run) the patch's code.
        codes=codes_of([*spec.members.values(), *grafted]),
        stacked=stacked,
    )


def _set(tx: Transaction, member: str, value: object, own: bool) -> None:
    """Set one name of the patch; an original lingering from a rollback is taken over, not recorded as old."""
    lingering = not own and REGISTRY.lingerers.lingering(tx.target, member) is not None
    tx.set(member, value, set_name=own, absent_before=lingering)
    if lingering:
        REGISTRY.lingerers.adopt(tx.target, member)


def _join(
    tx: Transaction,
    spec: PatchSpec,
    table: Originals,
    target: type,
    member: str,
    holder: type,
    base: object,
    instrument: Instrument | None,
) -> Stack:
    """Make the patch a layer of the stack on ``target.member`` (a new stack of one if there is none).

    Only the target is changed here (recorded in ``tx``) and the patch's own
    ``original()`` entry; the stack itself is committed by the caller, once
    every member has joined.  The target keeps vLLM's original itself under
    ``_original_<name>`` (no layer reads it); an instrument's stand-in for it
    is what the innermost layer calls (``Stack.reach``).
    """
    own = instrumented_member(instrument, spec.name, target, member, rebind(spec.members[member], target))
    layer = Layer(spec.name, spec.order, table, own)
    current = REGISTRY.stacks.get((target, member))
    if current is None:
        reach = instrumented_original(instrument, target, member, base)
        stack = Stack(
            target, member, base, holder, vars(target).get(member, MISSING), (layer,),
            reach=MISSING if reach is base else reach,
        )  # fmt: skip
    else:
        stack = current.joined(layer)
    link(table, stack, layer.key)
    if current is None:
        _set(tx, ORIGINAL_PREFIX + member, base, False)
        stack = replace(stack, original_held=vars(target).get(ORIGINAL_PREFIX + member, MISSING))
    if stack.layers[0] is layer:
        tx.set(member, layer.member)
        return replace(stack, top_held=vars(target).get(member, MISSING))
    # Inward of the outermost: on no class, but its descriptor learns where it
    # serves, as it would on the target (a raising __set_name__ refuses the apply).
    hook = getattr(type(layer.member), "__set_name__", None)
    if hook is not None:
        hook(layer.member, target, member)
    return stack


def _describe(overrides: tuple[str, ...], additions: tuple[str, ...]) -> str:
    parts = []
    if overrides:
        parts.append("overrides " + ", ".join(overrides))
    if additions:
        parts.append("adds " + ", ".join(additions))
    return "; ".join(parts) or "no members"


def _label(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"
