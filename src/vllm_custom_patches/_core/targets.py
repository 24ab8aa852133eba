"""Naming and resolving patch targets (a class, or ``"pkg.module:Qual.Name"``)."""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from types import FunctionType, ModuleType

from .errors import PatchDefinitionError, PatchTargetError
from .graft import mro_lookup

_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")

TargetSpec = type | str


def check_target_spec(spec: object) -> TargetSpec:
    """Validate the subscript of ``VLLMPatch[...]`` when the class is defined."""
    if isinstance(spec, type):
        return spec
    if isinstance(spec, str):
        module, sep, qualname = spec.partition(":")
        if sep and _DOTTED.fullmatch(module) and _DOTTED.fullmatch(qualname):
            return spec
        hint = ""
        if not sep and "." in spec:
            head, _, tail = spec.rpartition(".")
            hint = f" (did you mean {head + ':' + tail!r}?)"
        raise PatchDefinitionError(
            f"VLLMPatch[{spec!r}]: a string target must look like "
            f"'package.module:Class' or 'package.module:Outer.Inner'{hint}."
        )
    raise PatchDefinitionError(
        f"VLLMPatch[{spec!r}]: the target must be a class or a string "
        f"'package.module:Class', not {type(spec).__name__}."
    )


def target_label(spec: TargetSpec) -> str:
    """``module:Qual.Name`` for a class or a string target."""
    if isinstance(spec, str):
        return spec
    return f"{spec.__module__}:{spec.__qualname__}"


def module_of(spec: TargetSpec) -> str:
    return spec.partition(":")[0] if isinstance(spec, str) else spec.__module__


def resolve_target(spec: TargetSpec, patch_name: str, *, import_module: bool = True) -> type | None:
    """The target class.

    With ``import_module`` false nothing is imported and no code of the target
    runs: ``None`` means the target cannot be told without running code (its
    module is not imported yet, or a name is made on demand by a module
    ``__getattr__``, a metaclass ``__getattr__`` or a descriptor).  With it
    true, anything the lookup raises becomes a :class:`PatchTargetError`.
    """
    if isinstance(spec, type):
        return spec
    module_name, _, qualname = spec.partition(":")
    module = sys.modules.get(module_name)
    if module is None:
        if not import_module:
            return None
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:
            raise PatchTargetError(
                f"patch {patch_name!r}: cannot import module {module_name!r} of its "
                f"target {spec!r}: {type(exc).__name__}: {exc}"
            ) from exc
    obj: object = module
    for part in qualname.split("."):
        if import_module:
            obj = _dynamic_lookup(obj, part, spec, patch_name)
        else:
            obj = _static_lookup(obj, part, spec, patch_name)
            if obj is _NEEDS_CODE:
                return None
    if not isinstance(obj, type):
        raise PatchTargetError(f"patch {patch_name!r}: target {spec!r} is a {type(obj).__name__}, not a class.")
    return obj


_NEEDS_CODE = object()
"""What a static lookup gives where only running the target's code could tell."""
_NEVER_A_CLASS = (FunctionType, property, classmethod)
"""Descriptors whose ``__get__`` on a class yields no class, so a static lookup can say "not a class"."""


def _dynamic_lookup(obj: object, part: str, spec: str, patch_name: str) -> object:
    try:
        return getattr(obj, part)
    except AttributeError as exc:
        raise _not_found(obj, part, spec, patch_name) from exc
    except Exception as exc:
        # A lazy module __getattr__ (vllm/__init__.py has one) imports on
        # access; whatever that raises is this target's problem, and only a
        # PatchError is recorded as the patch's failure and tolerated by the
        # plugin's lenient mode.
        raise PatchTargetError(
            f"patch {patch_name!r}: looking up {part!r} on {_name_of(obj)} for its target "
            f"{spec!r} raised {type(exc).__name__}: {exc}. The name is made on demand "
            f"(e.g. by a lazy module __getattr__) and that failed: check that the target "
            f"exists in the installed version and that its module imports."
        ) from exc


def _static_lookup(obj: object, part: str, spec: str, patch_name: str) -> object:
    """``getattr(obj, part)`` found without running any code, or ``_NEEDS_CODE``."""
    if isinstance(obj, ModuleType):
        if type(obj).__getattribute__ is not ModuleType.__getattribute__:
            return _NEEDS_CODE  # a module subclass that computes every attribute
        if type(obj) is not ModuleType and mro_lookup(type(obj), part) is not None:
            return _NEEDS_CODE  # a module subclass's own attribute, maybe a property
        namespace = obj.__dict__
        if part in namespace:
            return namespace[part]  # a module's own names are not descriptors
        if "__getattr__" in namespace or mro_lookup(type(obj), "__getattr__") is not None:
            return _NEEDS_CODE  # PEP 562: made (often imported) on first access
        raise _not_found(obj, part, spec, patch_name)
    if isinstance(obj, type):
        meta = type(obj)
        if meta.__getattribute__ is not type.__getattribute__:
            return _NEEDS_CODE
        try:
            raw = inspect.getattr_static(obj, part)
        except AttributeError:
            if mro_lookup(meta, "__getattr__") is not None:
                return _NEEDS_CODE
            raise _not_found(obj, part, spec, patch_name) from None
        if type(raw) is staticmethod:
            return raw.__func__  # what its __get__ returns; no code of the target runs
        if type(raw) in _NEVER_A_CLASS or mro_lookup(type(raw), "__get__") is None:
            return raw
        return _NEEDS_CODE  # getattr would call this descriptor's __get__
    return _NEEDS_CODE  # an instance: its class decides what getattr runs


def _not_found(obj: object, part: str, spec: str, patch_name: str) -> PatchTargetError:
    return PatchTargetError(
        f"patch {patch_name!r}: target {spec!r} not found: {_name_of(obj)} has no "
        f"attribute {part!r}. Check the target name against the installed version."
    )


def _name_of(obj: object) -> str:
    if isinstance(obj, ModuleType):
        name = obj.__dict__.get("__name__")  # its own dict: no code of a module subclass runs
        return name if isinstance(name, str) else "module"
    if isinstance(obj, type):
        return obj.__name__
    return f"a {type(obj).__name__} object"
