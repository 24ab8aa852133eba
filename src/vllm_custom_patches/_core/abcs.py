"""Keeping ``abc``'s bookkeeping true when members come and go on a live class.

Python computes ``__abstractmethods__`` once, when a class statement runs, and
``ABCMeta`` caches every ``issubclass`` answer it gives, including the ones a
``__subclasshook__`` derived from the members a class had at the time
(``collections.abc.Sized`` asks for ``__len__``).  A patch changes members
after the fact, so both go stale unless refreshed here.
"""

from __future__ import annotations

import abc
from collections.abc import MutableMapping

from .graft import MISSING, ORIGINAL_PREFIX, descendants
from .log import logger

__all__ = ["refresh_abc_state"]


def refresh_abc_state(
    target: type, *, gained: bool, lost: bool, before: MutableMapping[type, object] | None = None
) -> dict[type, object]:
    """:func:`_refresh` that never raises: the members are already in place and recorded by then.

    A class that refuses the recomputed ``__abstractmethods__`` (a metaclass of
    its own) must not leave the ledger out of step with the target; what abc
    keeps is then only logged as possibly stale.
    """
    try:
        return _refresh(target, gained=gained, lost=lost, before=before)
    except Exception as exc:
        logger.warning("could not refresh abc's bookkeeping of %s: %r", target.__qualname__, exc)
        return {}


def _refresh(
    target: type, *, gained: bool, lost: bool, before: MutableMapping[type, object] | None = None
) -> dict[type, object]:
    """Bring ``abc``'s view of ``target``'s hierarchy up to date after members changed.

    ``__abstractmethods__`` of ``target`` and its subclasses is recomputed,
    parents first.  Returns, for each class whose set changed, the object it
    held before.  ``before`` is the registry's memory of each class's set as
    it was before any patch changed it: a class whose recomputed set equals
    the one remembered gets that very object back (and is forgotten), so
    rollbacks in any order leave ``vars()`` identical, not merely equal; a
    class changed for the first time is remembered.

    Then the caches: always those of ABCs in the hierarchy itself (cheap).
    ``gained``: a member became available (an addition, or a ``None``
    replaced), so a cached "no" may now be wrong: every negative cache is
    invalidated, which ``ABCMeta.register`` does process-wide.  ``lost``: a
    member went away (an addition removed, or a member set to ``None``), so a
    cached "yes" of any ABC in the process (``Sized`` asked for ``__len__``)
    may be wrong: that walks every class, about 12 ms with vLLM imported, so
    only then.
    """
    hierarchy = descendants(target)
    changed: dict[type, object] = {}
    # A parent's set feeds its children's, so parents go first; a class's MRO
    # is always longer than any of its bases'.  Classes without their own
    # __abstractmethods__ are no ABCs: Python never made them abstract.
    abcs = [cls for cls in hierarchy if "__abstractmethods__" in vars(cls)]
    for cls in sorted(abcs, key=lambda klass: len(klass.__mro__)):
        current = vars(cls)["__abstractmethods__"]
        new = _abstract_names(cls)
        if new == current:
            continue
        recorded = before.get(cls, MISSING) if before is not None else MISSING
        if recorded is not MISSING and recorded == new:
            cls.__abstractmethods__ = recorded  # type: ignore[attr-defined]
            del before[cls]  # type: ignore[union-attr]
        else:
            cls.__abstractmethods__ = new  # type: ignore[attr-defined]
            if before is not None and recorded is MISSING:
                before[cls] = current
        changed[cls] = current
    for cls in (*target.__mro__[1:], *hierarchy):
        if isinstance(cls, abc.ABCMeta):
            cls._abc_caches_clear()  # type: ignore[attr-defined]
    if gained:
        # A throw-away registration bumps abc's invalidation counter, which
        # makes every negative cache stale: the documented effect of register().
        _Invalidator.register(type("_Invalidation", (), {}))
    if lost:
        for cls in descendants(object):
            if isinstance(cls, abc.ABCMeta):
                cls._abc_caches_clear()  # type: ignore[attr-defined]
    return changed


class _Invalidator(abc.ABC):  # noqa: B024 - an ABC only for its register(): nothing is abstract
    """Registers throw-away classes only to invalidate negative caches."""


def _abstract_names(cls: type) -> frozenset[str]:
    # What abc.update_abstractmethods computes, without setting it, and
    # leaving out kept originals: an abstract method a patch implements is
    # kept as ``_original_x``, and is no longer what the class offers.
    names = {
        name
        for name, value in vars(cls).items()
        if getattr(value, "__isabstractmethod__", False) and not name.startswith(ORIGINAL_PREFIX)
    }
    for base in cls.__bases__:
        for name in getattr(base, "__abstractmethods__", ()):
            if getattr(getattr(cls, name, None), "__isabstractmethod__", False):
                names.add(name)
    return frozenset(names)
