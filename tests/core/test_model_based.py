"""Model-based test: random define/apply/rollback sequences over random class hierarchies.

After every step, ``vars()`` of every class in the hierarchy must be exactly
(keys and object identity) what a simple model predicts; after
``rollback_all()`` it must be identical to the start, and no member object
may have been mutated (descriptors that learn their name included).

The hierarchy has a diamond (``Join(Leaf, Side)``), members include
descriptors with ``__set_name__``, ``cached_property`` and ``__eq__`` (whose
class body gets an implicit ``__hash__ = None``), and patches add members to
bases that patches on subclasses may then try to override.  A member of
another kind than the one it replaces (a plain function over a static method,
...) is refused unless the patch marks it ``@changes_kind``.

Patches are plain or stackable (issue 19), with an ``order`` and sometimes an
exclusive token.  The model keeps each stack as the list of its applied
layers: after every step the target shows the outermost layer (sorted by
``(-order, name)``), ``_original_x`` holds the stack's base, each layer's
``original(x)`` is the next layer inward (the base for the innermost), and
``PatchManager.status()`` shows that chain; the order never depends on the
order of the steps.
"""

from __future__ import annotations

import functools
import itertools
import types
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, invariant, rule

from vllm_custom_patches import PatchConflictError, PatchManager, PatchTargetError, VLLMPatch, changes_kind
from vllm_custom_patches._core.stacks import class_get
from vllm_custom_patches.testing import NamespaceSnapshot, snapshot_namespace

_EXISTING = ["m", "s", "c", "p", "__repr__", "__eq__", "attr"]
_POOL = [*_EXISTING, "new1", "new2"]
_KINDS = ["function", "staticmethod", "classmethod", "property", "value", "field", "cached"]
_MISSING = object()
_counter = itertools.count()
# How each kind is called; None: a descriptor of its own (_Field), whose kind is not judged.
_CALLED_AS = {"function": "method", "staticmethod": "static", "classmethod": "class", "property": "property",
              "cached": "property", "value": "value", "field": None}  # fmt: skip
_made: dict[int, str] = {}  # id of each member _member made -> its kind (they all live as long as the test)


def _member(kind: str, tag: str) -> object:
    def func(*args: Any) -> str:
        return tag

    if kind == "function":
        return func
    if kind == "staticmethod":
        return staticmethod(func)
    if kind == "classmethod":
        return classmethod(func)
    if kind == "property":
        return property(func)
    if kind == "field":
        return _Field()
    if kind == "cached":
        return functools.cached_property(func)
    return object()


def _made_member(kind: str, tag: str) -> object:
    member = _member(kind, tag)
    _made[id(member)] = kind
    return member


def _called_as(member: object) -> str | None:
    if isinstance(member, types.WrapperDescriptorType):  # object's own __repr__, __eq__
        return "method"
    return _CALLED_AS[_made[id(member)]]


class _Field:
    """A descriptor that learns its name, as dataclass fields and ORMs do."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: object, owner: type | None = None) -> object:
        return self if obj is None else vars(obj).get("_" + self.name)


class PatchModel(RuleBasedStateMachine):
    patches = Bundle("patches")

    @initialize(data=st.data())
    def build_hierarchy(self, data: st.DataObject) -> None:
        def namespace(label: str) -> dict[str, object]:
            names = data.draw(st.lists(st.sampled_from(_EXISTING), unique=True), label=f"{label} members")
            return {
                n: _made_member(data.draw(st.sampled_from(_KINDS), label=f"{label}.{n}"), f"{label}.{n}") for n in names
            }

        self.root = type("Root", (), namespace("Root"))
        self.mid = type("Mid", (self.root,), namespace("Mid"))
        self.leaf = type("Leaf", (self.mid,), namespace("Leaf"))
        self.other = type("Other", (), namespace("Other"))
        self.side = type("Side", (self.root,), namespace("Side"))
        self.join = type("Join", (self.leaf, self.side), namespace("Join"))
        self.classes = [self.root, self.mid, self.leaf, self.other, self.side, self.join]
        self.snapshots: list[NamespaceSnapshot] = [snapshot_namespace(cls) for cls in self.classes]
        self.expected = {cls: dict(vars(cls)) for cls in self.classes}
        self.owner: dict[tuple[type, str], str] = {}
        self.applied: dict[str, tuple[type, dict[str, object]]] = {}  # name -> (target, old values)
        self.specs: dict[str, tuple[type, dict[str, object]]] = {}
        self.marked: dict[str, set[str]] = {}
        self.composition: dict[str, tuple[bool, int, frozenset[str]]] = {}  # name -> (stackable, order, exclusive)
        self.stacks: dict[tuple[type, str], list[str]] = {}  # (target, member) -> applied layers
        self.stack_old: dict[tuple[type, str], object] = {}  # what the target held before the stack

    @rule(target=patches, data=st.data())
    def define(self, data: st.DataObject) -> str:
        target = data.draw(st.sampled_from(self.classes), label="target")
        names = data.draw(st.lists(st.sampled_from(_POOL), min_size=1, max_size=4, unique=True), label="names")
        name = f"Model{next(_counter)}"
        members = {n: _made_member(data.draw(st.sampled_from(_KINDS), label=n), f"{name}.{n}") for n in names}
        marked = {
            n for n in names if _made[id(members[n])] != "value" and data.draw(st.booleans(), label=f"{n} marked")
        }
        for n in marked:
            changes_kind(members[n])
        stackable = data.draw(st.booleans(), label="stackable")
        order = data.draw(st.sampled_from([0, 0, 1, -1]), label="order") if stackable else 0
        exclusive = data.draw(st.sampled_from([frozenset(), frozenset(), frozenset(), frozenset({"x"})]), label="excl")
        keywords: dict[str, Any] = {"stackable": True, "order": order} if stackable else {}
        type(VLLMPatch)(name, (VLLMPatch[target],), dict(members), exclusive=exclusive, **keywords)
        self.specs[name] = (target, members)
        self.marked[name] = marked
        self.composition[name] = (stackable, order, exclusive)
        return name

    @rule(target=patches, data=st.data())
    def define_layer(self, data: st.DataObject) -> str:
        """A stackable patch on a member its target has, of the original's kind: stacks form often."""
        if self.stacks and data.draw(st.booleans(), label="on a stack"):
            target, member = data.draw(st.sampled_from(list(self.stacks)), label="stack")
        else:
            target = data.draw(st.sampled_from(self.classes), label="target")
            present = [n for n in _EXISTING if self._lookup(target, n) is not _MISSING]
            if not present:
                return self.define(data)  # type: ignore[no-any-return]
            member = data.draw(st.sampled_from(present), label="member")
        stacked = (target, member) in self.stacks
        original = self.expected[target][f"_original_{member}"] if stacked else self._lookup(target, member)
        called = _called_as(original)
        kinds = [kind for kind in _KINDS if called is None or _CALLED_AS[kind] == called] or ["function"]
        # Names that do not sort in the order they are defined in, so that ties are broken by name.
        name = f"{data.draw(st.sampled_from('xyz'), label='prefix')}Layer{next(_counter)}"
        members = {member: _made_member(data.draw(st.sampled_from(kinds), label="kind"), f"{name}.{member}")}
        order = data.draw(st.sampled_from([0, 0, 1, -1]), label="order")
        type(VLLMPatch)(name, (VLLMPatch[target],), dict(members), stackable=True, order=order)
        self.specs[name] = (target, members)
        self.marked[name] = set()
        self.composition[name] = (True, order, frozenset())
        if data.draw(st.booleans(), label="apply now"):
            self.apply(name)
        return name

    def _layers(self, key: tuple[type, str]) -> list[str]:
        """The applied layers of a stack, outermost first."""
        return sorted(self.stacks[key], key=lambda layer: (-self.composition[layer][1], layer))

    def _top(self, key: tuple[type, str]) -> object:
        return self.specs[self._layers(key)[0]][1][key[1]]

    def _lookup(self, cls: type, name: str) -> object:
        for klass in cls.__mro__:
            namespace = self.expected.get(klass, vars(klass))
            if name in namespace:
                return namespace[name]
        return _MISSING

    def _related(self, target: type) -> list[type]:
        """Classes that share an instance with ``target``: in the MRO of ``target`` or of a subclass."""
        sharing = {c for d in self.classes if issubclass(d, target) for c in d.__mro__}
        return [c for c in self.classes if c is not target and c in sharing]

    def _holder(self, cls: type, name: str) -> type | None:
        for klass in cls.__mro__:
            if name in self.expected.get(klass, vars(klass)):
                return klass
        return None

    @rule(name=patches)
    def apply(self, name: str) -> None:
        target, members = self.specs[name]
        if name in self.applied:
            assert PatchManager.apply(name) is False
            return
        stackable, _, exclusive = self.composition[name]

        def original(n: str) -> object:  # a stacked member is judged against the stack's base
            if (target, n) in self.stacks:
                return self.expected[target][f"_original_{n}"]
            return self._lookup(target, n)

        overrides = {n: original(n) for n in members if original(n) is not _MISSING}
        kinds = {n: (_called_as(original), _called_as(members[n])) for n, original in overrides.items()}
        if any(None not in pair and pair[0] != pair[1] and n not in self.marked[name] for n, pair in kinds.items()):
            try:  # planning refuses it before looking for conflicts
                PatchManager.apply(name)
            except PatchTargetError as exc:
                assert "@changes_kind" in str(exc)
                return
            raise AssertionError(f"{name} should have been refused for changing a member's kind")
        stacked = set(overrides) if stackable else set()
        joins = {n for n in overrides if (target, n) in self.stacks}
        own = [n for n in members if n not in stacked]  # set on the target by this patch alone
        touched = [*own, *(f"_original_{n}" for n in overrides if n not in stacked)]
        new_originals = [f"_original_{n}" for n in overrides if n not in joins]
        conflict = (
            any(exclusive & self.composition[other][2] for other in self.applied)
            or (bool(joins) and not stackable)
            or any((target, n) in self.owner for n in [*touched, *new_originals, *(stacked - joins)])
            or any(f"_original_{n}" in self.expected[c] for n in overrides for c in self._related(target))
            # the original would be a member another patch (or a stack) set on a base: stacking across classes
            or any((self._holder(target, n), n) in self.owner for n in set(overrides) - joins)
            or any((self._holder(target, n), n) in self.stacks for n in set(overrides) - joins)
        )
        if conflict:
            try:
                PatchManager.apply(name)
            except PatchConflictError:
                return
            raise AssertionError(f"{name} should have conflicted")
        assert PatchManager.apply(name) is True
        namespace = self.expected[target]
        old = {n: namespace.get(n, _MISSING) for n in touched}
        for n, original_value in overrides.items():
            if n in stacked:
                if n not in joins:
                    self.stacks[(target, n)] = []
                    self.stack_old[(target, n)] = namespace.get(n, _MISSING)
                    namespace[f"_original_{n}"] = original_value
                self.stacks[(target, n)].append(name)
                namespace[n] = self._top((target, n))
            else:
                namespace[f"_original_{n}"] = original_value
        namespace.update({n: members[n] for n in own})
        for n in touched:
            self.owner[(target, n)] = name
        self.applied[name] = (target, old)

    def _forget(self, name: str) -> None:
        target, old = self.applied.pop(name)
        for n, value in old.items():
            if value is _MISSING:
                self.expected[target].pop(n, None)
            else:
                self.expected[target][n] = value
            del self.owner[(target, n)]
        namespace = self.expected[target]
        for key in [key for key, layers in self.stacks.items() if name in layers]:
            self.stacks[key].remove(name)
            member = key[1]
            if self.stacks[key]:
                namespace[member] = self._top(key)
                continue
            del self.stacks[key]
            before = self.stack_old.pop(key)
            del namespace[f"_original_{member}"]
            if before is _MISSING:
                namespace.pop(member, None)
            else:
                namespace[member] = before

    @rule(name=patches)
    def rollback(self, name: str) -> None:
        assert PatchManager.rollback(name) is (name in self.applied)
        if name in self.applied:
            self._forget(name)

    @rule()
    def rollback_all(self) -> None:
        expected_order = list(reversed(self.applied))
        assert PatchManager.rollback_all() == expected_order
        for name in expected_order:
            self._forget(name)
        for snapshot in self.snapshots:
            snapshot.assert_unchanged()

    @invariant()
    def namespaces_match_the_model(self) -> None:
        if not hasattr(self, "classes"):
            return
        for cls in self.classes:
            actual = vars(cls)
            expected = self.expected[cls]
            assert actual.keys() == expected.keys(), (cls.__name__, set(actual) ^ set(expected))
            for key, value in expected.items():
                assert actual[key] is value, (cls.__name__, key)
        assert sorted(PatchManager.applied()) == sorted(self.applied)

    @invariant()
    def chains_match_the_model(self) -> None:
        if not hasattr(self, "classes"):
            return
        shown = {line for record in PatchManager.status() for line in record.stacks}
        expected_lines = set()
        for target, member in self.stacks:
            layers = self._layers((target, member))
            labels = [layer if self.composition[layer][1] == 0 else f"{layer} (order {self.composition[layer][1]})"
                      for layer in layers]  # fmt: skip
            expected_lines.add(f"{target.__qualname__}.{member}: " + " \u2192 ".join([*labels, "original"]))
            base = self.expected[target][f"_original_{member}"]
            nexts = [self.specs[layer][1][member] for layer in layers[1:]] + [base]
            for layer, inner in zip(layers, nexts, strict=True):
                got, want = PatchManager.get(layer).original(member), class_get(inner, target)
                assert got is want or got == want, (layer, member, got, want)
        assert shown == expected_lines

    def teardown(self) -> None:
        PatchManager.rollback_all()
        if hasattr(self, "classes"):
            for snapshot in self.snapshots:
                snapshot.assert_unchanged()


PatchModel.TestCase.settings = settings(
    max_examples=150, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestPatchModel = PatchModel.TestCase
