"""``VLLMPatch[Target]``: the class a patch author subclasses."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from . import ledger as _ledger
from .errors import PatchDefinitionError, PatchTargetError
from .registry import REGISTRY
from .spec import Composition, Originals, PatchSpec, build_spec, composition, unknown_keywords
from .targets import TargetSpec, check_target_spec
from .typed import TypedAs

if TYPE_CHECKING:
    from packaging.specifiers import SpecifierSet

__all__ = ["VLLMPatch"]

_T = TypeVar("_T")


class _PatchMeta(type):
    """Records which names a patch's class body wrote, before ``type`` adds its own.

    ``type.__new__`` puts ``__hash__ = None`` into every class body that
    defines ``__eq__`` without ``__hash__``; grafting that would make every
    instance of the target unhashable.  Only what the author wrote is grafted.
    """

    def __new__(mcls, name: str, bases: tuple[type, ...], namespace: dict[str, Any], **kwargs: Any) -> _PatchMeta:
        namespace["_vcp_written"] = frozenset(namespace)
        return super().__new__(mcls, name, bases, namespace, **kwargs)


if TYPE_CHECKING:
    # Type checkers see type as the metaclass: a patch typed as its target
    # (``TypedAs[Target]``) then passes their metaclass check whatever the
    # target's metaclass (vLLM's schedulers are ABCs).  _PatchMeta adds
    # nothing a type checker could use.
    _Meta = type
else:
    _Meta = _PatchMeta


class VLLMPatch(Generic[_T], metaclass=_Meta):
    """Base class of patches: ``class MyPatch(VLLMPatch[Target])``.

    Every member defined in the class body is grafted onto ``Target`` in place
    when the patch is applied.  Inside a grafted method ``self`` is the
    target's instance, zero-argument ``super()`` works as if the method were
    written in ``Target``, and each member that replaces one of ``Target``'s
    is reachable as ``self._original_<name>`` (or, whatever ``self`` is, as
    ``MyPatch.original("<name>")``).

    Class keywords say how the patch composes with others:
    ``stackable=True`` lets several patches replace one member, each a layer
    of a stack that calls the next with ``MyPatch.original("<name>")``;
    ``order=N`` (default 0) places it (higher is outer; ties go by name);
    ``exclusive={"token", ...}`` refuses any other applied patch that declares
    one of the tokens, whatever it replaces.

    ``Target`` is a class, or a string ``"package.module:Qual.Name"`` that is
    imported only when the patch is applied.  The optional class attribute
    ``name`` names the patch (default: the class name); the docstring is its
    description.  The names ``name``, ``apply``, ``rollback``, ``is_applied``
    and ``original`` are the framework's and cannot be grafted.  The class
    method ``check_live``, if the patch defines it, is its live check (see
    :meth:`check_live`) and is not grafted either.
    """

    name: ClassVar[str]
    _vcp_spec: ClassVar[PatchSpec]
    _vcp_checks_live: ClassVar[bool] = False
    _vcp_gate: ClassVar[SpecifierSet | None] = None
    _vcp_target: ClassVar[TargetSpec]
    _vcp_originals: ClassVar[Originals]

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
        keywords: dict[str, Any] = {
            key: kwargs.pop(key) for key in ("stackable", "order", "exclusive") if key in kwargs
        }
        try:
            super().__init_subclass__(**kwargs)
        except TypeError:
            if kwargs:  # object.__init_subclass__: no base class took them either
                raise unknown_keywords(cls, kwargs) from None
            raise
        if cls.__dict__.get("_vcp_binding"):
            if keywords:
                raise PatchDefinitionError(f"{cls.__qualname__}: class keywords belong on a patch class.")
            return
        if not hasattr(cls, "_vcp_target"):
            raise PatchDefinitionError(
                f"{cls.__qualname__} subclasses VLLMPatch without a target; write "
                f"'class {cls.__name__}(VLLMPatch[TargetClass])' or "
                f"'VLLMPatch[\"package.module:TargetClass\"]'."
            )
        # A patch class made from another inherits how it composes, unless it says otherwise.
        inherited = next(
            (vars(base)["_vcp_spec"].composition for base in cls.__mro__[1:] if "_vcp_spec" in vars(base)),
            Composition(),
        )
        cls._vcp_spec = build_spec(cls, _NEVER_GRAFTED, composition(cls, keywords, inherited))
        cls.name = cls._vcp_spec.name
        cls._vcp_checks_live = cls.check_live.__func__ is not VLLMPatch.check_live.__func__  # type: ignore[attr-defined]
        # original() is the table's own (C) lookup: no registry, no lock, no Python frame per call.
        cls._vcp_originals = Originals(cls._vcp_spec.name, tuple(cls._vcp_spec.members))
        type.__setattr__(cls, "original", cls._vcp_originals.__getitem__)
        REGISTRY.register(cls)

    @classmethod
    def check_live(cls, instance: Any) -> None:
        """The patch's live check: raise to refuse being applied where ``instance`` lives.

        A patch whose methods rely on state that the target's ``__init__``
        makes, or on how the instance was configured, defines this class
        method (``@classmethod def check_live(cls, instance)``).  Applying the
        patch in a running process (``PatchManager.apply``, ``MyPatch.apply()``,
        the kill switch's ``POST /custom_patches/{name}/apply``) calls it once
        for every instance of the target, and of its subclasses, that exists
        in this process then, before anything is changed.  If it raises, the
        apply is refused and the target is left exactly as it was; the kill
        switch then undoes the apply in every process and answers 409 with the
        message.  Raise :class:`~vllm_custom_patches.PatchConfigError` (or
        another ``PatchError``) naming the patch, the problem and the fix; any
        other exception is taken as a fault of the check and refuses the apply
        as a ``PatchApplyError``.

        Instances made later are not its business: a patch that must refuse
        them too wraps ``__init__`` (the catalogue's policies do both, with one
        helper).  It is not called when nothing exists to check: at a vLLM
        process's start-up the plugin applies a pending patch the moment its
        target's module is imported, before any instance can exist, and no
        instance is looked for then.  Finding the instances walks the heap
        (about 0.1 s in a vLLM engine core), so only patches that define a
        check pay for it, once per apply.  The check runs under the
        framework's lock: it must not wait for other threads.  The default
        accepts everything.
        """

    @classmethod
    def apply(cls) -> bool:
        """Apply this patch; ``True`` if it was applied now, ``False`` if it already was."""
        return _ledger.apply(cls)

    @classmethod
    def rollback(cls) -> bool:
        """Roll this patch back exactly; ``False`` if it was not applied."""
        return _ledger.rollback(cls._vcp_spec.name)

    @classmethod
    def is_applied(cls) -> bool:
        """Whether this patch is applied now."""
        return cls._vcp_spec.name in REGISTRY.applied

    @classmethod
    def original(cls, member: str) -> Any:
        """The next layer inward of ``member``: vLLM's original, or in a stack the next stackable patch's member.

        ``MyPatch.original("schedule")(self, *args)`` calls it even when
        ``self`` is not an instance of the target (vLLM's own unit tests call
        ``Scheduler`` methods unbound with stand-in objects), where
        ``self._original_schedule`` would fail.  It gives what ``getattr`` on
        the target gives: a plain function for a method, a class method bound
        to the target, a property object for a property.  Resolved at each
        call: in a stack it is the layer applied inward of this one *now*.
        Works while the patch is applied (and during a rollback, for calls
        already inside the patch).

        On every patch class this name is replaced by the lookup in the
        patch's own table (a dict kept current by the framework), so a call
        costs one C-level dict lookup; this method documents it.
        """
        raise PatchTargetError(f"{cls.__qualname__} is not a patch class; original() is asked of one.")


# Bases whose members are never grafted: the framework's own and Python's.
_NEVER_GRAFTED: frozenset[type] = frozenset({object, Generic, VLLMPatch, TypedAs})
