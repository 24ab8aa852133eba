"""What the selected patches add to vLLM's torch.compile cache key: their code, not their settings.

vLLM keys its compiled artifacts (the torch.compile cache, the AOT-compiled
model) on, among others, the values of the variables in
``vllm.envs.environment_variables`` (``envs.compile_factors()``).  The plugin
declares ``VLLM_CUSTOM_PATCHES`` there (``vllm_env``) with :func:`selection_key`
as its value: the selection *and a fingerprint of each selected patch's
code*.  A patch may change code that torch.compile traces (a model's
``forward``, a layer), and an artifact compiled with one version of it must
not be reused with another: so a new release of a patch package -- even one
that keeps the patch's name and the same ``VLLM_CUSTOM_PATCHES`` -- gets new
artifacts, while the same code on every node and in every worker gives the
same key.  Per-run settings (a trace file's path, a policy's weights) stay
out of it: they are declared to vLLM with a constant value.

A patch's code is the source of the module that defines it and of every
module of the same top-level package that module uses (its helpers, followed
transitively: ``patches/shortest_prompt_first.py`` brings ``_queue.py`` and
``_settings.py``).  A module whose source cannot be had (no loader that
gives it) is represented by its compiled code; a patch class with no module
at all by its members' code.  Each module is read once per process, the first
time a key is asked for, which vLLM does while it starts (before it compiles).
"""

from __future__ import annotations

import hashlib
import sys
import types
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

from .._core.errors import PatchConfigError, UnknownPatchError
from .._core.graft import functions_of
from .._core.manager import PatchManager
from .._env import ENV_PATCHES
from .selection import parse_selection

__all__ = ["code_fingerprint", "selection_key"]

_module_digests: weakref.WeakKeyDictionary[types.ModuleType, bytes] = weakref.WeakKeyDictionary()


def selection_key(environ: Mapping[str, str]) -> str | None:
    """``VLLM_CUSTOM_PATCHES``'s contribution to the compile key: the selection and each selected patch's code.

    ``None`` when it is unset (as vLLM's own getters answer for an unset
    variable).  A selection the plugin refused adds nothing but its text: no
    engine starts with it.
    """
    value = environ.get(ENV_PATCHES)
    if value is None:
        return None
    try:
        selection = parse_selection(value)
    except PatchConfigError:
        return value
    names = set(selection.names)
    if selection.all:
        names |= set(PatchManager.names()) - selection.excluded
    parts = [value.strip()]
    for name in sorted(names):
        try:
            patch = PatchManager.get(name)
        except UnknownPatchError:
            parts.append(f"{name}=unknown")  # the plugin refuses it (strict) or skipped it: no code of it runs
            continue
        parts.append(f"{name}={code_fingerprint(patch)}")
    return ";".join(parts)


def code_fingerprint(patch: type) -> str:
    """``sha256:...`` of the code of ``patch``: its module and the modules of its own package it uses."""
    digest = hashlib.sha256(b"vllm-custom-patches code 1\0")
    module = sys.modules.get(patch.__module__)
    if module is None:  # a class whose module is gone or was never one: its own code is all there is
        for member in vars(patch).values():
            for function in functions_of(member):
                digest.update(_code_digest(function.__code__))
    else:
        for used in sorted(_package_closure(module), key=lambda m: m.__name__):
            digest.update(used.__name__.encode() + b"\0" + _module_digest(used))
    return "sha256:" + digest.hexdigest()[:32]


def _package_closure(module: types.ModuleType) -> list[types.ModuleType]:
    """``module`` and the modules of its top-level package that it uses, directly or through them."""
    package = module.__name__.partition(".")[0]
    seen = {module.__name__: module}
    todo = [module]
    while todo:
        for used in _used_modules(todo.pop()):
            if used.__name__.partition(".")[0] == package and used.__name__ not in seen:
                seen[used.__name__] = used
                todo.append(used)
    return list(seen.values())


def _used_modules(module: types.ModuleType) -> Iterable[types.ModuleType]:
    # What its global names are bound to: modules (``import x``) and the
    # modules that define the functions and classes it imported (``from x import f``).
    for value in list(vars(module).values()):
        if isinstance(value, types.ModuleType):
            yield value
            continue
        owner = getattr(value, "__module__", None) if isinstance(value, (type, types.FunctionType)) else None
        if isinstance(owner, str) and (found := sys.modules.get(owner)) is not None:
            yield found


def _module_digest(module: types.ModuleType) -> bytes:
    cached = _module_digests.get(module)
    if cached is None:
        cached = _module_digests[module] = hashlib.sha256(_module_code(module)).digest()
    return cached


def _module_code(module: types.ModuleType) -> bytes:
    """The module's source; else its compiled code; else a marker (nothing to read: its name alone counts)."""
    spec = getattr(module, "__spec__", None)
    loader: Any = getattr(spec, "loader", None) or getattr(module, "__loader__", None)
    name = getattr(spec, "name", None) or module.__name__
    # vLLM calls the key's getter while it starts (envs.enable_envs_cache reads every variable,
    # unguarded): whatever a loader raises must not stop it, only make the module "unreadable".
    try:
        source: object = loader.get_source(name) if hasattr(loader, "get_source") else None
    except Exception:
        source = None
    if isinstance(source, str):
        return b"source\0" + source.encode("utf-8", "surrogateescape")
    try:
        code = loader.get_code(name) if hasattr(loader, "get_code") else None
    except Exception:
        code = None
    if isinstance(code, types.CodeType):
        return b"code\0" + _code_digest(code)
    return b"unreadable\0"


def _code_digest(code: types.CodeType) -> bytes:
    """A digest of what a code object does, the same in every process (``marshal`` output is not)."""
    digest = hashlib.sha256()
    digest.update(code.co_code)
    for names in (code.co_names, code.co_varnames, code.co_freevars, code.co_cellvars):
        digest.update(repr(names).encode())
    for const in code.co_consts:
        digest.update(_const_bytes(const))
    return digest.digest()


def _const_bytes(const: object) -> bytes:
    if isinstance(const, types.CodeType):
        return _code_digest(const)
    if isinstance(const, (frozenset, set)):  # iteration order follows string hashing, which varies per process
        return b"{" + b",".join(sorted(_const_bytes(item) for item in const)) + b"}"
    if isinstance(const, tuple):
        return b"(" + b",".join(_const_bytes(item) for item in const) + b")"
    return repr(const).encode()
