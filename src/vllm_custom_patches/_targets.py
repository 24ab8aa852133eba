"""Naming and resolving patch targets (a class, or ``"pkg.module:Qual.Name"``)."""

from __future__ import annotations

import importlib
import re
import sys

from ._errors import PatchDefinitionError, PatchTargetError

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
    """The target class.  ``None`` if ``import_module`` is false and its module is not imported yet."""
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
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise PatchTargetError(
                f"patch {patch_name!r}: target {spec!r} not found: "
                f"{getattr(obj, '__name__', obj)!s} has no attribute {part!r}. "
                f"Check the target name against the installed version."
            ) from None
    if not isinstance(obj, type):
        raise PatchTargetError(
            f"patch {patch_name!r}: target {spec!r} is a {type(obj).__name__}, not a class."
        )
    return obj
