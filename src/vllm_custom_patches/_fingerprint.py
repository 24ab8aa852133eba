"""Fingerprints of vLLM's code under a patch, and the lock file a patch author ships them in.

A patch that re-implements part of an original silently goes wrong when that
original's body changes in a new vLLM (transformers' ``# Copied from`` check
exists for the same reason).  ``vllm-custom-patches lock`` records, per vLLM
version, a fingerprint (and the source, for diffs) of each original a patch
replaces; ``doctor`` compares the vLLM it checks with that record.

The fingerprint is a hash of the function's syntax tree without its docstring,
comments, formatting or line numbers, so it is the same whether the source
was read from an installed vLLM (``inspect``) or from an unpacked wheel
(``ast``), and a reformat does not count as a change.

The lock file sits next to the patch's module, ``<module>.lock.json``, so a
patch package ships it as package data::

    {"format": 1, "patches": {"<patch>": {"target": "...", "versions": {
        "0.32.0": {"<member>": {"fingerprint": "...", "defined_in": "...", "source": "..."}}}}}}
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["LockFileError", "LockedMember", "fingerprint", "lock_path", "read_lock", "write_lock"]


class LockFileError(ValueError):
    """A lock file that cannot be read; the message names it and the fix."""

_FORMAT = 1


def fingerprint(source: str) -> str:
    """The fingerprint of one function (or class member) given as source text."""
    tree = ast.parse(textwrap.dedent(source))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            node.body = body[1:] or [ast.Pass()]
    return "sha256:" + hashlib.sha256(ast.dump(tree, include_attributes=False).encode()).hexdigest()[:24]


@dataclass(frozen=True)
class LockedMember:
    """What a patch was written against, for one member in one vLLM version."""

    fingerprint: str
    defined_in: str
    """``module:Qual`` of the class whose own namespace held the original (it may be a base of the target)."""
    source: str


def lock_path(module_file: str | os.PathLike[str]) -> Path:
    """Where the lock of the patches defined in ``module_file`` lives."""
    path = Path(module_file)
    return path.with_name(path.stem + ".lock.json")


def read_lock(module_file: str | os.PathLike[str] | None, patch: str) -> dict[str, dict[str, LockedMember]]:
    """``{vllm version: {member: LockedMember}}`` recorded for ``patch``; empty without a lock."""
    if module_file is None:
        return {}
    path = lock_path(module_file)
    if not path.is_file():
        return {}
    fix = "delete it and run 'vllm-custom-patches lock' again"
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise LockFileError(f"lock file {path} is not in format {_FORMAT}; {fix}")
        entry = data.get("patches", {}).get(patch, {})
        return {
            str(version): {str(member): LockedMember(**fields) for member, fields in members.items()}
            for version, members in entry.get("versions", {}).items()
        }
    except LockFileError:
        raise
    except (ValueError, TypeError, AttributeError) as exc:
        raise LockFileError(f"lock file {path} is corrupt ({type(exc).__name__}: {exc}); {fix}") from None


def write_lock(module_file: str | os.PathLike[str], patch: str, target: str, version: str, members: dict[str, LockedMember]) -> Path:
    """Record ``members`` for ``patch`` under ``version`` (other versions and patches are kept); the file written."""
    path = lock_path(module_file)
    data: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {"format": _FORMAT, "patches": {}}
    entry = data["patches"].setdefault(patch, {"target": target, "versions": {}})
    entry["target"] = target
    entry["versions"][version] = {
        name: {"fingerprint": m.fingerprint, "defined_in": m.defined_in, "source": m.source} for name, m in sorted(members.items())
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path
