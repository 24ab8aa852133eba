"""Planning an apply: how a patch meets its target, and whether it may.

Nothing is changed here; the ledger grafts what the plan says once the
checks have passed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import PatchConflictError, PatchTargetError
from .graft import ORIGINAL_PREFIX, descendants, is_override_marked, mro_lookup
from .kinds import describe_change, kind_change, member_kind
from .registry import Registry
from .spec import PatchSpec

__all__ = ["Plan", "check_conflicts", "plan_apply"]


@dataclass
class Plan:
    """How a patch's members meet its target: which replace a member, which are new."""

    overrides: list[tuple[str, object]] = field(default_factory=list)  # (name, raw original)
    holders: dict[str, type] = field(default_factory=dict)  # override -> class whose __dict__ holds the original
    additions: list[str] = field(default_factory=list)


def plan_apply(spec: PatchSpec, target: type) -> Plan:
    """Where each member of the patch meets ``target``; refuses what cannot be rolled back exactly,
    and a member whose kind (method, static or class method, property, plain attribute) differs
    from the original's unless the patch marks it ``@changes_kind``."""
    plan = Plan()
    for name, member in spec.members.items():
        found = mro_lookup(target, name)
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
    """Raise :class:`PatchConflictError` if applying ``plan`` would clash with an applied patch or outside code."""
    reg.lingerers.sweep()
    owners = reg.owners.get(target, {})
    originals = [ORIGINAL_PREFIX + name for name, _ in plan.overrides]
    for member in [*spec.members, *originals]:
        other = owners.get(member)
        if other is not None:
            raise PatchConflictError(
                f"patch {spec.name!r} conflicts with applied patch {other!r}: both set "
                f"{target.__qualname__}.{member}. Roll {other!r} back first, or merge the two."
            )
    related = _sharing_instances(target)
    for original in originals:
        if original in vars(target) and reg.lingerers.lingering(target, original) is None:
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
                if lingering is not None:
                    who = f"patch {lingering.patch!r}, rolled back and kept while calls into it finish"
                elif owner is not None:
                    who = f"applied patch {owner!r}"
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
        # The original would be another patch's member (say, a helper it
        # added to a base class): the two would stack, and rolling that
        # patch back would leave this one calling its code.
        other = reg.owners.get(holder, {}).get(member)
        if other is not None:
            raise PatchConflictError(
                f"patch {spec.name!r} conflicts with applied patch {other!r}: it would keep "
                f"{holder.__qualname__}.{member}, which {other!r} set, as the original of "
                f"{target.__qualname__}.{member}, and the two would stack. Roll {other!r} back "
                f"first, or merge the two."
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
