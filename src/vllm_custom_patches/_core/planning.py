"""Planning an apply: how a patch meets its target, and whether it may.

Nothing is changed here; the ledger grafts what the plan says once the
checks have passed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import PatchConflictError, PatchTargetError
from .graft import MISSING, ORIGINAL_PREFIX, descendants, is_override_marked, mro_lookup
from .kinds import describe_change, kind_change, member_kind
from .registry import Registry
from .spec import PatchSpec
from .stacks import Stack

__all__ = ["Plan", "check_conflicts", "plan_apply"]


@dataclass
class Plan:
    """How a patch's members meet its target: which replace a member, which are new."""

    overrides: list[tuple[str, object]] = field(default_factory=list)  # (name, raw original)
    holders: dict[str, type] = field(default_factory=dict)  # override -> class whose __dict__ holds the original
    additions: list[str] = field(default_factory=list)


def plan_apply(spec: PatchSpec, target: type, stacks: dict[tuple[type, str], Stack] | None = None) -> Plan:
    """Where each member of the patch meets ``target``; refuses what cannot be rolled back exactly,
    and a member whose kind (method, static or class method, property, plain attribute) differs
    from the original's unless the patch marks it ``@changes_kind``.

    A member that a stack holds is met at the stack's base (vLLM's original):
    every layer is judged against it, whichever layers are applied.
    """
    plan = Plan()
    for name, member in spec.members.items():
        stack = (stacks or {}).get((target, name))
        found = (stack.holder, stack.base) if stack is not None else mro_lookup(target, name)
        if found is None:
            if is_override_marked(member):
                raise PatchTargetError(
                    f"patch {spec.name!r}: {name!r} is marked @override but "
                    f"{target.__qualname__} has no member {name!r}; the target changed, "
                    f"or the name is misspelt."
                )
            if name in spec.original_refs:
                raise PatchTargetError(
                    f"patch {spec.name!r}: {name!r} calls self.{ORIGINAL_PREFIX}{name} but "
                    f"{target.__qualname__} has no member {name!r} to keep as the original."
                )
            plan.additions.append(name)
            continue
        holder, original = found
        change = kind_change(member_kind(original, name), member, name)
        if change is not None:
            raise PatchTargetError(f"patch {spec.name!r}: " + describe_change(name, holder.__qualname__, change))
        if name == "__new__" and original is object.__new__:
            # Deleting __new__ again does not restore CPython's tp_new slot:
            # after rollback ``Target(arg)`` would raise "object.__new__()
            # takes exactly one argument".  No exact rollback, so no apply.
            raise PatchTargetError(
                f"patch {spec.name!r} replaces {target.__qualname__}.__new__, which "
                f"{target.__qualname__} inherits from object; CPython cannot restore that "
                f"slot on rollback. Patch __init__ instead, or give the class hierarchy "
                f"a __new__ of its own to patch."
            )
        plan.overrides.append((name, original))
        plan.holders[name] = holder
    return plan


def check_conflicts(reg: Registry, spec: PatchSpec, target: type, plan: Plan) -> None:
    """Raise :class:`PatchConflictError` if applying ``plan`` would clash with an applied patch or outside code.

    A stackable patch's override of a member that a stack holds joins it:
    the checks below that would refuse two patches on one member are not
    made for it (:func:`_joins` makes the stack's own).
    """
    reg.lingerers.sweep()
    _check_exclusive(reg, spec)
    joins = _joins(reg, spec, target, plan)
    owners = reg.owners.get(target, {})
    overridden = {name for name, _ in plan.overrides}
    originals = [ORIGINAL_PREFIX + name for name, _ in plan.overrides if name not in joins]
    for member in [*(name for name in spec.members if name not in joins), *originals]:
        other = owners.get(member)
        if other is not None:
            raise PatchConflictError(
                f"patch {spec.name!r} conflicts with applied patch {other!r}: both set "
                f"{target.__qualname__}.{member}. Roll {other!r} back first, or merge the two"
                + (_how_to_stack(reg, spec, other, member) if member in overridden else ".")
            )
    related = _sharing_instances(target)
    for original in [ORIGINAL_PREFIX + name for name, _ in plan.overrides]:
        if (
            original[len(ORIGINAL_PREFIX) :] not in joins
            and original in vars(target)
            and reg.lingerers.lingering(target, original) is None
        ):
            raise PatchConflictError(
                f"patch {spec.name!r}: {target.__qualname__} already has its own "
                f"{original!r}, not made by vllm-custom-patches; the original of "
                f"{original[len(ORIGINAL_PREFIX) :]!r} cannot be kept under that name."
            )
        # Two ``_original_x`` in the MRO of one instance (a base and a
        # subclass, or two sides of a diamond) make ``self._original_x``
        # inside one graft find the other's original: endless recursion.
        for klass in related:
            if original in vars(klass):
                lingering = reg.lingerers.lingering(klass, original)
                owner = reg.owners.get(klass, {}).get(original)
                stack = reg.stacks.get((klass, original[len(ORIGINAL_PREFIX) :]))
                if lingering is not None:
                    who = f"patch {lingering.patch!r}, rolled back and kept while calls into it finish"
                elif owner is not None:
                    who = f"applied patch {owner!r}"
                elif stack is not None:
                    who = f"the stack {stack.describe()}"
                else:
                    who = "code outside vllm-custom-patches"
                raise PatchConflictError(
                    f"patch {spec.name!r} cannot replace {target.__qualname__}."
                    f"{original[len(ORIGINAL_PREFIX) :]}: {klass.__qualname__}.{original} "
                    f"(set by {who}) is in the same class hierarchy (the MRO of the same "
                    f"instances), and self.{original} would resolve to the wrong original. "
                    f"Patch this member on one class of the hierarchy only."
                )
    for member, holder in plan.holders.items():
        if member in joins:
            continue
        # The original would be another patch's member (say, a helper it
        # added to a base class): the two would stack, and rolling that
        # patch back would leave this one calling its code.
        other = reg.owners.get(holder, {}).get(member)
        stack = reg.stacks.get((holder, member))
        if other is not None or stack is not None:
            who = f"applied patch {other!r}" if other is not None else f"the stack {stack.describe()}"  # type: ignore[union-attr]
            raise PatchConflictError(
                f"patch {spec.name!r} conflicts with {who}: it would keep "
                f"{holder.__qualname__}.{member}, which {who} set, as the original of "
                f"{target.__qualname__}.{member}, and the two would stack across classes. Roll it back "
                f"first, or patch {holder.__qualname__} instead (stackable patches of one class stack)."
            )


def _check_exclusive(reg: Registry, spec: PatchSpec) -> None:
    if not spec.exclusive:
        return
    for other, record in reg.applied.items():
        shared = sorted(spec.exclusive & record.patch._vcp_spec.exclusive)
        if shared:
            raise PatchConflictError(
                f"patch {spec.name!r} conflicts with applied patch {other!r}: both declare "
                f"exclusive={{{shared[0]!r}}}, and patches that share an exclusive token are never applied "
                f"together, whatever members they replace. Roll {other!r} back first."
            )


def _joins(reg: Registry, spec: PatchSpec, target: type, plan: Plan) -> set[str]:
    """The overrides that join a stack; refuses a patch that cannot stack with who holds its members."""
    joins: set[str] = set()
    owners = reg.owners.get(target, {})
    for name, _ in plan.overrides:
        stack = reg.stacks.get((target, name))
        if stack is None:
            other = owners.get(name)
            if spec.stackable and other is not None and name in reg.applied[other].overrides:
                raise PatchConflictError(
                    f"patch {spec.name!r} conflicts with applied patch {other!r}: both replace "
                    f"{target.__qualname__}.{name}, and {other!r} is not stackable. To stack them, declare "
                    f"{other!r} stackable=True too (its code calling original({name!r}) instead of "
                    f"self._original_{name}); or roll {other!r} back first."
                )
            continue
        if not spec.stackable:
            raise PatchConflictError(
                f"patch {spec.name!r} conflicts with the stack {stack.describe()}: {spec.name!r} is not "
                f"stackable. Declare it stackable=True (calling original({name!r}) instead of "
                f"self._original_{name}) to join the stack, or roll back "
                f"{', '.join(repr(layer.patch) for layer in stack.layers)} first."
            )
        original = ORIGINAL_PREFIX + name
        if vars(target).get(name, MISSING) is not stack.top_held or (
            vars(target).get(original, MISSING) is not stack.original_held
        ):
            raise PatchConflictError(
                f"patch {spec.name!r} cannot join the stack {stack.describe()}: {target.__qualname__}.{name} "
                f"or {original} was replaced since, by code outside vllm-custom-patches. Undo that change "
                f"first; nothing was applied."
            )
        joins.add(name)
    return joins


def _how_to_stack(reg: Registry, spec: PatchSpec, other: str, member: str) -> str:
    """The end of a same-member conflict message: how the two could stack instead."""
    record = reg.applied.get(other)
    if record is None or member not in record.overrides:
        return "."  # it added the member: nothing of the target's to stack on
    return (
        f", or let them stack: declare both stackable=True (order=N to choose which runs first) and "
        f"call the next layer with <Patch>.original({member!r}) instead of self._original_{member}."
    )


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
