"""The kind of a class member, which decides how it is called, and the rule that a patch keeps it.

A plain ``def`` is a method: reached through an instance it gets the instance
as its first argument.  A ``@staticmethod`` gets no such argument, a
``@classmethod`` gets the class, a ``@property`` is not called at all but
read.  A patch that replaces one kind with another keeps the name but breaks
every caller (``TypeError`` on the first call, or a bound method where vLLM
expects a number), and a signature comparison cannot see it.  So apply refuses
it (``_planning``) and ``doctor`` reports it (``_doctor``), with one rule,
:func:`kind_change`, unless the patch marks the member with
:func:`changes_kind`.

The installed view and the patch classify raw class-dict objects
(:func:`member_kind`); the static view classifies what the source says
(:func:`static_kind`).  Where the kind cannot be known (``None``) nothing is
judged.
"""

from __future__ import annotations

import ast
import functools
import types
from typing import Any, Final, TypeVar

from .graft import functions_of

__all__ = [
    "CLASS",
    "METHOD",
    "PROPERTY",
    "STATIC",
    "VALUE",
    "changes_kind",
    "describe_change",
    "describe_kind",
    "is_kind_change_marked",
    "kind_change",
    "member_kind",
    "static_kind",
]

METHOD: Final = "method"
STATIC: Final = "static method"
CLASS: Final = "class method"
PROPERTY: Final = "property"
VALUE: Final = "plain attribute"

_ARTICLE = {METHOD: "a plain method (def)", STATIC: "a @staticmethod", CLASS: "a @classmethod",
            PROPERTY: "a property (or other data descriptor)", VALUE: "a plain attribute (not a descriptor)"}  # fmt: skip

MARK: Final = "__vllm_custom_patches_changes_kind__"

# Objects that bind the instance on access, as a function does.
_METHODS: tuple[type, ...] = (
    types.FunctionType,
    types.WrapperDescriptorType,
    types.MethodDescriptorType,
    functools.partialmethod,
    functools.singledispatchmethod,
    type(functools.lru_cache(lambda: None)),
)
# Type's own implicit conversions in a class body.
_IMPLICIT = {"__new__": STATIC, "__init_subclass__": CLASS, "__class_getitem__": CLASS}

_M = TypeVar("_M")


def changes_kind(member: _M) -> _M:
    """Mark a patch member as meant to change the kind of the member it replaces.

    Use it above (or below) ``@staticmethod``, ``@classmethod`` or
    ``@property`` when the patch really changes how the member is called,
    and every caller of it (vLLM's included) calls it the new way::

        class Fix(VLLMPatch[Target]):
            @changes_kind
            def helper(self, x):  # Target.helper is a @staticmethod
                ...

    Without it, apply refuses a member whose kind differs from the
    original's (``PatchTargetError``) and ``doctor`` reports it as an error.
    A plain value (not a function, static or class method, or property)
    cannot be marked.
    """
    from .errors import PatchDefinitionError

    try:
        setattr(member, MARK, True)
        return member
    except (AttributeError, TypeError):  # a property has no __dict__: mark its accessors
        pass
    functions = list(functions_of(member))
    if not functions:
        raise PatchDefinitionError(
            f"@changes_kind marks functions, static and class methods and properties; "
            f"{type(member).__name__} {member!r} is none of them."
        )
    for func in functions:
        setattr(func, MARK, True)
    return member


def is_kind_change_marked(member: object) -> bool:
    if getattr(member, MARK, False) is True:
        return True
    return any(getattr(func, MARK, False) is True for func in functions_of(member))


def member_kind(raw: object, name: str) -> str | None:
    """The kind of ``raw``, an object as a class's ``__dict__`` holds it under ``name``; ``None``: not judged.

    ``None`` itself (``__hash__ = None`` blocks a protocol: nothing calls it)
    and descriptors of unknown behaviour are not judged.
    """
    if raw is None:
        return None
    if isinstance(raw, staticmethod):
        return STATIC
    if isinstance(raw, (classmethod, types.ClassMethodDescriptorType)):
        return CLASS
    if isinstance(raw, (property, functools.cached_property)):
        return PROPERTY
    if isinstance(raw, types.BuiltinFunctionType) and name == "__new__":
        return STATIC  # a C type's __new__, as its class dict holds it
    if isinstance(raw, _METHODS):
        return METHOD
    kind = type(raw)
    if hasattr(kind, "__set__") or hasattr(kind, "__delete__"):
        return PROPERTY
    if hasattr(kind, "__get__"):
        return None  # a descriptor of its own: how it is called is its business
    return VALUE


def static_kind(kind: str, node: ast.AST, name: str) -> str | None:
    """The kind of a member read from source (``_static``'s kind and node); ``None``: cannot tell."""
    if kind in ("function", "async function"):
        return _IMPLICIT.get(name, METHOD)
    if kind == "staticmethod":
        return STATIC
    if kind == "classmethod":
        return CLASS
    if kind == "property":
        return PROPERTY
    value = getattr(node, "value", None) if isinstance(node, (ast.Assign, ast.AnnAssign)) else None
    if value is None or (isinstance(value, ast.Constant) and value.value is None):
        return None
    if isinstance(value, ast.Call):
        func = value.func
        called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        return {"staticmethod": STATIC, "classmethod": CLASS, "property": PROPERTY, "cached_property": PROPERTY}.get(
            called
        )
    if isinstance(value, ast.Lambda):
        return METHOD
    literals = (ast.Constant, ast.JoinedStr, ast.List, ast.Tuple, ast.Set, ast.Dict, ast.ListComp, ast.SetComp,
                ast.DictComp, ast.BinOp, ast.UnaryOp)  # fmt: skip
    return VALUE if isinstance(value, literals) else None


def kind_change(original_kind: str | None, member: Any, name: str) -> tuple[str, str] | None:
    """``(the original's kind, the patch member's kind)`` if they differ and the member is not marked; else ``None``."""
    mine = member_kind(member, name)
    if original_kind is None or mine is None or mine == original_kind or is_kind_change_marked(member):
        return None
    return original_kind, mine


def describe_change(name: str, where: str, change: tuple[str, str]) -> str:
    """One message for apply and doctor: what changes, why it breaks, and the two fixes."""
    original, mine = change
    return (
        f"{name!r} is {_ARTICLE[mine]} in the patch but {_ARTICLE[original]} in {where}: "
        f"callers use it as {_ARTICLE[original]}, so each call would fail or get the wrong arguments. "
        f"Write it as {_ARTICLE[original]}, or mark it @changes_kind if every caller calls it the new way."
    )


def describe_kind(kind: str) -> str:
    return _ARTICLE[kind]
