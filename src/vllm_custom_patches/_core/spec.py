"""What a patch class declares: worked out once, when its class statement runs.

Nothing here knows the patch class itself or the manager: the spec is plain
data that the ledger plans and grafts from, and the version gates check.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from .errors import PatchDefinitionError, PatchTargetError
from .graft import MISSING, ORIGINAL_PREFIX, attribute_names, functions_of
from .targets import TargetSpec, target_label

if TYPE_CHECKING:
    from packaging.specifiers import SpecifierSet

__all__ = [
    "HOOKS",
    "PATCH_NAME",
    "RESERVED",
    "Composition",
    "Originals",
    "PatchLike",
    "PatchSpec",
    "build_spec",
    "composition",
    "unknown_keywords",
]

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
# What an exclusive token may be: printable, no spaces, so that it reads well in a message.
_TOKEN = re.compile(r"[^\s]+")
_KEYWORDS = ("stackable", "order", "exclusive")


@dataclass(frozen=True)
class Composition:
    """How a patch composes with others: the class keywords ``stackable``, ``order``, ``exclusive``."""

    stackable: bool = False
    """Its overrides join a stack with other stackable patches' overrides of the same members."""
    order: int = 0
    """Its place in a stack: higher is outer (called first); ties go by name, the first name outer."""
    exclusive: frozenset[str] = frozenset()
    """Tokens no other applied patch may declare too, whatever members it replaces."""


def composition(cls: type, keywords: dict[str, Any], inherited: Composition) -> Composition:
    """The composition ``class cls(VLLMPatch[...], **keywords)`` declares; what it does not say is ``inherited``.

    Raises :class:`PatchDefinitionError` naming the keyword, what it got and what to write.
    """
    where = cls.__qualname__
    stackable = keywords.get("stackable", inherited.stackable)
    if not isinstance(stackable, bool):
        raise PatchDefinitionError(
            f"{where}: stackable={stackable!r} must be True or False; "
            f"write 'class {cls.__name__}(VLLMPatch[...], stackable=True)'."
        )
    order = keywords.get("order", inherited.order)
    if isinstance(order, bool) or not isinstance(order, int):
        raise PatchDefinitionError(
            f"{where}: order={order!r} must be an int (higher is outer in a stack, default 0); write order=10."
        )
    if "order" in keywords and not stackable:
        raise PatchDefinitionError(
            f"{where}: order={order!r} places a patch in a stack, but {cls.__name__} is not stackable; "
            f"add stackable=True, or drop order."
        )
    tokens = keywords.get("exclusive", inherited.exclusive)
    if isinstance(tokens, (str, bytes)) or not isinstance(tokens, (set, frozenset, list, tuple)):
        raise PatchDefinitionError(
            f"{where}: exclusive={tokens!r} must be a set of strings; write exclusive={{{str(tokens)!r}}}."
            if isinstance(tokens, str)
            else f"{where}: exclusive={tokens!r} must be a set of strings, such as exclusive={{'queue-sort'}}."
        )
    for token in tokens:
        if not isinstance(token, str) or not _TOKEN.fullmatch(token):
            raise PatchDefinitionError(
                f"{where}: exclusive token {token!r} must be a non-empty string without spaces, such as 'queue-sort'."
            )
    return Composition(stackable=stackable, order=order, exclusive=frozenset(tokens))


def unknown_keywords(cls: type, keywords: dict[str, Any]) -> PatchDefinitionError:
    """The error for class keywords that neither VLLMPatch nor a base class takes."""
    listed = ", ".join(repr(key) for key in keywords)
    return PatchDefinitionError(
        f"{cls.__qualname__}: unknown class keyword(s) {listed}; a patch class takes "
        f"{', '.join(key + '=' for key in _KEYWORDS)} (class P(VLLMPatch[Target], stackable=True, order=10))."
    )


@dataclass(frozen=True)
class PatchSpec:
    """What a patch class declares, worked out once when the class is defined."""

    name: str
    target: TargetSpec
    members: dict[str, object]
    original_refs: frozenset[str]
    """Names ``x`` whose ``_original_x`` the members' code refers to."""
    description: str
    composition: Composition = Composition()

    @property
    def stackable(self) -> bool:
        return self.composition.stackable

    @property
    def order(self) -> int:
        return self.composition.order

    @property
    def exclusive(self) -> frozenset[str]:
        return self.composition.exclusive

    @property
    def target_label(self) -> str:
        return target_label(self.target)


class Originals(dict[str, object]):
    """A patch class's ``original()`` table: member -> what the member's next layer inward gives.

    Made with the class; ``P.original`` is its ``__getitem__`` (see ``stacks``).
    A stackable patch's members are entries: the next layer, vLLM's original
    for the innermost (a C-level dict hit).  A patch that is not stackable has
    no entries: its members are read from the target's ``_original_<name>`` at
    each call (``through``, on a miss), as ``getattr(Target,
    "_original_<name>")`` gives it, what its ``original()`` has always been (a
    test that stands in for vLLM's original by setting
    ``Target._original_<name>`` still reaches its stand-in).  The ledger keeps
    both current under the registry's lock.
    """

    __slots__ = ("additions", "members", "patch", "target", "through")

    def __init__(self, patch: str, members: tuple[str, ...]) -> None:
        super().__init__()
        self.patch = patch
        self.members = members
        self.additions: tuple[str, ...] | None = None
        """The members the applied patch added to its target; ``None`` while it is not applied."""
        self.target: type | None = None
        self.through: dict[str, str] = {}
        """Member -> the target's attribute holding vLLM's original, for the members read from the target."""

    def link(self, member: str, value: object) -> None:
        """``original(member)`` gives ``value`` (the next layer): the entry first, so no reader misses both."""
        self[member] = value
        self.through.pop(member, None)

    def link_through(self, member: str, target: type) -> None:
        """``original(member)`` reads the target's ``_original_<member>`` at each call."""
        self.target = target
        self.through[member] = ORIGINAL_PREFIX + member
        self.pop(member, None)

    def forget(self, member: str) -> None:
        self.pop(member, None)
        self.through.pop(member, None)

    def state(self, member: str) -> tuple[object, str | None]:
        return self.get(member, MISSING), self.through.get(member)

    def restore(self, member: str, state: tuple[object, str | None]) -> None:
        value, through = state
        if through is not None:
            self.through[member] = through
        else:
            self.through.pop(member, None)
        if value is MISSING:
            self.pop(member, None)
        else:
            self[member] = value

    def __missing__(self, member: object) -> object:
        name = self.through.get(member) if isinstance(member, str) else None
        if name is not None:
            try:
                return getattr(self.target, name)
            except AttributeError:
                raise PatchTargetError(
                    f"patch {self.patch!r}: the original of {member!r} is gone from "
                    f"{getattr(self.target, '__qualname__', '?')}.{name} (removed by code outside the patch)."
                ) from None
        if member not in self.members:
            raise PatchTargetError(
                f"patch {self.patch!r} does not replace {member!r}; original() gives the next layer "
                f"only of the members it defines ({', '.join(self.members) or 'none'})."
            )
        if self.additions is not None and member in self.additions:
            raise PatchTargetError(
                f"patch {self.patch!r} adds {member!r}, which its target did not have; there is no original of it."
            )
        raise PatchTargetError(f"patch {self.patch!r} is not applied, so the original of {member!r} is not kept.")

    def __repr__(self) -> str:
        return f"<original() of patch {self.patch!r}: {dict.__repr__(self)}, through the target: {self.through}>"


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
    _vcp_originals: ClassVar[Originals]

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


def build_spec(cls: type, never_grafted: frozenset[type], composed: Composition = Composition()) -> PatchSpec:
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
                if composed.stackable:
                    # In a stack the target's one _original_x is vLLM's: a layer
                    # reaching it would skip every layer inward of it.
                    raise PatchDefinitionError(
                        f"patch {name!r} is stackable, but {key!r} uses self.{used}, which would "
                        f"skip the layers inward of it; call the next layer with "
                        f"{cls.__name__}.original({original!r})(self, ...) instead."
                    )
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
        composition=composed,
    )
