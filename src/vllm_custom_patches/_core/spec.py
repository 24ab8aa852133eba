"""What a patch class declares: worked out once, when its class statement runs.

Nothing here knows the patch class itself or the manager: the spec is plain
data that the ledger plans and grafts from, and the version gates check.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from .errors import PatchDefinitionError
from .graft import MISSING, ORIGINAL_PREFIX, attribute_names, functions_of
from .targets import TargetSpec, target_label

if TYPE_CHECKING:
    from packaging.specifiers import SpecifierSet

__all__ = ["HOOKS", "PATCH_NAME", "RESERVED", "PatchLike", "PatchSpec", "build_spec"]

# Entries Python itself puts in a class namespace; never grafted.
_CLASS_MACHINERY = frozenset(
    {
        "__module__",
        "__qualname__",
        "__doc__",
        "__dict__",
        "__weakref__",
        "__annotations__",
        "__orig_bases__",
        "__parameters__",
        "__firstlineno__",
        "__static_attributes__",
        "__type_params__",
        "__abstractmethods__",
        "_abc_impl",
    }
)
# The framework's own class-level API; a member of that name would shadow it.
RESERVED = frozenset({"name", "apply", "rollback", "is_applied", "original"})
# Class methods a patch may define for the framework to call; never grafted.
HOOKS = frozenset({"check_live"})
PATCH_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")


@dataclass(frozen=True)
class PatchSpec:
    """What a patch class declares, worked out once when the class is defined."""

    name: str
    target: TargetSpec
    members: dict[str, object]
    original_refs: frozenset[str]
    """Names ``x`` whose ``_original_x`` the members' code refers to."""
    description: str

    @property
    def target_label(self) -> str:
        return target_label(self.target)


class PatchLike(Protocol):
    """What the registry, the ledger and the gates need of a patch class.

    ``VLLMPatch`` subclasses are the only implementations; naming this
    protocol (as ``type[PatchLike]``) instead of ``VLLMPatch`` keeps the
    modules ``VLLMPatch`` is built on from depending back on it, not even
    for type checking.
    """

    _vcp_spec: ClassVar[PatchSpec]
    _vcp_checks_live: ClassVar[bool]
    _vcp_gate: ClassVar[SpecifierSet | None]

    @classmethod
    def check_live(cls, instance: Any) -> None: ...


def _written_members(klass: type, name: str) -> dict[str, object]:
    """The members ``klass``'s class body wrote, as they will be grafted."""
    namespace = vars(klass)
    written = namespace.get("_vcp_written")
    if written is None:
        # A plain mixin: Python's implicit ``__hash__ = None`` (a body that
        # defines ``__eq__`` without ``__hash__``) cannot be told from a
        # written one, so it is taken as implicit.
        implicit = {"__hash__"} if "__eq__" in namespace and namespace.get("__hash__", MISSING) is None else set()
        slots = namespace.get("__slots__", ())
        if slots not in ((), []):
            raise PatchDefinitionError(
                f"patch {name!r}: its base {klass.__qualname__} declares __slots__ = {slots!r}, "
                f"which cannot be added to an existing class; drop __slots__ from the mixin "
                f"or set '__slots__ = ()'."
            )
        written = namespace.keys() - implicit - {"__slots__"}
    return {
        key: value
        for key, value in namespace.items()
        if key in written
        and key not in _CLASS_MACHINERY
        and not key.startswith("_vcp_")
        and key != "name"
        and key not in HOOKS
    }


def build_spec(cls: type, never_grafted: frozenset[type]) -> PatchSpec:
    """The spec of patch class ``cls``; members of ``never_grafted`` bases (and bindings) are left out."""
    name = vars(cls).get("name", cls.__name__)
    if not isinstance(name, str) or not PATCH_NAME.fullmatch(name):
        raise PatchDefinitionError(
            f"{cls.__qualname__}: patch name {name!r} must start with a letter or "
            f"'_' and hold only letters, digits, '_' and '.', so that it can be "
            f"listed in VLLM_CUSTOM_PATCHES."
        )
    members: dict[str, object] = {}
    # Base classes first, so a subclass's body wins, as in normal inheritance:
    # base patch classes and plain mixins alike (a mixin's helpers are what
    # the patch's methods call on ``self``).
    for klass in reversed(cls.__mro__):
        if klass in never_grafted or "_vcp_binding" in vars(klass):
            continue
        members.update(_written_members(klass, name))
        for hook in HOOKS & vars(klass).keys():
            if not isinstance(vars(klass)[hook], classmethod):
                raise PatchDefinitionError(
                    f"patch {name!r}: {klass.__qualname__}.{hook} is the framework's hook and must be a "
                    f"class method: write '@classmethod' above 'def {hook}(cls, instance)'."
                )
    for key in members:
        if key in RESERVED:
            raise PatchDefinitionError(
                f"patch {name!r} defines {key!r}, which is VLLMPatch's own API "
                f"({cls.__qualname__}.{key}) and cannot be grafted."
            )
        if key.startswith(ORIGINAL_PREFIX):
            raise PatchDefinitionError(
                f"patch {name!r} defines {key!r}; names starting with "
                f"{ORIGINAL_PREFIX!r} are made by the framework to hold originals."
            )
        if key == "__slots__":
            raise PatchDefinitionError(f"patch {name!r} defines __slots__, which cannot be added to an existing class.")
    refs: set[str] = set()
    for key, value in members.items():
        for func in functions_of(value):
            for used in attribute_names(func.__code__):
                original = used[len(ORIGINAL_PREFIX) :]
                if not used.startswith(ORIGINAL_PREFIX) or not original:
                    continue
                if original not in members:
                    raise PatchDefinitionError(
                        f"patch {name!r}: {key!r} uses self.{used} but the patch does "
                        f"not define {original!r}; an original is only kept for a "
                        f"member the patch replaces."
                    )
                refs.add(original)
    return PatchSpec(
        name=name,
        target=cls._vcp_target,  # type: ignore[attr-defined]
        members=members,
        original_refs=frozenset(refs),
        description=inspect.cleandoc(cls.__doc__) if cls.__doc__ else "",
    )
