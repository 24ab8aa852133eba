"""``VLLMPatch[Target]``: the class a patch author subclasses."""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from ._errors import PatchDefinitionError
from ._graft import MISSING, ORIGINAL_PREFIX, attribute_names, functions_of
from ._targets import TargetSpec, check_target_spec, target_label

if TYPE_CHECKING:
    from packaging.specifiers import SpecifierSet

__all__ = ["VLLMPatch"]

_T = TypeVar("_T")

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
# Bases whose members are never grafted: the framework's own and Python's.
_NEVER_GRAFTED: frozenset[type] = frozenset({object, Generic})  # VLLMPatch is added below
# The framework's own class-level API; a member of that name would shadow it.
_RESERVED = frozenset({"name", "apply", "rollback", "is_applied"})
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")


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


class _PatchMeta(type):
    """Records which names a patch's class body wrote, before ``type`` adds its own.

    ``type.__new__`` puts ``__hash__ = None`` into every class body that
    defines ``__eq__`` without ``__hash__``; grafting that would make every
    instance of the target unhashable.  Only what the author wrote is grafted.
    """

    def __new__(mcls, name: str, bases: tuple[type, ...], namespace: dict[str, Any], **kwargs: Any) -> _PatchMeta:
        namespace["_vcp_written"] = frozenset(namespace)
        return super().__new__(mcls, name, bases, namespace, **kwargs)


class VLLMPatch(Generic[_T], metaclass=_PatchMeta):
    """Base class of patches: ``class MyPatch(VLLMPatch[Target])``.

    Every member defined in the class body is grafted onto ``Target`` in place
    when the patch is applied.  Inside a grafted method ``self`` is the
    target's instance, zero-argument ``super()`` works as if the method were
    written in ``Target``, and each member that replaces one of ``Target``'s
    is reachable as ``self._original_<name>``.

    ``Target`` is a class, or a string ``"package.module:Qual.Name"`` that is
    imported only when the patch is applied.  The optional class attribute
    ``name`` names the patch (default: the class name); the docstring is its
    description.  The names ``name``, ``apply``, ``rollback`` and
    ``is_applied`` are the framework's and cannot be grafted.
    """

    name: ClassVar[str]
    _vcp_spec: ClassVar[PatchSpec]
    _vcp_gate: ClassVar[SpecifierSet | None] = None
    _vcp_target: ClassVar[TargetSpec]

    def __class_getitem__(cls, target: Any) -> Any:
        if cls is not VLLMPatch:
            raise PatchDefinitionError(
                f"{cls.__qualname__} is already bound to a target; subclass it without a subscript."
            )
        spec = check_target_spec(target)
        label = target.__qualname__ if isinstance(target, type) else target
        binding: type[VLLMPatch[Any]] = type(cls)(  # type: ignore[misc]
            f"VLLMPatch[{label}]",
            (cls,),
            {"__module__": cls.__module__, "_vcp_target": spec, "_vcp_binding": True},
        )
        return binding

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("_vcp_binding"):
            return
        if not hasattr(cls, "_vcp_target"):
            raise PatchDefinitionError(
                f"{cls.__qualname__} subclasses VLLMPatch without a target; write "
                f"'class {cls.__name__}(VLLMPatch[TargetClass])' or "
                f"'VLLMPatch[\"package.module:TargetClass\"]'."
            )
        cls._vcp_spec = _build_spec(cls)
        cls.name = cls._vcp_spec.name

        from ._manager import PatchManager

        PatchManager.register(cls)

    @classmethod
    def apply(cls) -> bool:
        """Apply this patch; ``True`` if it was applied now, ``False`` if it already was."""
        from ._manager import PatchManager

        return PatchManager.apply(cls)

    @classmethod
    def rollback(cls) -> bool:
        """Roll this patch back exactly; ``False`` if it was not applied."""
        from ._manager import PatchManager

        return PatchManager.rollback(cls)

    @classmethod
    def is_applied(cls) -> bool:
        """Whether this patch is applied now."""
        from ._manager import PatchManager

        return PatchManager.is_applied(cls)


_NEVER_GRAFTED |= {VLLMPatch}


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
        if key in written and key not in _CLASS_MACHINERY and not key.startswith("_vcp_") and key != "name"
    }


def _build_spec(cls: type[VLLMPatch[Any]]) -> PatchSpec:
    name = vars(cls).get("name", cls.__name__)
    if not isinstance(name, str) or not _NAME.fullmatch(name):
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
        if klass in _NEVER_GRAFTED or "_vcp_binding" in vars(klass):
            continue
        members.update(_written_members(klass, name))
    for key in members:
        if key in _RESERVED:
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
            raise PatchDefinitionError(
                f"patch {name!r} defines __slots__, which cannot be added to an existing class."
            )
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
        target=cls._vcp_target,
        members=members,
        original_refs=frozenset(refs),
        description=inspect.cleandoc(cls.__doc__) if cls.__doc__ else "",
    )
