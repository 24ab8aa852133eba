"""A patch's dependency surface: the vLLM state its code relies on, and the vLLM code that touches it too.

Member drift (``doctor``) tells that an original the patch replaces changed;
it cannot tell what the change means.  A scheduling policy that reorders
``self.waiting`` breaks silently when vLLM starts keeping part of its waiting
requests in another queue, or re-sorts ``self.waiting`` after the patch did,
though no member the patch replaces changed a line.  The surface is what such a
change shows up in, computed statically from the patch's code and the target's
source (never importing vLLM):

* **state**: the attributes of ``self`` (the target's instance) the patch reads
  or writes, in its members, its ``check_live`` hook and the helpers they call
  within the patch's own package, followed with their arguments (a helper
  ``require_fcfs_queue(scheduler)`` reads ``scheduler.waiting``: the patch reads
  ``self.waiting``).  Calling a method on the value (``self.waiting.clear()``),
  storing into it or rebinding it is a write; anything else a read.
  ``getattr(self, "x", default)`` and ``hasattr`` are optional reads.
* **calls**: target members the patch calls (``self.x(...)``,
  ``Patch.original("x")``, ``self._original_x``, ``super().x``).
* **members**: every member of the target and its bases (as the static
  reader resolves them) that touches that state, the way data dependences
  go: where the patch writes an attribute, every member that reads or writes
  it; where it only reads one, the members that write it (reported as info:
  an observer sees what vLLM did, whatever vLLM's code).  Members the patch
  replaces are left to member drift.
* **siblings**: for each attribute the patch uses that an ``__init__`` creates
  with a call (``self.waiting = create_request_queue(...)``), every other
  attribute created by the same call (``self.async_kv_waiting = ...``).
* **fields**: attributes the patch reads on values whose type an annotation
  names: the parameters of the members it overrides as the original annotates
  them (``scheduler_output: SchedulerOutput``), what an original returns
  (``-> SchedulerOutput``), the patch's own annotations; followed through
  fields (``scheduler_output.scheduled_cached_reqs.req_ids``) and iteration of
  annotated containers (``list[NewRequestData]``).  A field exists if a class
  in its hierarchy declares it (dataclass fields, annotations, members) or a
  method assigns it to ``self``.

:func:`compare` tells, between a baseline and a candidate surface, which
members newly touch the patch's state, which changed (with a diff) or are gone,
which attributes and fields the patch uses no longer exist (errors), and which
siblings appeared.  A surface is recorded in the lock (:func:`surface_to_json`)
so that a lock is a baseline by itself.

Limits (static reading): attributes reached only dynamically (``setattr`` with
a computed name, ``self.__dict__``), values the patch passes to code outside
its package (assumed to only read them), aliases beyond local names, and
subclasses of the target (``doctor``'s reach check covers their overrides) are
not seen; a member touching the state only through another member it calls is
found through that member, not itself.
"""

from __future__ import annotations

import ast
import difflib
import functools
import inspect
import sys
import types
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._core.graft import functions_of
from .static import SourceTree, StaticClass, StaticMember, fingerprint

__all__ = [
    "FieldUse",
    "StateUse",
    "Surface",
    "SurfaceFinding",
    "SurfaceMember",
    "check_surface_json",
    "compare",
    "compute_surface",
    "surface_from_json",
    "surface_to_json",
    "tree_of",
]

READ, WRITE = "read", "write"
_CONTAINERS = frozenset({"list", "List", "set", "Set", "frozenset", "FrozenSet", "Sequence", "MutableSequence",
                         "Iterable", "Iterator", "Collection", "AbstractSet", "MutableSet", "deque", "Deque",
                         "tuple", "Tuple"})  # fmt: skip
_UNWRAP = frozenset({"Optional", "Union", "Annotated", "ClassVar", "Final", "ReadOnly", "Required", "NotRequired"})
_MAX_PATH = 6  # attribute chains followed through typed fields


# -- the surface --------------------------------------------------------------------------


@dataclass(frozen=True)
class StateUse:
    """How the patch uses one attribute of ``self``, and whether that vLLM sets it."""

    mode: str
    """``read`` or ``write`` (a write may read too)."""
    optional: bool
    """Only through ``getattr`` with a default or ``hasattr``: the patch copes with its absence."""
    exists: bool
    """A member of the target's hierarchy, or assigned to ``self`` in one of its methods."""
    where: tuple[str, ...] = field(default=(), compare=False)
    """The patch's functions that use it (not recorded in a lock)."""


@dataclass(frozen=True)
class SurfaceMember:
    """A member of the target (or a base) whose code touches the patch's state, or that the patch calls."""

    defined_in: str
    fingerprint: str
    touches: Mapping[str, str]
    """Attribute of the patch's state -> ``read`` or ``write``, as this member uses it."""
    called: bool
    """The patch calls it."""
    source: str | None = field(default=None, compare=False)


@dataclass(frozen=True)
class FieldUse:
    """An attribute the patch reads on a value whose type an annotation names."""

    owner: str
    """``module:Qual`` of the annotated class."""
    attr: str
    exists: bool
    where: tuple[str, ...] = field(default=(), compare=False)


@dataclass(frozen=True)
class Surface:
    target: str
    state: Mapping[str, StateUse]
    members: Mapping[str, SurfaceMember]
    siblings: Mapping[str, tuple[str, tuple[str, ...]]]
    """Attribute of the state -> (the call its ``__init__`` creates it with, every attribute created so)."""
    fields: Mapping[str, FieldUse]
    """Access path (``_update_after_schedule(scheduler_output).num_scheduled_tokens``) -> its use."""
    overridden: frozenset[str] = frozenset()
    """The members the patch replaces (left to member drift)."""
    known: Mapping[str, str] = field(default_factory=dict)
    """Every member of the target's hierarchy -> its fingerprint: tells a new member from one that
    newly touches the state, and a member that changed from a patch that changed."""
    complete: bool = True
    """False where some of the patch's code could not be read (its source is not on disk)."""


@dataclass(frozen=True)
class SurfaceFinding:
    severity: str
    message: str
    member: str = ""
    detail: str = ""


# -- abstract values ----------------------------------------------------------------------
# A value is what the analysis knows of an expression: ("self",) the target's instance;
# ("state", attr) what self.attr holds; ("typed", owner, path) an instance of a vLLM class
# (owner "module:Qual"), reached by the access path; ("elems", owner, path) a container of
# them; ("original", member) the original of a member, not called yet; ("super",) super();
# ("obj", key) an instance of a class of the patch's own package.

Value = tuple[str, ...]
Values = set[Value]
SELF: Value = ("self",)


# Methods taken to leave their object as it is (the builtin containers' readers and common naming);
# any other method called on a piece of state may change it.
_READERS = frozenset({"get", "keys", "values", "items", "copy", "count", "index", "union", "intersection",
                      "difference", "symmetric_difference", "issubset", "issuperset", "isdisjoint", "startswith",
                      "endswith", "find", "format", "split", "join", "strip", "tolist", "peek"})  # fmt: skip
_READER_PREFIXES = ("get_", "peek_", "is_", "has_", "num_", "to_", "as_", "find_", "count_", "__")


def _reads_only(method: str) -> bool:
    return method in _READERS or method.startswith(_READER_PREFIXES)


def _mode(modes: Iterable[str]) -> str:
    return WRITE if WRITE in modes else READ


class _Walker:
    """Walks one function's body in statement order, tracking what local names hold (flow-insensitively)."""

    def __init__(self, env: dict[str, Values]) -> None:
        self.env = env
        self.returns: Values = set()

    # Hooks: what the two analyses (vLLM's members, the patch's code) record and follow.
    def on_access(self, attr: str, mode: str, optional: bool = False) -> None:
        pass

    def on_call(self, member: str) -> None:
        pass

    def on_create(self, attr: str, call: ast.Call) -> None:
        pass

    def typed_attr(self, value: Value, attr: str) -> Values:
        return set()

    def member_result(self, member: str) -> Values:
        return set()

    def self_method(self, member: str, args: list[Values], kwargs: dict[str, Values]) -> Values | None:
        """``self.member(...)`` where the patch defines ``member``: followed; ``None`` otherwise."""
        return None

    def follow(self, node: ast.Call, args: list[Values], kwargs: dict[str, Values]) -> Values | None:
        return None

    def object_method(self, obj: Value, member: str, args: list[Values], kwargs: dict[str, Values]) -> Values:
        return set()

    def annotated(self, annotation: ast.expr, name: str) -> Values:
        return set()

    # The walk.
    def body(self, stmts: Iterable[ast.stmt]) -> None:
        for stmt in stmts:
            self.stmt(stmt)

    def stmt(self, node: ast.stmt) -> None:
        if isinstance(node, ast.Assign):
            values = self.expr(node.value)
            for target in node.targets:
                self.store(target, values, node.value)
        elif isinstance(node, ast.AnnAssign):
            values = self.expr(node.value) if node.value is not None else set()
            if isinstance(node.target, ast.Name):
                values |= self.annotated(node.annotation, node.target.id)
            if node.value is not None or isinstance(node.target, ast.Name):
                self.store(node.target, values, node.value)
        elif isinstance(node, ast.AugAssign):
            self.expr(node.value)
            self.store(node.target, set(), None, augmented=True)
        elif isinstance(node, ast.Delete):
            for target in node.targets:
                self.store(target, set(), None)
        elif isinstance(node, (ast.For, ast.AsyncFor)):
            self.store(node.target, self.elements(self.expr(node.iter)), None)
            self.body(node.body)
            self.body(node.orelse)
        elif isinstance(node, ast.Return):
            if node.value is not None:
                self.returns |= self.expr(node.value)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for deco in node.decorator_list:
                self.expr(deco)
            self.body(node.body)  # a closure: it sees this function's names
        elif isinstance(node, ast.ClassDef):
            pass
        elif isinstance(node, (ast.With, ast.AsyncWith)):
            for item in node.items:
                values = self.expr(item.context_expr)
                if item.optional_vars is not None:
                    self.store(item.optional_vars, values, None)
            self.body(node.body)
        else:
            self.generic(node)

    def generic(self, node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.stmt):
                self.stmt(child)
            elif isinstance(child, ast.expr):
                self.expr(child)
            else:
                self.generic(child)

    def store(self, target: ast.expr, values: Values, value: ast.expr | None, augmented: bool = False) -> None:
        if isinstance(target, ast.Name):
            self.env.setdefault(target.id, set()).update(values)
        elif isinstance(target, ast.Attribute):
            base = self.expr(target.value)
            if SELF in base:
                if augmented:
                    self.on_access(target.attr, READ)
                self.on_access(target.attr, WRITE)
                if isinstance(value, ast.Call):
                    self.on_create(target.attr, value)
            self._mutates(base)
        elif isinstance(target, ast.Subscript):
            self._mutates(self.expr(target.value))
            self.expr(target.slice)
        elif isinstance(target, (ast.Tuple, ast.List)):
            for elt in target.elts:
                self.store(elt, set(), None)
        elif isinstance(target, ast.Starred):
            self.store(target.value, set(), None)

    def _mutates(self, base: Values) -> None:
        for value in base:
            if value[0] == "state":
                self.on_access(value[1], WRITE)

    def elements(self, values: Values) -> Values:
        return {("typed", v[1], v[2] + "[]") for v in values if v[0] == "elems"}

    def expr(self, node: ast.expr | None) -> Values:
        if node is None:
            return set()
        if isinstance(node, ast.Name):
            return set(self.env.get(node.id, ()))
        if isinstance(node, ast.Attribute):
            return self.attribute(node)
        if isinstance(node, ast.Call):
            return self.call(node)
        if isinstance(node, ast.IfExp):
            self.expr(node.test)
            return self.expr(node.body) | self.expr(node.orelse)
        if isinstance(node, ast.BoolOp):
            return set().union(*(self.expr(v) for v in node.values))
        if isinstance(node, ast.NamedExpr):
            values = self.expr(node.value)
            self.store(node.target, values, node.value)
            return values
        if isinstance(node, (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)):
            for gen in node.generators:
                self.store(gen.target, self.elements(self.expr(gen.iter)), None)
                for cond in gen.ifs:
                    self.expr(cond)
            if isinstance(node, ast.DictComp):
                self.expr(node.key)
                self.expr(node.value)
            else:
                self.expr(node.elt)
            return set()
        if isinstance(node, ast.Subscript):
            base = self.expr(node.value)
            self.expr(node.slice)
            return self.elements(base)
        if isinstance(node, (ast.Await, ast.Starred)):
            return self.expr(node.value)
        if isinstance(node, ast.Lambda):
            self.expr(node.body)
            return set()
        self.generic(node)
        return set()

    def attribute(self, node: ast.Attribute) -> Values:
        base = self.expr(node.value)
        out: Values = set()
        if SELF in base:
            if node.attr.startswith("_original_") and len(node.attr) > len("_original_"):
                out.add(("original", node.attr[len("_original_") :]))
            else:
                self.on_access(node.attr, READ)
                out.add(("state", node.attr))
        if ("super",) in base:
            out.add(("original", node.attr))
        for value in base:
            if value[0] == "typed":
                out |= self.typed_attr(value, node.attr)
        return out

    def call(self, node: ast.Call) -> Values:
        func = node.func
        # X.original("member"): the original, called later.
        if (
            isinstance(func, ast.Attribute)
            and func.attr == "original"
            and len(node.args) == 1
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            self.expr(func.value)
            return {("original", node.args[0].value)}
        if isinstance(func, ast.Name) and func.id in ("getattr", "hasattr", "setattr", "delattr"):
            found = self._reflection(func.id, node)
            if found is not None:
                return found
        if isinstance(func, ast.Name) and func.id == "super":
            for arg in node.args:
                self.expr(arg)
            return {("super",)}
        if isinstance(func, ast.Attribute):
            base = self.expr(func.value)
            args, kwargs = self._arguments(node)
            out: Values = set()
            if SELF in base:
                name = func.attr
                if name.startswith("_original_") and len(name) > len("_original_"):
                    name = name[len("_original_") :]
                    self.on_call(name)
                    return self.member_result(name)
                followed = self.self_method(name, args, kwargs)
                if followed is not None:
                    return followed
                self.on_call(name)
                out |= self.member_result(name)
            if ("super",) in base:
                self.on_call(func.attr)
                out |= self.member_result(func.attr)
            for value in base:
                if value[0] == "state":
                    self.on_access(value[1], READ if _reads_only(func.attr) else WRITE)
                elif value[0] == "typed":
                    self.typed_attr(value, func.attr)
                elif value[0] == "obj":
                    out |= self.object_method(value, func.attr, args, kwargs)
            return out
        callee = self.expr(func)
        args, kwargs = self._arguments(node)
        out = set()
        for value in callee:
            if value[0] == "original":
                self.on_call(value[1])
                out |= self.member_result(value[1])
        followed = self.follow(node, args, kwargs)
        return out | (followed or set())

    def _arguments(self, node: ast.Call) -> tuple[list[Values], dict[str, Values]]:
        args = [self.expr(a) for a in node.args]
        kwargs: dict[str, Values] = {}
        for kw in node.keywords:
            values = self.expr(kw.value)
            if kw.arg is not None:
                kwargs[kw.arg] = values
        return args, kwargs

    def _reflection(self, name: str, node: ast.Call) -> Values | None:
        if len(node.args) < 2 or not (isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
            return None
        attr = node.args[1].value
        base = self.expr(node.args[0])
        for arg in node.args[2:]:
            self.expr(arg)
        out: Values = set()
        if SELF in base:
            if name in ("setattr", "delattr"):
                self.on_access(attr, WRITE)
            else:
                self.on_access(attr, READ, optional=name == "hasattr" or len(node.args) > 2)
                if name == "getattr":
                    out.add(("state", attr))
        if name == "getattr" and len(node.args) == 2:
            for value in base:
                if value[0] == "typed":
                    out |= self.typed_attr(value, attr)
        return out


def _bind(
    node: ast.FunctionDef | ast.AsyncFunctionDef, args: list[Values], kwargs: dict[str, Values]
) -> dict[str, Values]:
    """The walker's starting names for a call of ``node`` with these argument values."""
    params = [*node.args.posonlyargs, *node.args.args]
    env: dict[str, Values] = {p.arg: set(values) for p, values in zip(params, args, strict=False)}
    for p in [*params, *node.args.kwonlyargs]:
        if p.arg in kwargs:
            env.setdefault(p.arg, set()).update(kwargs[p.arg])
    return env


def _first_param(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str | None:
    params = [*node.args.posonlyargs, *node.args.args]
    return params[0].arg if params else None


# -- vLLM's side: what each member of the target touches -----------------------------------


@dataclass
class _MemberFacts:
    owner: StaticClass
    member: StaticMember
    touches: dict[str, set[str]] = field(default_factory=dict)
    calls: set[str] = field(default_factory=set)
    creates: dict[str, str] = field(default_factory=dict)
    """``self.attr = call(...)``: attr -> the call's function as written."""

    @property
    def defined_in(self) -> str:
        return f"{self.owner.module}:{self.owner.qualname}"

    @functools.cached_property
    def fingerprint(self) -> str:
        return fingerprint(self.member.source)


class _MemberWalker(_Walker):
    def __init__(self, facts: _MemberFacts, env: dict[str, Values]) -> None:
        super().__init__(env)
        self.facts = facts

    def on_access(self, attr: str, mode: str, optional: bool = False) -> None:
        self.facts.touches.setdefault(attr, set()).add(mode)

    def on_call(self, member: str) -> None:
        self.facts.calls.add(member)

    def on_create(self, attr: str, call: ast.Call) -> None:
        self.facts.creates.setdefault(attr, ast.unparse(call.func))


@dataclass
class _ClassFacts:
    cls: StaticClass
    lineage: list[StaticClass]
    members: dict[str, _MemberFacts]
    """The members an instance sees (most derived first), with what their code touches."""
    assigned: set[str]
    """Attributes assigned to ``self`` by any method of the hierarchy."""
    creates: list[tuple[str, str, str]]
    """(attribute, call as written, defining class) of each ``self.x = call(...)`` in an ``__init__``."""
    dynamic: bool
    """The hierarchy defines ``__getattr__``: any attribute may exist."""

    def has(self, attr: str) -> bool:
        return self.dynamic or attr in self.assigned or attr in self.members

    def callable_member(self, attr: str) -> bool:
        facts = self.members.get(attr)
        return facts is not None and facts.member.kind in ("function", "async function", "staticmethod", "classmethod")


def _analyse_member(owner: StaticClass, member: StaticMember) -> _MemberFacts:
    facts = _MemberFacts(owner, member)
    node = member.node
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        first = _first_param(node) if member.kind != "staticmethod" else None
        _MemberWalker(facts, {first: {SELF}} if first else {}).body(node.body)
    return facts


_CLASS_FACTS: weakref.WeakKeyDictionary[SourceTree, dict[str, _ClassFacts | None]] = weakref.WeakKeyDictionary()


def _class_facts(tree: SourceTree, label: str) -> _ClassFacts | None:
    """What the class ``label`` (``module:Qual``) holds in ``tree``, member by member; cached per tree."""
    cache = _CLASS_FACTS.setdefault(tree, {})
    if label not in cache:
        cls = tree.find_class(label)
        cache[label] = None if cls is None else _build_class_facts(tree, cls)
    return cache[label]


def _build_class_facts(tree: SourceTree, cls: StaticClass) -> _ClassFacts:
    mro = tree.mro(cls)
    members: dict[str, _MemberFacts] = {}
    assigned: set[str] = set()
    creates: list[tuple[str, str, str]] = []
    for klass in mro:
        for name, member in klass.members.items():
            facts = _analyse_member(klass, member)
            members.setdefault(name, facts)  # the most derived definition is the one an instance sees
            assigned |= {attr for attr, modes in facts.touches.items() if WRITE in modes}
            if name == "__init__":
                creates += [(attr, call, f"{klass.module}:{klass.qualname}") for attr, call in facts.creates.items()]
    dynamic = any("__getattr__" in k.members for k in mro)
    return _ClassFacts(cls, mro, members, assigned, creates, dynamic)


def _annotation_classes(
    annotation: ast.expr | None, resolve: Callable[[str], StaticClass | None]
) -> Iterator[tuple[str, StaticClass]]:
    """``("typed", cls)`` or ``("elems", cls)`` for each class an annotation names (``X | None``,
    ``Optional[X]``, ``list[X]``, ``"X"``)."""
    if annotation is None:
        return
    if isinstance(annotation, ast.Constant) and isinstance(annotation.value, str):
        try:
            parsed = ast.parse(annotation.value, mode="eval").body
        except SyntaxError:
            return
        yield from _annotation_classes(parsed, resolve)
    elif isinstance(annotation, ast.BinOp) and isinstance(annotation.op, ast.BitOr):
        yield from _annotation_classes(annotation.left, resolve)
        yield from _annotation_classes(annotation.right, resolve)
    elif isinstance(annotation, ast.Subscript):
        name = (_dotted(annotation.value) or "").rpartition(".")[2]
        args = annotation.slice.elts if isinstance(annotation.slice, ast.Tuple) else [annotation.slice]
        if name in _UNWRAP:
            for arg in args[:1] if name == "Annotated" else args:
                yield from _annotation_classes(arg, resolve)
        elif name in _CONTAINERS and args:
            for kind, cls in _annotation_classes(args[0], resolve):
                if kind == "typed":
                    yield ("elems", cls)
        else:
            yield from _annotation_classes(annotation.value, resolve)
    elif (dotted := _dotted(annotation)) is not None:
        found = resolve(dotted)
        if found is not None:
            yield ("typed", found)


def _dotted(expr: ast.expr) -> str | None:
    if isinstance(expr, ast.Attribute):
        return None if (head := _dotted(expr.value)) is None else f"{head}.{expr.attr}"
    return expr.id if isinstance(expr, ast.Name) else None


def _label(cls: StaticClass) -> str:
    return f"{cls.module}:{cls.qualname}"


def _tree_resolver(tree: SourceTree, module: str, line: int | None = None) -> Callable[[str], StaticClass | None]:
    def resolve(dotted: str) -> StaticClass | None:
        return tree.resolve_class(module, dotted, line)

    return resolve


def _typed(kind: str, cls: StaticClass, path: str) -> Value:
    return (kind, _label(cls), path)


# -- the patch's side ----------------------------------------------------------------------


@dataclass
class _Use:
    modes: set[str] = field(default_factory=set)
    optional: bool = True
    where: set[str] = field(default_factory=set)


@dataclass
class _Record:
    """What the patch's code does, collected over every function followed."""

    state: dict[str, _Use] = field(default_factory=dict)
    calls: dict[str, set[str]] = field(default_factory=dict)
    fields: dict[str, FieldUse] = field(default_factory=dict)
    unread: list[str] = field(default_factory=list)
    """Functions whose source could not be read."""
    read: int = 0
    """Functions read."""


class _Source:
    """The syntax trees of the patch's files, parsed once."""

    def __init__(self) -> None:
        self._files: dict[str, ast.Module | None] = {}

    def module(self, filename: str) -> ast.Module | None:
        if filename not in self._files:
            try:
                self._files[filename] = ast.parse(Path(filename).read_text(encoding="utf-8"), filename)
            except (OSError, SyntaxError, ValueError, UnicodeDecodeError):
                self._files[filename] = None
        return self._files[filename]

    def function(self, func: types.FunctionType) -> ast.FunctionDef | ast.AsyncFunctionDef | None:
        code = func.__code__
        tree = self.module(code.co_filename)
        if tree is None:
            return None
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == code.co_name:
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                if code.co_firstlineno in (first, node.lineno):
                    return node
        return None

    def imports(self, module: types.ModuleType) -> dict[str, str]:
        """Name -> dotted path for every import in ``module`` (``if TYPE_CHECKING:`` ones included)."""
        tree = self.module(getattr(module, "__file__", None) or "")
        found: dict[str, str] = {}
        if tree is None:
            return found
        package = module.__name__ if hasattr(module, "__path__") else module.__name__.rpartition(".")[0]
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    found[alias.asname or alias.name.partition(".")[0]] = (
                        alias.name if alias.asname else alias.name.partition(".")[0]
                    )
            elif isinstance(node, ast.ImportFrom):
                parts = package.split(".") if package else []
                base = parts[: len(parts) - node.level + 1] if node.level else []
                prefix = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:
                    if alias.name != "*":
                        found[alias.asname or alias.name] = f"{prefix}.{alias.name}"
        return found


class _PatchAnalysis:
    """Follows the patch's code from its members into the helpers of its own package."""

    def __init__(self, patch_cls: type, tree: SourceTree, target: _ClassFacts) -> None:
        self.patch_cls = patch_cls
        self.tree = tree
        self.target = target
        self.record = _Record()
        self.source = _Source()
        spec = patch_cls._vcp_spec  # type: ignore[attr-defined]
        self.members: dict[str, object] = dict(spec.members)
        module = patch_cls.__module__
        self.package = module.partition(".")[0]
        self._memo: dict[tuple[int, tuple[tuple[str, frozenset[Value]], ...]], Values] = {}
        self._imports: dict[str, dict[str, str]] = {}
        self.classes: dict[str, type] = {}
        """The patch package's classes instantiated in its code, by ``module.Qual``."""

    def run(self) -> None:
        for name, member in self.members.items():
            for func in functions_of(member):
                args = [] if isinstance(member, staticmethod) else [{SELF}]
                self.call_function(func, args, {}, typed_params=name if not isinstance(member, staticmethod) else None)
        live = vars(self.patch_cls).get("check_live")
        if isinstance(live, classmethod) and isinstance(live.__func__, types.FunctionType):
            self.call_function(live.__func__, [set(), {SELF}], {})

    def within(self, obj: object) -> bool:
        module = getattr(obj, "__module__", None) or ""
        return module.partition(".")[0] == self.package and not module.startswith("vllm_custom_patches.")

    def call_function(
        self, func: types.FunctionType, args: list[Values], kwargs: dict[str, Values], typed_params: str | None = None
    ) -> Values:
        unwrapped = inspect.unwrap(func)
        func = unwrapped if isinstance(unwrapped, types.FunctionType) else func
        node = self.source.function(func)
        where = func.__qualname__
        if node is None:
            self.record.unread.append(f"{func.__module__}.{where}")
            return set()
        self.record.read += 1
        env = _bind(node, args, kwargs)
        if typed_params is not None:
            self._typed_parameters(node, typed_params, env, func)
        key = (id(node), tuple(sorted((k, frozenset(v)) for k, v in env.items())))
        if key in self._memo:
            return self._memo[key]
        self._memo[key] = set()  # a recursive call sees nothing more
        walker = _PatchWalker(self, func, where, env)
        walker.body(node.body)
        self._memo[key] = walker.returns
        return walker.returns

    def _typed_parameters(
        self,
        node: ast.FunctionDef | ast.AsyncFunctionDef,
        member: str,
        env: dict[str, Values],
        func: types.FunctionType,
    ) -> None:
        """The parameters of a member that replaces an original, typed as the original annotates them
        (else as the patch does)."""
        mine = [*node.args.posonlyargs, *node.args.args][1:]
        facts = self.target.members.get(member)
        theirs: list[ast.arg] = []
        resolve_theirs: Callable[[str], StaticClass | None] | None = None
        if facts is not None and isinstance(facts.member.node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            original = facts.member.node
            theirs = [*original.args.posonlyargs, *original.args.args][1:]
            resolve_theirs = _tree_resolver(self.tree, facts.owner.module)
        by_name = {a.arg: a for a in theirs}
        for i, param in enumerate(mine):
            other = theirs[i] if i < len(theirs) else by_name.get(param.arg)
            path = f"{member}({param.arg})"
            found: list[tuple[str, StaticClass]] = []
            if other is not None and resolve_theirs is not None:
                found = list(_annotation_classes(other.annotation, resolve_theirs))
            if not found:
                found = list(_annotation_classes(param.annotation, self.resolver(func)))
            env.setdefault(param.arg, set()).update(_typed(kind, cls, path) for kind, cls in found)

    def resolver(self, func: types.FunctionType) -> Callable[[str], StaticClass | None]:
        module = sys.modules.get(func.__module__)
        if module is None:
            return lambda dotted: None
        if module.__name__ not in self._imports:
            self._imports[module.__name__] = self.source.imports(module)
        imports = self._imports[module.__name__]

        def resolve(dotted: str) -> StaticClass | None:
            head, _, rest = dotted.partition(".")
            full = imports.get(head)
            return None if full is None else self.tree.class_named(f"{full}.{rest}" if rest else full)

        return resolve

    def access(self, attr: str, mode: str, optional: bool, where: str) -> None:
        if attr.startswith("__") and attr.endswith("__"):
            return
        if mode == READ and self.target.callable_member(attr) and attr not in self.members:
            self.record.calls.setdefault(attr, set()).add(where)  # a bound method taken, not state
            return
        use = self.record.state.setdefault(attr, _Use())
        use.modes.add(mode)
        use.optional = use.optional and optional
        use.where.add(where)

    def typed_attr(self, value: Value, attr: str, where: str) -> Values:
        _, owner, path = value
        if path.count(".") >= _MAX_PATH:
            return set()
        facts = _class_facts(self.tree, owner)
        if facts is None:
            return set()
        new_path = f"{path}.{attr}"
        known = self.record.fields.get(new_path)
        self.record.fields[new_path] = FieldUse(
            owner, attr, facts.has(attr), tuple(sorted({where, *(known.where if known else ())}))
        )
        return {_typed(kind, cls, new_path) for kind, cls in self.field_types(facts, attr)}

    def field_types(self, facts: _ClassFacts, attr: str) -> Iterator[tuple[str, StaticClass]]:
        for klass in facts.lineage:
            member = klass.members.get(attr)
            if member is None:
                continue
            node = member.node
            annotation: ast.expr | None = None
            if isinstance(node, ast.AnnAssign):
                annotation = node.annotation
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and member.kind == "property":
                annotation = node.returns
            yield from _annotation_classes(annotation, _tree_resolver(self.tree, klass.module))
            return

    def member_result(self, member: str) -> Values:
        """What calling the target's ``member`` returns, as its annotation says."""
        facts = self.target.members.get(member)
        node = facts.member.node if facts else None
        if facts is None or not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return set()
        resolve = _tree_resolver(self.tree, facts.owner.module)
        return {_typed(kind, cls, f"{member}()") for kind, cls in _annotation_classes(node.returns, resolve)}


class _PatchWalker(_Walker):
    def __init__(self, analysis: _PatchAnalysis, func: types.FunctionType, where: str, env: dict[str, Values]) -> None:
        super().__init__(env)
        self.analysis = analysis
        self.func = func
        self.where = where

    def on_access(self, attr: str, mode: str, optional: bool = False) -> None:
        self.analysis.access(attr, mode, optional, self.where)

    def on_call(self, member: str) -> None:
        self.analysis.record.calls.setdefault(member, set()).add(self.where)

    def typed_attr(self, value: Value, attr: str) -> Values:
        return self.analysis.typed_attr(value, attr, self.where)

    def member_result(self, member: str) -> Values:
        return self.analysis.member_result(member)

    def self_method(self, member: str, args: list[Values], kwargs: dict[str, Values]) -> Values | None:
        if member not in self.analysis.members:
            return None
        out: Values = set()
        raw = self.analysis.members[member]
        for func in functions_of(raw):
            bound = [set(), *args] if isinstance(raw, classmethod) else [{SELF}, *args]
            out |= self.analysis.call_function(func, args if isinstance(raw, staticmethod) else bound, kwargs)
        return out

    def follow(self, node: ast.Call, args: list[Values], kwargs: dict[str, Values]) -> Values | None:
        obj = self._runtime(node.func)
        if obj is None or not self.analysis.within(obj):
            return None
        if isinstance(obj, types.FunctionType):
            return self.analysis.call_function(obj, args, kwargs)
        if isinstance(obj, type):
            key = f"{obj.__module__}.{obj.__qualname__}"
            self.analysis.classes[key] = obj
            instance: Value = ("obj", key)
            self.object_method(instance, "__init__", args, kwargs)
            return {instance}
        return None

    def object_method(self, obj: Value, member: str, args: list[Values], kwargs: dict[str, Values]) -> Values:
        cls = self.analysis.classes.get(obj[1])
        raw = inspect.getattr_static(cls, member, None) if cls is not None else None
        out: Values = set()
        if raw is None or not self.analysis.within(next(functions_of(raw), None)):
            return out
        for func in functions_of(raw):
            if isinstance(raw, staticmethod):
                out |= self.analysis.call_function(func, args, kwargs)
            else:
                out |= self.analysis.call_function(
                    func, [set() if isinstance(raw, classmethod) else {obj}, *args], kwargs
                )
        return out

    def annotated(self, annotation: ast.expr, name: str) -> Values:
        path = f"{self.where}:{name}"
        return {
            _typed(kind, cls, path) for kind, cls in _annotation_classes(annotation, self.analysis.resolver(self.func))
        }

    def _runtime(self, expr: ast.expr) -> object:
        """What a name or dotted name in the function means at run time (its module's globals), or None."""
        if isinstance(expr, ast.Name):
            return self.func.__globals__.get(expr.id)
        if isinstance(expr, ast.Attribute):
            base = self._runtime(expr.value)
            if isinstance(base, (types.ModuleType, type)):
                try:
                    return inspect.getattr_static(base, expr.attr)
                except AttributeError:
                    return None
        return None


# -- which source ---------------------------------------------------------------------------

_INSTALLED: dict[Path, SourceTree] = {}


def tree_of(view: object, target: str) -> SourceTree | None:
    """The source a view of vLLM reads ``target`` (``module:Qual``) from: a static view's tree, or for
    the installed vLLM the directory its top-level package is installed in, read the same way
    (never imported); ``None`` where there is none."""
    tree = getattr(view, "tree", None)
    if isinstance(tree, SourceTree):
        return tree
    import importlib.util

    top = target.partition(":")[0].partition(".")[0]
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None or not spec.has_location:
        return None
    origin = Path(spec.origin)
    root = origin.parent.parent if origin.name == "__init__.py" else origin.parent
    if root not in _INSTALLED:
        _INSTALLED[root] = SourceTree(root)
    return _INSTALLED[root]


# -- computing and comparing surfaces ------------------------------------------------------


def compute_surface(patch_cls: type, tree: SourceTree, keep: Iterable[str] = ()) -> Surface | None:
    """The surface of ``patch_cls`` against the vLLM in ``tree``; ``None`` where the target is not there, or
    none of the patch's code has its source on disk.

    ``keep``: members to describe even where they do not touch the patch's state (those a
    baseline had), so that a comparison sees what became of them."""
    spec = patch_cls._vcp_spec  # type: ignore[attr-defined]
    target = _class_facts(tree, spec.target_label)
    if target is None:
        return None
    analysis = _PatchAnalysis(patch_cls, tree, target)
    analysis.run()
    record = analysis.record
    if record.unread and not record.read:
        return None  # no source on disk at all (code made by exec): nothing to say
    own = set(analysis.members)
    state = {
        attr: StateUse(_mode(use.modes), use.optional, target.has(attr), tuple(sorted(use.where)))
        for attr, use in sorted(record.state.items())
        if attr not in own
    }
    overridden = frozenset(name for name in own if name in target.members)
    writes = {attr for attr, use in state.items() if use.mode == WRITE and use.exists}
    keep = set(keep)
    members: dict[str, SurfaceMember] = {}
    for name, facts in target.members.items():
        if name in overridden:
            continue
        touches = {attr: _mode(modes) for attr, modes in facts.touches.items() if attr in state and state[attr].exists}
        called = name in record.calls
        strong = called or any(attr in writes for attr in touches)
        weak = any(mode == WRITE for mode in touches.values())
        if strong or weak or name in keep:
            source = facts.member.source
            members[name] = SurfaceMember(facts.defined_in, facts.fingerprint, touches, called,
                                          source if strong or name in keep else None)  # fmt: skip
    siblings: dict[str, tuple[str, tuple[str, ...]]] = {}
    for attr in state:
        call = next((c for a, c, _ in target.creates if a == attr), None)
        if call is not None:
            siblings[attr] = (call, tuple(sorted({a for a, c, _ in target.creates if c == call})))
    return Surface(
        spec.target_label,
        state,
        dict(sorted(members.items())),
        siblings,
        dict(sorted(record.fields.items())),
        overridden,
        known={name: facts.fingerprint for name, facts in sorted(target.members.items())},
        complete=not record.unread,
    )


def _verb(mode: str) -> str:
    return "writes" if mode == WRITE else "reads"


def _where(where: Iterable[str]) -> str:
    shown = sorted(where)
    return f" (in {', '.join(shown[:3])}{', ...' if len(shown) > 3 else ''})" if shown else ""


def _lines(source: str) -> list[str]:
    return (source if source.endswith("\n") else source + "\n").splitlines(True)


def _diff(name: str, before: str | None, after: str | None, base_label: str, label: str) -> str:
    if before is None or after is None:
        return ""
    return "".join(difflib.unified_diff(_lines(before), _lines(after), f"{name} ({base_label})", f"{name} ({label})"))


def _coupling(member: SurfaceMember, state: Mapping[str, StateUse]) -> dict[str, str]:
    """What of ``member``'s use of the state matters to the patch: where either side writes."""
    return {
        attr: mode
        for attr, mode in sorted(member.touches.items())
        if attr in state and state[attr].exists and WRITE in (mode, state[attr].mode)
    }


def _describe(member: SurfaceMember, state: Mapping[str, StateUse]) -> str:
    """``writes self.a, self.b; reads self.c (the patch writes self.a; reads self.b, self.c)``."""
    coupled = _coupling(member, state)

    def grouped(modes: Mapping[str, str]) -> str:
        groups = {m: [f"self.{a}" for a, mode in modes.items() if mode == m] for m in (WRITE, READ)}
        return "; ".join(f"{_verb(m)} {', '.join(attrs)}" for m, attrs in groups.items() if attrs)

    text = f"{grouped(coupled)} (the patch {grouped({a: state[a].mode for a in coupled})})" if coupled else ""
    if member.called:
        text += ("; " if text else "") + "the patch calls it"
    return text


def compare(base: Surface, surface: Surface, *, base_label: str, label: str, locked: bool) -> list[SurfaceFinding]:
    """What changed from ``base`` (a lock's surface, or one computed from the baseline vLLM) to
    ``surface`` (the checked vLLM, with the patch's code as it is now; computed with ``keep`` =
    ``base``'s members).  Severity as for member drift: an error where ``locked``, else a warning;
    a member that only writes what the patch only reads is info (an observer sees what vLLM did);
    attributes and fields that no longer exist, and members the patch calls that are gone, are errors."""
    out: list[SurfaceFinding] = []
    drift = "error" if locked else "warning"
    cls = surface.target.rpartition(":")[2]
    state = surface.state
    for attr, use in state.items():
        before = base.state.get(attr)
        if before is not None and before.exists and not use.exists:
            out.append(SurfaceFinding("warning" if use.optional else "error",
                                      f"self.{attr}, which the patch {_verb(use.mode)}{_where(use.where)}, is set "
                                      f"nowhere in {cls} or its bases on {label} (it was on {base_label}): renamed or "
                                      "removed", attr))  # fmt: skip

    def level(*members: SurfaceMember | None) -> str | None:
        found = [m for m in members if m is not None]
        if any(m.called for m in found):
            return drift
        coupled = [a for m in found for a in _coupling(m, state)]
        if any(state[a].mode == WRITE for a in coupled):
            return drift
        return "info" if coupled else None

    for name in sorted(set(base.members) | set(surface.members)):
        old, new = base.members.get(name), surface.members.get(name)
        severity = level(old, new)
        if severity is None:
            continue
        if new is None:
            assert old is not None
            out.append(SurfaceFinding("error" if old.called else severity,
                                      f"{cls}.{name}, which {_describe(old, state)} on {base_label}, is gone on {label}",
                                      name))  # fmt: skip
        elif old is None:
            if base.known and name not in base.known:
                text = f"{cls}.{name} is new since {base_label}: it {_describe(new, state)}"
            elif base.known.get(name) == new.fingerprint:
                # vLLM's code is the same: the patch's use of the state changed since the baseline.
                severity = "info"
                text = (f"{cls}.{name} {_describe(new, state)}: the patch's use of it is not in the surface of "
                        f"{base_label} (lock again to record it)")  # fmt: skip
            else:
                text = f"{cls}.{name} now {_describe(new, state)} (it did not on {base_label})"
            out.append(SurfaceFinding(severity, text, name, new.source or ""))
        elif old.fingerprint != new.fingerprint or _coupling(old, state) != _coupling(new, state):
            was, now = _coupling(old, state), _coupling(new, state)
            notes = [f"now {_verb(m)} self.{a}" for a, m in now.items() if was.get(a) != m]
            notes += [f"no longer touches self.{a}" for a in was if a not in now]
            if new.defined_in != old.defined_in:
                notes.append(f"now defined in {new.defined_in}")
            what = "changed" if old.fingerprint != new.fingerprint else "uses the state differently"
            text = f"{cls}.{name}, which {_describe(new, state) or _describe(old, state)}, {what} since {base_label}"
            text += f" ({'; '.join(notes)})" if notes else ""
            out.append(SurfaceFinding(severity, text, name, _diff(name, old.source, new.source, base_label, label)))
    appeared: dict[str, list[str]] = {}
    calls: dict[str, str] = {}
    for attr, (call, attrs) in sorted(surface.siblings.items()):
        if attr in base.siblings and attr in state:
            for sibling in sorted(set(attrs) - set(base.siblings[attr][1]) - {attr}):
                appeared.setdefault(sibling, []).append(attr)
                calls[sibling] = call
    for sibling, used in appeared.items():
        uses = " and ".join(f"self.{a}" for a in used)
        modes = {state[a].mode for a in used}
        if sibling in state and state[sibling].exists:
            severity, note = "info", f"the patch uses self.{sibling} too"
        else:
            severity = drift
            note = f"the patch {_verb(_mode(modes))} {uses} only, so what vLLM keeps in self.{sibling} escapes it"
        out.append(SurfaceFinding(severity, f"a sibling of {uses} appeared: {cls} creates self.{sibling} with "
                                  f"{calls[sibling]}(...) in __init__, as it does {uses} (not on {base_label}); {note}",
                                  sibling))  # fmt: skip
    for path, field_use in surface.fields.items():
        before_use = base.fields.get(path)
        if before_use is not None and before_use.exists and not field_use.exists:
            owner = field_use.owner.rpartition(":")[2]
            out.append(SurfaceFinding("error", f"the patch reads {path}{_where(field_use.where)}: {owner} has no "
                                      f"field {field_use.attr!r} on {label} (it had on {base_label})",
                                      field_use.attr))  # fmt: skip
    if not surface.complete:
        out.append(SurfaceFinding("info", "part of the patch's code has no source on disk: its surface is partial"))
    return out


# -- the lock's part -------------------------------------------------------------------------


def surface_to_json(surface: Surface) -> dict[str, Any]:
    """The surface as a lock entry records it."""
    return {
        "state": {a: {"mode": u.mode, "optional": u.optional, "exists": u.exists} for a, u in surface.state.items()},
        "members": {
            name: {
                "defined_in": m.defined_in,
                "fingerprint": m.fingerprint,
                "touches": dict(sorted(m.touches.items())),
                "called": m.called,
                "source": m.source,
            }
            for name, m in surface.members.items()
        },
        "siblings": {a: {"call": call, "attributes": list(attrs)} for a, (call, attrs) in surface.siblings.items()},
        "fields": {p: {"owner": f.owner, "attr": f.attr, "exists": f.exists} for p, f in surface.fields.items()},
        "overridden": sorted(surface.overridden),
        "known": dict(surface.known),
        "complete": surface.complete,
    }


def surface_from_json(value: Mapping[str, Any], target: str) -> Surface:
    """A surface recorded by :func:`surface_to_json` (checked by :func:`check_surface_json`)."""
    return Surface(
        target,
        {a: StateUse(u["mode"], u["optional"], u["exists"]) for a, u in value["state"].items()},
        {
            name: SurfaceMember(m["defined_in"], m["fingerprint"], dict(m["touches"]), m["called"], m["source"])
            for name, m in value["members"].items()
        },
        {a: (s["call"], tuple(s["attributes"])) for a, s in value["siblings"].items()},
        {p: FieldUse(f["owner"], f["attr"], f["exists"]) for p, f in value["fields"].items()},
        frozenset(value["overridden"]),
        dict(value["known"]),
        value["complete"],
    )


_SHAPE: dict[str, Any] = {
    "state": ("map", {"mode": "mode", "optional": bool, "exists": bool}),
    "members": (
        "map",
        {"defined_in": "label", "fingerprint": str, "touches": ("map", "mode"), "called": bool, "source": "source"},
    ),
    "siblings": ("map", {"call": str, "attributes": ["name"]}),
    "fields": ("map", {"owner": "label", "attr": "name", "exists": bool}, "path"),
    "overridden": ["name"],
    "known": ("map", str),
    "complete": bool,
}


def check_surface_json(value: object, key: str, bad: Callable[[str, str], Exception]) -> None:
    """Raise ``bad(key, problem)`` unless ``value`` is a surface as :func:`surface_to_json` writes it."""
    _check_shape(value, _SHAPE, key, bad)


def _kind(value: object) -> str:
    names = {
        dict: "an object",
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
    }
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _check_shape(value: object, shape: Any, key: str, bad: Callable[[str, str], Exception]) -> None:
    if isinstance(shape, dict):
        if not isinstance(value, dict):
            raise bad(key, f"expected an object, found {_kind(value)}")
        if set(value) != set(shape):
            raise bad(key, f"expected the keys {', '.join(sorted(shape))}, found {ascii(sorted(value))[:200]}")
        for name, sub in shape.items():
            _check_shape(value[name], sub, f"{key}.{name}", bad)
    elif isinstance(shape, tuple):  # ("map", values[, keys]): attribute names (or paths) -> values
        if not isinstance(value, dict):
            raise bad(key, f"expected an object, found {_kind(value)}")
        for name, item in value.items():
            _check_shape(name, shape[2] if len(shape) > 2 else "name", f"{key}[{name!r}]", bad)
            _check_shape(item, shape[1], f"{key}[{name!r}]", bad)
    elif isinstance(shape, list):
        if not isinstance(value, list):
            raise bad(key, f"expected an array, found {_kind(value)}")
        for i, item in enumerate(value):
            _check_shape(item, shape[0], f"{key}[{i}]", bad)
    elif shape is bool:
        if not isinstance(value, bool):
            raise bad(key, f"expected a boolean, found {_kind(value)}")
    elif shape == "source":
        if value is not None:
            _check_shape(value, "code", key, bad)
    else:
        if not isinstance(value, str):
            raise bad(key, f"expected a string, found {_kind(value)}")
        if shape == "mode" and value not in (READ, WRITE):
            raise bad(key, f"{value!r} is neither 'read' nor 'write'")
        if shape == "path" and not value:
            raise bad(key, "an empty access path")
        if shape == "name" and not value.isidentifier():
            raise bad(key, f"{value!r} is not an attribute name")
        if shape == "label":
            module, _, qualname = value.partition(":")
            if not (module and qualname):
                raise bad(key, f"{value!r} is not 'package.module:Qual.Name'")
        if shape == "code":
            try:
                fingerprint(value)
            except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
                raise bad(key, f"it does not parse as Python ({type(exc).__name__}: {exc})") from None
