"""Fingerprints of vLLM's code under a patch, and the lock files that record them.

A patch that re-implements part of an original silently goes wrong when that
original's body changes in a new vLLM (transformers' ``# Copied from`` check
exists for the same reason).  ``vllm-custom-patches lock`` records, per vLLM
version, a fingerprint (and the source, for diffs) of each original a patch
replaces; ``doctor`` compares the vLLM it checks with that record.

The fingerprint is a hash of the function's syntax tree without its docstring,
comments, formatting or line numbers, so it is the same whether the source
was read from an installed vLLM (``inspect``) or from an unpacked wheel
(``ast``), and a reformat does not count as a change.

Where locks live: a patch's author ships ``<module>.lock.json`` next to the
patch's module (package data); an ops team keeps its own in a directory of its
choice (``lock --lock-dir DIR`` or ``$VLLM_CUSTOM_PATCHES_LOCK_DIR``), one file
per patch, ``DIR/<patch>.lock.json``.  Both are read; for a vLLM version both
lock, the team's entry wins (:func:`read_locks`).  The format (2)::

    {"format": 2, "patches": {"<patch>": {"target": "module:Class", "versions": {
        "0.33.0": {"vllm": "0.33.0", "patch_version": "0.1.0",
                   "patch_version_from": "distribution vllm-custom-patches",
                   "members": {"<member>": {"fingerprint": "...", "defined_in": "...", "source": "..."}},
                   "surface": {...}}}}}}

``surface`` (optional: locks written before it lack it) records the patch's
dependency surface at that version, the baseline of ``doctor``'s semantic
drift check (``surface``: its shape and meaning).

A version key is the release the gates compare; ``vllm`` is the version as
found (a dev build's full version); ``patch_version`` is the version of the
patch that was locked, or null where none is known (``patch_version_from``
says where it came from, or why not).  Format 1 (members directly under the
version, nothing else) is still read, and rewritten as format 2 by the next
``lock`` into that file.  One version's entry is built by :func:`lock_entry`
and checked on reading by the checks in ``_ENTRY_KEYS``: a part that adds a
key to each entry adds it in both places.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .static import fingerprint

__all__ = [
    "LockFileError",
    "LockedMember",
    "LockedVersion",
    "PatchVersion",
    "fingerprint",
    "lock_entry",
    "lock_path",
    "pick_version",
    "read_lock",
    "read_locks",
    "user_lock_path",
    "write_lock",
]


class LockFileError(ValueError):
    """A lock file that cannot be read, or a lock that cannot be written; the message names the file, the key and the fix."""


_FORMAT = 2
_READABLE = (1, 2)


@dataclass(frozen=True)
class LockedMember:
    """What a patch was written against, for one member in one vLLM version."""

    fingerprint: str
    defined_in: str
    """``module:Qual`` of the class whose own namespace held the original (it may be a base of the target)."""
    source: str


@dataclass(frozen=True)
class PatchVersion:
    """The version of a patch, as far as it can be known."""

    version: str | None
    """``None``: unknown (a patch file outside any package, without ``__version__``)."""
    source: str
    """Where it came from (``distribution NAME``, ``module NAME.__version__``), or why it is unknown."""


@dataclass(frozen=True)
class LockedVersion:
    """What one lock file records for one patch at one vLLM version."""

    version: str
    """The key: the release the gates compare, e.g. ``0.33.0``."""
    vllm: str
    """The vLLM version as found when locking (a dev build's full version)."""
    patch: PatchVersion
    members: Mapping[str, LockedMember]
    path: Path
    """The lock file."""
    owner: str
    """``package`` (shipped next to the patch's module) or ``user`` (the lock directory)."""
    entry: Mapping[str, Any] = field(repr=False, compare=False)
    """The entry as read (format 2 shape), for the parts that record more than members."""

    def where(self) -> str:
        """The lock file, as a reader recognises it: a shipped one by its name, a user's by its path."""
        return f"{self.path.name}, shipped with the patch" if self.owner == "package" else str(self.path)


def lock_path(module_file: str | os.PathLike[str]) -> Path:
    """Where the lock shipped with the patches defined in ``module_file`` lives."""
    path = Path(module_file)
    return path.with_name(path.stem + ".lock.json")


def user_lock_path(lock_dir: str | os.PathLike[str], patch: str) -> Path:
    """Where a lock directory holds ``patch``'s lock (patch names are file-name safe: ``[A-Za-z_][A-Za-z0-9_.]*``)."""
    return Path(lock_dir) / f"{patch}.lock.json"


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


class _Reader:
    """Checks one lock file's parts, each error naming the file and the key."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def bad(self, key: str, problem: str) -> LockFileError:
        return LockFileError(f"lock file {self.path} is corrupt at {key}: {problem}; {_FIX}")

    def mapping(self, value: object, key: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.bad(key, f"expected an object, found {_json_kind(value)}")
        return value

    def text(self, value: object, key: str) -> str:
        if not isinstance(value, str):
            raise self.bad(key, f"expected a string, found {_json_kind(value)}")
        return value

    def keys(self, value: dict[str, Any], key: str, required: set[str], allowed: set[str]) -> None:
        if not required <= set(value) <= allowed:
            raise self.bad(key, f"expected the keys {', '.join(sorted(allowed))}, found {ascii(sorted(value))[:200]}")


_MEMBER_FIELDS = ("defined_in", "fingerprint", "source")


def _check_members(r: _Reader, value: object, key: str) -> None:
    for member, fields in r.mapping(value, key).items():
        at = f"{key}[{member!r}]"
        if not member.isidentifier():
            raise r.bad(at, f"{member!r} is not a member name")
        r.keys(r.mapping(fields, at), at, set(_MEMBER_FIELDS), set(_MEMBER_FIELDS))
        for name in _MEMBER_FIELDS:
            r.text(fields[name], f"{at}.{name}")
        module, _, qualname = fields["defined_in"].partition(":")
        if not (module and qualname):
            raise r.bad(f"{at}.defined_in", f"{fields['defined_in']!r} is not 'package.module:Qual.Name'")
        try:
            fingerprint(fields["source"])
        except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:  # what ast.parse raises
            raise r.bad(f"{at}.source", f"it does not parse as Python ({type(exc).__name__}: {exc})") from None


def _check_text_or_null(r: _Reader, value: object, key: str) -> None:
    if value is not None:
        r.text(value, key)


def _check_text(r: _Reader, value: object, key: str) -> None:
    r.text(value, key)


def _check_surface(r: _Reader, value: object, key: str) -> None:
    from .surface import check_surface_json

    check_surface_json(value, key, r.bad)


_ENTRY_KEYS: dict[str, Callable[[_Reader, Any, str], None]] = {
    "vllm": _check_text,  # and its release must be the key: checked in _load
    "patch_version": _check_text_or_null,
    "patch_version_from": _check_text,
    "members": _check_members,
    "surface": _check_surface,
}
"""Every key one version's entry (format 2) may hold, with its check."""
_ENTRY_OPTIONAL: set[str] = {"surface"}
"""Keys of ``_ENTRY_KEYS`` an entry may lack (a key added after locks were written without it)."""


def _load(path: Path) -> dict[str, Any]:
    """The lock file's content in format 2, every part checked: a lock that would break a reader
    later (a version that is not PEP 440, a source that does not parse, a wrong type) is refused
    here, naming the file and the key.  A format-1 file is returned as format 2."""
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
    form = data.get("format")
    if not (type(form) is int and form in _READABLE):  # not True, not 1.0
        shown = json.dumps(form)[:40]
        if type(form) is int and form > _FORMAT:
            raise LockFileError(f'lock file {path} is in format {shown}, newer than this vllm-custom-patches reads '
                                f"(1 or 2): upgrade vllm-custom-patches, or {_FIX}")  # fmt: skip
        raise LockFileError(f'lock file {path} is not a lock file of format 1 or 2 ("format": {shown}); {_FIX}')

    from packaging.version import InvalidVersion, Version

    from .._core.versions import release_of

    r = _Reader(path)
    for patch, value in r.mapping(data.get("patches", _MISSING), "patches").items():
        where = f"patches[{patch!r}]"
        entry = r.mapping(value, where)
        r.text(entry.get("target", _MISSING), f"{where}.target")
        versions = r.mapping(entry.get("versions", _MISSING), f"{where}.versions")
        for version, locked in versions.items():
            at = f"{where}.versions[{version!r}]"
            try:
                Version(version)
            except InvalidVersion:
                raise r.bad(at, f"{version!r} is not a PEP 440 version") from None
            if form == 1:  # the version held its members, nothing else
                _check_members(r, locked, at)
                versions[version] = {"vllm": version, "patch_version": None,
                                     "patch_version_from": "not recorded (lock file format 1)", "members": locked}  # fmt: skip
                continue
            r.keys(r.mapping(locked, at), at, set(_ENTRY_KEYS) - _ENTRY_OPTIONAL, set(_ENTRY_KEYS))
            for key, check in _ENTRY_KEYS.items():
                if key in locked:
                    check(r, locked[key], f"{at}.{key}")
            if release_of(locked["vllm"]) != Version(version):
                raise r.bad(f"{at}.vllm", f"{locked['vllm']!r} is not a version of the release {version}")
    data["format"] = _FORMAT
    return data


def _versions(path: Path, patch: str, owner: str) -> dict[str, LockedVersion]:
    if not path.is_file():
        return {}
    entry = _load(path)["patches"].get(patch, {"versions": {}})
    return {
        version: LockedVersion(
            version,
            locked["vllm"],
            PatchVersion(locked["patch_version"], locked["patch_version_from"]),
            {member: LockedMember(**fields) for member, fields in locked["members"].items()},
            path,
            owner,
            locked,
        )
        for version, locked in entry["versions"].items()
    }


def read_locks(
    patch: str, module_file: str | os.PathLike[str] | None, lock_dir: str | os.PathLike[str] | None = None
) -> dict[str, LockedVersion]:
    """Every version ``patch`` is locked at: the lock shipped next to ``module_file`` and the one in
    ``lock_dir``; for a version both lock, the lock directory's entry wins (whole: its members,
    not a mix of both files).

    Raises :class:`LockFileError` for a lock file that is corrupt anywhere."""
    found = _versions(lock_path(module_file), patch, "package") if module_file is not None else {}
    if lock_dir is not None:
        found.update(_versions(user_lock_path(lock_dir, patch), patch, "user"))
    return found


def read_lock(module_file: str | os.PathLike[str] | None, patch: str) -> dict[str, dict[str, LockedMember]]:
    """``{vllm version: {member: LockedMember}}`` shipped next to ``module_file`` for ``patch``; empty without a lock."""
    return {version: dict(locked.members) for version, locked in read_locks(patch, module_file).items()}


def pick_version(locked: Mapping[str, object], checked: str) -> str | None:
    """The locked version to compare the checked vLLM with: the same one; else the newest below it,
    the release it comes from; else the oldest above it (a check of an older vLLM).

    Among :class:`LockedVersion` values, only those of a lock directory are considered when there
    are any: an ops team that locked a patch compares with what it reviewed, not with a newer
    version the patch's author locked."""
    from packaging.version import InvalidVersion, Version

    users = {v: x for v, x in locked.items() if isinstance(x, LockedVersion) and x.owner == "user"}
    locked = users or locked
    if not locked:
        return None
    if checked in locked:
        return checked
    try:
        at = Version(checked)
    except InvalidVersion:
        return max(locked, key=Version)
    below = [v for v in locked if Version(v) < at]
    return max(below, key=Version) if below else min(locked, key=Version)


def lock_entry(
    members: Mapping[str, LockedMember],
    *,
    vllm: str,
    patch: PatchVersion,
    surface: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One version's entry of a lock file, as :func:`write_lock` stores it (the keys ``_ENTRY_KEYS`` checks);
    ``surface``: the patch's dependency surface (``surface.surface_to_json``), where it was computed."""
    entry = {
        "vllm": vllm,
        "patch_version": patch.version,
        "patch_version_from": patch.source,
        "members": {
            name: {"fingerprint": m.fingerprint, "defined_in": m.defined_in, "source": m.source}
            for name, m in sorted(members.items())
        },
    }
    if surface is not None:
        entry["surface"] = dict(surface)
    return entry


def write_lock(path: str | os.PathLike[str], patch: str, target: str, version: str, entry: dict[str, Any]) -> Path:
    """Record ``entry`` (from :func:`lock_entry`) for ``patch`` under ``version`` in the lock file ``path``
    (other versions and patches are kept; a format-1 file is rewritten as format 2); the file written."""
    from packaging.version import InvalidVersion, Version

    path = Path(path)
    try:
        Version(version)
    except InvalidVersion:
        raise LockFileError(
            f"cannot lock against vLLM {version!r}: not a PEP 440 version; pass --vllm VERSION"
        ) from None
    # A corrupt lock is refused, not overwritten: what it held for other versions and patches would be lost.
    data: dict[str, Any] = _load(path) if path.is_file() else {"format": _FORMAT, "patches": {}}
    stored = data["patches"].setdefault(patch, {"target": target, "versions": {}})
    stored["target"] = target
    stored["versions"][version] = entry
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise LockFileError(
            f"cannot write lock file {path} ({type(exc).__name__}: {exc.strerror or exc}); keep your locks in a "
            "directory of yours: --lock-dir DIR or VLLM_CUSTOM_PATCHES_LOCK_DIR=DIR"
        ) from None
    return path
