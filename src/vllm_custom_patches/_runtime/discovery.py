"""Finding patches that are not imported yet.

Two sources, both consulted only when ``VLLM_CUSTOM_PATCHES`` is set:

* the entry-point group ``vllm_custom_patches`` (name = patch name, value =
  ``module:Class``).  Reading the group only reads metadata; a module is
  imported only when its patch is selected, so a broken patch package that
  nobody enabled cannot break vLLM.
* the ``.py`` files in the directories of ``VLLM_CUSTOM_PATCHES_PATH``.  Their
  patch names are only known once they run, so all of them are imported.
  Because they run in every vLLM process, a directory or file that someone
  other than its owner may write is refused.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import stat
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import importlib_metadata

from .._core.errors import PatchConfigError, PatchDefinitionError, PatchLoadError
from .._core.patch import VLLMPatch
from .._env import ENV_PATH

__all__ = [
    "ENTRY_POINT_GROUP",
    "ENV_PATH",
    "PATH_PACKAGE",
    "PatchEntryPoint",
    "PathLoad",
    "find_entry_points",
    "load_path",
]

ENTRY_POINT_GROUP = "vllm_custom_patches"
PATH_PACKAGE = "vllm_custom_patches_path"
"""Files from ``VLLM_CUSTOM_PATCHES_PATH`` import as ``vllm_custom_patches_path.<stem>``."""


@dataclass(frozen=True)
class PatchEntryPoint:
    """The entry points that declare one patch name (normally exactly one)."""

    name: str
    declared: tuple[importlib_metadata.EntryPoint, ...]

    @property
    def module(self) -> str:
        return self.declared[0].module

    def load(self) -> type[VLLMPatch[Any]]:
        """Import the patch class; :class:`PatchError` subclasses say why it cannot be."""
        if len(self.declared) > 1:
            listed = ", ".join(f"{_dist_of(ep)} ({ep.value})" for ep in self.declared)
            raise PatchConfigError(
                f"patch name {self.name!r} is declared by several entry points of group "
                f"{ENTRY_POINT_GROUP!r}: {listed}. Uninstall all but one of these distributions."
            )
        (ep,) = self.declared
        try:
            obj = ep.load()
        except Exception as exc:
            raise PatchLoadError(
                f"patch {self.name!r}: cannot import entry point {ep.value!r} of distribution "
                f"{_dist_of(ep)}: {type(exc).__name__}: {exc}"
            ) from exc
        if not (isinstance(obj, type) and issubclass(obj, VLLMPatch) and "_vcp_spec" in vars(obj)):
            raise PatchDefinitionError(
                f"entry point {self.name} = {ep.value!r} of distribution {_dist_of(ep)} "
                f"(group {ENTRY_POINT_GROUP!r}) names {obj!r}, which is not a patch class "
                f"defined as 'class P(VLLMPatch[Target])'."
            )
        if obj.name != self.name:
            raise PatchDefinitionError(
                f"entry point {self.name} = {ep.value!r} of distribution {_dist_of(ep)} loads "
                f"the patch named {obj.name!r}; an entry point's name must be its patch's "
                f"name. Rename the entry point to {obj.name!r}, or set name = {self.name!r} "
                f"in the class."
            )
        return obj


def find_entry_points() -> dict[str, PatchEntryPoint]:
    """The installed ``vllm_custom_patches`` entry points by name; imports nothing."""
    found: dict[str, list[importlib_metadata.EntryPoint]] = {}
    for ep in importlib_metadata.entry_points(group=ENTRY_POINT_GROUP):
        declared = found.setdefault(ep.name, [])
        # The same distribution can be visible twice (e.g. on two sys.path
        # entries); only a second *value* is a real clash.
        if all(other.value != ep.value for other in declared):
            declared.append(ep)
    return {name: PatchEntryPoint(name, tuple(eps)) for name, eps in found.items()}


@dataclass
class PathLoad:
    """What loading ``VLLM_CUSTOM_PATCHES_PATH`` did."""

    modules: dict[str, str] = field(default_factory=dict)
    """Module name -> file, for every file imported (or imported before)."""
    refused: list[PatchConfigError] = field(default_factory=list)
    """Entries that were not even tried: missing, not a directory, unsafe permissions."""
    failed: dict[str, PatchLoadError] = field(default_factory=dict)
    """Module name -> the error, for files that raised while being imported."""


def load_path(value: str) -> PathLoad:
    """Import every ``*.py`` file in the directories listed in ``value``.

    Files whose names start with ``_`` or ``.`` are left alone (helpers,
    editor files).  Directories are read in the order given, their files in
    name order.  Nothing raises: every problem is recorded in the result, and
    the caller's error policy decides.
    """
    result = PathLoad()
    for entry in (part.strip() for part in value.split(os.pathsep)):
        if entry:
            try:
                files = _patch_files(os.path.abspath(entry))
            except PatchConfigError as exc:
                result.refused.append(exc)
                continue
            for path in files:
                try:
                    module_name = _module_name(path, result.modules)
                    _check_permissions(path, "file")
                except PatchConfigError as exc:
                    result.refused.append(exc)
                    continue
                result.modules[module_name] = path
                try:
                    _import_file(module_name, path)
                except PatchLoadError as exc:
                    result.failed[module_name] = exc
    return result


def _patch_files(directory: str) -> Iterable[str]:
    try:
        st = os.stat(directory)
    except OSError as exc:
        raise PatchConfigError(
            f"{ENV_PATH}: cannot read directory {directory}: {exc.strerror or exc}. "
            f"List existing directories of patch files, separated by {os.pathsep!r}."
        ) from None
    if not stat.S_ISDIR(st.st_mode):
        raise PatchConfigError(
            f"{ENV_PATH}: {directory} is not a directory. List the directories that hold "
            f"the patch files, separated by {os.pathsep!r}."
        )
    _check_permissions(directory, "directory", st)
    try:
        names = sorted(os.listdir(directory))
    except OSError as exc:
        raise PatchConfigError(f"{ENV_PATH}: cannot list {directory}: {exc.strerror or exc}.") from None
    return [os.path.join(directory, name) for name in names if name.endswith(".py") and not name.startswith(("_", "."))]


def _check_permissions(path: str, what: str, st: os.stat_result | None = None) -> None:
    if st is None:
        try:
            st = os.stat(path)
        except OSError as exc:
            raise PatchConfigError(f"{ENV_PATH}: cannot read {path}: {exc.strerror or exc}.") from None
        if not stat.S_ISREG(st.st_mode):
            raise PatchConfigError(f"{ENV_PATH}: {path} is not a regular file; rename it or move it away.")
    # Code here runs in every vLLM process: whoever can write it owns them all.
    writable_by = [who for bit, who in ((stat.S_IWGRP, "group"), (stat.S_IWOTH, "others")) if st.st_mode & bit]
    if writable_by:
        raise PatchConfigError(
            f"{ENV_PATH}: refusing {what} {path}: it is writable by {' and '.join(writable_by)} "
            f"(mode {stat.filemode(st.st_mode)}), so anyone who can write it could run code "
            f"in every vLLM process. Fix: chmod go-w {shlex.quote(path)}"
        )


def _module_name(path: str, taken: dict[str, str]) -> str:
    stem = os.path.basename(path)[: -len(".py")]
    if not stem.isidentifier():
        raise PatchConfigError(
            f"{ENV_PATH}: {path}: {stem!r} is not a valid module name; rename the file to letters, digits and '_'."
        )
    module_name = f"{PATH_PACKAGE}.{stem}"
    if module_name in taken:
        raise PatchConfigError(
            f"{ENV_PATH}: {path} and {taken[module_name]} would both be module "
            f"{module_name}; rename one of them. {path} was not loaded."
        )
    return module_name


def _import_file(module_name: str, path: str) -> None:
    loaded = sys.modules.get(module_name)
    if loaded is not None and getattr(loaded, "__file__", None) == path:
        return  # a second activation in this process: its patches are registered already
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:  # pragma: no cover - only for exotic file systems
        raise PatchLoadError(f"{ENV_PATH}: cannot import {path}: no loader for it.")
    module = importlib.util.module_from_spec(spec)
    # In sys.modules while it runs, as for a normal import: dataclasses,
    # pickle and typing look the defining module up there.
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(module_name, None)
        raise PatchLoadError(f"{ENV_PATH}: cannot import {path}: {type(exc).__name__}: {exc}") from exc


def _dist_of(ep: importlib_metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return repr(dist.name) if dist is not None else "(unknown)"
