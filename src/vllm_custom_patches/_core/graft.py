"""The mechanics of putting members on a live class and taking them off again.

Everything here works on a class's own ``__dict__``: what the class holds
itself is recorded raw (descriptors intact) and put back with the same
identity; what it only inherited is deleted again, so lookups fall through to
the base class exactly as before.
"""

from __future__ import annotations

import contextlib
import dis
import functools
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

MISSING: Final = object()
"""Marks a name that the target's own ``__dict__`` did not hold."""

ORIGINAL_PREFIX: Final = "_original_"


def mro_lookup(cls: type, name: str) -> tuple[type, object] | None:
    """The class whose ``__dict__`` defines ``name`` first in the MRO, and the raw object.

    Unlike ``getattr`` this never runs the descriptor protocol, so a
    staticmethod, classmethod or property comes back as itself.
    """
    for klass in cls.__mro__:
        namespace = vars(klass)
        if name in namespace:
            return klass, namespace[name]
    return None


def descendants(cls: type) -> list[type]:
    """``cls`` and every class that inherits from it, each once, ``cls`` first."""
    seen: dict[type, None] = {cls: None}
    stack = [cls]
    while stack:
        subclasses: list[type] = type.__subclasses__(stack.pop())
        for sub in subclasses:
            if sub not in seen:
                seen[sub] = None
                stack.append(sub)
    return list(seen)


def functions_of(member: object) -> Iterator[types.FunctionType]:
    """The plain functions a member is made of (a property has up to three)."""
    if isinstance(member, (staticmethod, classmethod)):
        member = member.__func__
    if isinstance(member, types.FunctionType):
        yield member
    elif isinstance(member, property):
        for accessor in (member.fget, member.fset, member.fdel):
            if isinstance(accessor, types.FunctionType):
                yield accessor
    elif isinstance(member, functools.cached_property) and isinstance(member.func, types.FunctionType):
        yield member.func


# Instructions whose argument is an attribute name.  ``co_names`` alone would
# also hold globals: a module-level ``_original_x`` is not an attribute use.
_ATTRIBUTE_OPS: Final = frozenset({"LOAD_ATTR", "LOAD_METHOD", "STORE_ATTR", "DELETE_ATTR", "LOAD_SUPER_ATTR"})


def attribute_names(code: types.CodeType) -> Iterator[str]:
    """Every attribute name that a code object (or code nested in it) reads, writes or deletes."""
    for nested in code_objects(code):
        for instruction in dis.get_instructions(nested):
            if instruction.opname in _ATTRIBUTE_OPS:
                yield instruction.argval


def code_objects(code: types.CodeType) -> Iterator[types.CodeType]:
    """``code`` and every code object nested in it (inner functions, lambdas, comprehensions)."""
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from code_objects(const)


def is_override_marked(member: object) -> bool:
    """True if ``@typing.override`` (PEP 698) marks the member or a function inside it."""
    if getattr(member, "__override__", False):
        return True
    return any(getattr(func, "__override__", False) for func in functions_of(member))


def rebind(member: object, owner: type) -> object:
    """``member`` with zero-argument ``super()`` resolving as if written in ``owner``.

    The compiler gives every method that uses ``super()`` or ``__class__`` a
    closure cell holding the class whose body defined it -- here the patch
    class.  A copy of the function whose cell holds the target makes
    ``super()`` walk the target's MRO.  Members without such a cell are
    returned as they are, so identity is kept where nothing needs changing.
    """
    if isinstance(member, types.FunctionType):
        return _with_class_cell(member, owner)
    if isinstance(member, (staticmethod, classmethod)):
        func = member.__func__
        new_func = rebind(func, owner)
        if new_func is func:
            return member
        wrapper = type(member)(new_func)  # type: ignore[arg-type]
        _copy_instance_dict(member, wrapper)
        return wrapper
    if type(member) is property:
        accessors = [rebind(f, owner) if f is not None else None for f in (member.fget, member.fset, member.fdel)]
        if all(new is old for new, old in zip(accessors, (member.fget, member.fset, member.fdel), strict=True)):
            return member
        return property(*accessors, member.__doc__)  # type: ignore[arg-type,call-arg]
    if type(member) is functools.cached_property:
        new_func = rebind(member.func, owner)
        if new_func is member.func:
            return member
        copy: functools.cached_property[Any] = functools.cached_property(new_func)  # type: ignore[arg-type]
        copy.__doc__ = member.__doc__
        return copy
    return member


def _with_class_cell(func: types.FunctionType, owner: type) -> types.FunctionType:
    code = func.__code__
    if "__class__" not in code.co_freevars or func.__closure__ is None:
        return func
    closure = list(func.__closure__)
    closure[code.co_freevars.index("__class__")] = types.CellType(owner)
    # Other cells are shared, not copied: they are the same variables.
    new = types.FunctionType(code, func.__globals__, func.__name__, func.__defaults__, tuple(closure))
    new.__kwdefaults__ = dict(func.__kwdefaults__) if func.__kwdefaults__ else None
    new.__qualname__ = func.__qualname__
    new.__doc__ = func.__doc__
    new.__module__ = func.__module__
    new.__annotations__ = dict(func.__annotations__)
    new.__dict__.update(func.__dict__)
    return new


def _copy_instance_dict(source: object, dest: object) -> None:
    with contextlib.suppress(TypeError):  # objects without a __dict__ carry nothing to copy
        vars(dest).update(vars(source))


@dataclass(frozen=True)
class Change:
    """One name set on a target, and what its own ``__dict__`` held before."""

    name: str
    old: object  # MISSING if the name was not in the target's own __dict__
    new: object


class Transaction:
    """Sets names on one class and can undo all of them, last first."""

    def __init__(self, target: type) -> None:
        self.target = target
        self.changes: list[Change] = []

    def set(self, name: str, value: object, *, set_name: bool = True, absent_before: bool = False) -> None:
        """Set ``name`` on the target.

        ``set_name=False`` for an original kept under a new name;
        ``absent_before=True`` to record the name as not held before (an
        original lingering from a rollback, which this set takes over).
        """
        old = MISSING if absent_before else vars(self.target).get(name, MISSING)
        # Recorded before the set: a metaclass __setattr__ may store the value
        # and then raise, and undo must still take it off.
        self.changes.append(Change(name, old, value))
        setattr(self.target, name, value)
        # What rollback must find there later is what the class really holds
        # (a metaclass may store something other than ``value``).
        self.changes[-1] = Change(name, old, vars(self.target).get(name, MISSING))
        hook = getattr(type(value), "__set_name__", None) if set_name else None
        if hook is not None:
            # What the class statement does for a descriptor; cached_property
            # and friends learn their attribute name and owner here.  Never for
            # a kept original: it already serves its own name (``x``), and
            # renaming it to ``_original_x`` would make it read other storage,
            # and stay renamed after rollback.
            hook(value, self.target, name)

    def undo(self) -> list[BaseException]:
        """Undo every change, last first; return the errors of those that could not be undone."""
        errors: list[BaseException] = []
        for change in reversed(self.changes):
            try:
                restore(self.target, change)
            except Exception as exc:  # keep undoing the rest; report all
                errors.append(exc)
        self.changes.clear()
        return errors


def restore(target: type, change: Change) -> None:
    """Put back what ``target``'s own ``__dict__`` held before ``change``."""
    try:
        _restore_with(target, change, setattr, delattr)
    except Exception:
        # A metaclass that refuses the name must not keep the target patched:
        # type's own slots bypass its __setattr__/__delattr__.
        _restore_with(target, change, type.__setattr__, type.__delattr__)


def _restore_with(target: type, change: Change, set_: Any, del_: Any) -> None:
    if change.old is not MISSING:
        if vars(target).get(change.name, MISSING) is not change.old:
            set_(target, change.name, change.old)
    elif change.name in vars(target):
        del_(target, change.name)
