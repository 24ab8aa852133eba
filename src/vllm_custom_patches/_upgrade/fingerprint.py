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
    """A lock file that cannot be read, or a lock that cannot be written; the message names the file, the key and the fix."""


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


_FIX = "delete it and run 'vllm-custom-patches lock' again"
_MISSING = object()


def _json_kind(value: object) -> str:
    if value is _MISSING:
        return "nothing (the key is missing)"
    kinds = {
        dict: "an object",
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
    }
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


_MEMBER_FIELDS = ("defined_in", "fingerprint", "source")


def _load(path: Path) -> dict[str, Any]:
    """The lock file's content, every part checked: a lock that would break a reader later
    (a version that is not PEP 440, a source that does not parse, a wrong type) is refused here,
    naming the file and the key."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise LockFileError(
            f"lock file {path} cannot be read ({type(exc).__name__}: {exc}); fix its permissions or {_FIX}"
        ) from None
    try:
        data = json.loads(raw.decode())
    except (ValueError, RecursionError) as exc:  # not UTF-8, not JSON, nested too deep, a number too long
        raise LockFileError(f"lock file {path} is corrupt ({type(exc).__name__}: {exc}); {_FIX}") from None
    if not isinstance(data, dict):
        raise LockFileError(f"lock file {path} is corrupt: expected a JSON object, found {_json_kind(data)}; {_FIX}")
    if not (type(data.get("format")) is int and data["format"] == _FORMAT):  # not True, not 1.0
        raise LockFileError(
            f'lock file {path} is not in format {_FORMAT} ("format": {json.dumps(data.get("format"))[:40]}); {_FIX}'
        )

    def bad(key: str, problem: str) -> LockFileError:
        return LockFileError(f"lock file {path} is corrupt at {key}: {problem}; {_FIX}")

    def mapping(value: object, key: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise bad(key, f"expected an object, found {_json_kind(value)}")
        return value

    def text(value: object, key: str) -> str:
        if not isinstance(value, str):
            raise bad(key, f"expected a string, found {_json_kind(value)}")
        return value

    from packaging.version import InvalidVersion, Version

    for patch, raw_entry in mapping(data.get("patches", _MISSING), "patches").items():
        where = f"patches[{patch!r}]"
        entry = mapping(raw_entry, where)
        text(entry.get("target", _MISSING), f"{where}.target")
        for version, members in mapping(entry.get("versions", _MISSING), f"{where}.versions").items():
            at = f"{where}.versions[{version!r}]"
            try:
                Version(version)
            except InvalidVersion:
                raise bad(at, f"{version!r} is not a PEP 440 version") from None
            for member, fields in mapping(members, at).items():
                key = f"{at}[{member!r}]"
                if not member.isidentifier():
                    raise bad(key, f"{member!r} is not a member name")
                if sorted(mapping(fields, key)) != sorted(_MEMBER_FIELDS):
                    raise bad(
                        key, f"expected the keys {', '.join(_MEMBER_FIELDS)}, found {ascii(sorted(fields))[:200]}"
                    )
                for name in _MEMBER_FIELDS:
                    text(fields[name], f"{key}.{name}")
                module, _, qualname = fields["defined_in"].partition(":")
                if not (module and qualname):
                    raise bad(f"{key}.defined_in", f"{fields['defined_in']!r} is not 'package.module:Qual.Name'")
                try:
                    fingerprint(fields["source"])
                except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:  # what ast.parse raises
                    raise bad(f"{key}.source", f"it does not parse as Python ({type(exc).__name__}: {exc})") from None
    return data


def read_lock(module_file: str | os.PathLike[str] | None, patch: str) -> dict[str, dict[str, LockedMember]]:
    """``{vllm version: {member: LockedMember}}`` recorded for ``patch``; empty without a lock.

    Raises :class:`LockFileError` for a lock file that is corrupt anywhere."""
    if module_file is None:
        return {}
    path = lock_path(module_file)
    if not path.is_file():
        return {}
    entry = _load(path)["patches"].get(patch, {"versions": {}})
    return {
        version: {member: LockedMember(**fields) for member, fields in members.items()}
        for version, members in entry["versions"].items()
    }


def write_lock(
    module_file: str | os.PathLike[str], patch: str, target: str, version: str, members: dict[str, LockedMember]
) -> Path:
    """Record ``members`` for ``patch`` under ``version`` (other versions and patches are kept); the file written."""
    from packaging.version import InvalidVersion, Version

    path = lock_path(module_file)
    try:
        Version(version)
    except InvalidVersion:
        raise LockFileError(
            f"cannot lock against vLLM {version!r}: not a PEP 440 version; pass --vllm VERSION"
        ) from None
    # A corrupt lock is refused, not overwritten: what it held for other versions and patches would be lost.
    data: dict[str, Any] = _load(path) if path.is_file() else {"format": _FORMAT, "patches": {}}
    entry = data["patches"].setdefault(patch, {"target": target, "versions": {}})
    entry["target"] = target
    entry["versions"][version] = {
        name: {"fingerprint": m.fingerprint, "defined_in": m.defined_in, "source": m.source}
        for name, m in sorted(members.items())
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path
