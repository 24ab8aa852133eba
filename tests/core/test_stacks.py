"""Composition (issue 19): stackable patches, their order, original() through a stack, exclusive tokens.

Each test states one rule of the contract; the stack's state is checked on the
target's own ``__dict__`` (keys and identities), on what each layer's
``original()`` gives, and on what a call returns.
"""

from __future__ import annotations

import abc
import itertools
import random
import threading
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest

from vllm_custom_patches import (
    PatchApplyError,
    PatchConflictError,
    PatchDefinitionError,
    PatchManager,
    PatchTargetError,
    VLLMPatch,
    changes_kind,
)
from vllm_custom_patches.testing import snapshot_namespace

_HANG_GUARD_S = 30


class Target:
    def m(self, x: int = 0) -> str:
        return f"T{x}"

    def other(self) -> str:
        return "other"


class Child(Target):
    pass


def layer(name: str, target: type = Target, order: int | None = None, member: str = "m", **keywords: Any) -> Any:
    """A stackable patch ``name`` whose ``member`` returns ``"name>" + the next layer's result``."""

    def m(self: Any, *args: Any) -> str:
        return f"{name}>" + patch.original(member)(self, *args)

    if order is not None:
        keywords["order"] = order
    patch: Any = type(VLLMPatch)(name, (VLLMPatch[target],), {member: m}, stackable=True, **keywords)
    return patch


def chain_of(target: type = Target, member: str = "m") -> str:
    """The chain as ``PatchManager.status()`` shows it on the layers' records."""
    lines = {line for record in PatchManager.status() for line in record.stacks}
    found = [line for line in lines if line.startswith(f"{target.__qualname__}.{member}:")]
    return found[0] if found else ""


# -- definition --------------------------------------------------------------


def test_keywords_are_part_of_the_spec_with_defaults() -> None:
    class Plain(VLLMPatch[Target]):
        def m(self, x: int = 0) -> str:
            return "p"

    class Layered(VLLMPatch[Target], stackable=True, order=-3, exclusive={"queue-sort", "b"}):
        def m(self, x: int = 0) -> str:
            return "l"

    assert (Plain._vcp_spec.stackable, Plain._vcp_spec.order, Plain._vcp_spec.exclusive) == (False, 0, frozenset())
    spec = Layered._vcp_spec
    assert (spec.stackable, spec.order, spec.exclusive) == (True, -3, frozenset({"queue-sort", "b"}))


@pytest.mark.parametrize(
    ("keywords", "message"),
    [
        ({"stackable": "yes"}, r"stackable='yes' must be True or False"),
        ({"stackable": 1}, r"stackable=1 must be True or False"),
        ({"stackable": True, "order": "10"}, r"order='10' must be an int"),
        ({"stackable": True, "order": True}, r"order=True must be an int"),
        ({"order": 5}, r"order=5 places a patch in a stack, but Bad is not stackable; add stackable=True"),
        ({"exclusive": "queue-sort"}, r"must be a set of strings; write exclusive=\{'queue-sort'\}"),
        ({"exclusive": 7}, r"exclusive=7 must be a set of strings"),
        ({"exclusive": {""}}, r"exclusive token '' must be a non-empty string without spaces"),
        ({"exclusive": {"queue sort"}}, r"token 'queue sort' must be a non-empty string without spaces"),
        ({"exclusive": [3]}, r"exclusive token 3 must be"),
        ({"stackabel": True}, r"unknown class keyword\(s\) 'stackabel'; a patch class takes stackable=, order="),
    ],
)
def test_bad_keywords_are_refused_at_class_definition_naming_the_fix(keywords: dict[str, Any], message: str) -> None:
    with pytest.raises(PatchDefinitionError, match=message):
        type(VLLMPatch)("Bad", (VLLMPatch[Target],), {"other": lambda self: "x"}, **keywords)
    assert "Bad" not in PatchManager.names()


def test_self_original_in_a_stackable_patch_is_refused_naming_original() -> None:
    with pytest.raises(PatchDefinitionError, match=r"'m' uses self._original_m.*Uses.original\('m'\)\(self, \.\.\.\)"):

        class Uses(VLLMPatch[Target], stackable=True):
            def m(self, x: int = 0) -> str:
                return "u" + self._original_m(x)  # type: ignore[attr-defined,no-any-return]

    # Also in nested code, and in a helper that is not the member itself.
    with pytest.raises(PatchDefinitionError, match=r"'helper' uses self._original_m"):

        class Nested(VLLMPatch[Target], stackable=True):
            def m(self, x: int = 0) -> str:
                return "n"

            def helper(self) -> Callable[[], str]:
                return lambda: str(self._original_m())  # type: ignore[attr-defined]


def test_a_patch_class_made_from_another_inherits_its_keywords_unless_it_says_otherwise() -> None:
    class Base(VLLMPatch[Target], stackable=True, order=4, exclusive={"t"}):
        def m(self, x: int = 0) -> str:
            return "b"

    class Same(Base):
        name = "same"

    class Plainer(Base, stackable=False):
        name = "plainer"

    assert (Same._vcp_spec.stackable, Same._vcp_spec.order, Same._vcp_spec.exclusive) == (True, 4, frozenset({"t"}))
    assert Plainer._vcp_spec.stackable is False


# -- conflicts ---------------------------------------------------------------


def test_two_plain_patches_on_one_member_conflict_and_the_message_says_how_to_stack() -> None:
    class First(VLLMPatch[Target]):
        def m(self, x: int = 0) -> str:
            return "1"

    class Second(VLLMPatch[Target]):
        def m(self, x: int = 0) -> str:
            return "2"

    First.apply()
    before = snapshot_namespace(Target)
    with pytest.raises(PatchConflictError, match=r"declare both stackable=True.*original\('m'\)"):
        Second.apply()
    before.assert_unchanged()


@pytest.mark.parametrize("plain_first", [True, False])
def test_stackable_and_plain_on_one_member_conflict_whichever_comes_first(plain_first: bool) -> None:
    class Plain(VLLMPatch[Target]):
        def m(self, x: int = 0) -> str:
            return "plain"

    stacked = layer("stacked")
    first, second = (Plain, stacked) if plain_first else (stacked, Plain)
    first.apply()
    before = snapshot_namespace(Target)
    table = dict(stacked._vcp_originals)
    hint = r"declare 'Plain' stackable=True too" if plain_first else r"Declare it stackable=True .* to join the stack"
    with pytest.raises(PatchConflictError, match=hint):
        second.apply()
    before.assert_unchanged()
    assert dict(stacked._vcp_originals) == table
    assert PatchManager.applied() == [first.name]


def test_patches_sharing_an_exclusive_token_conflict_whatever_they_replace() -> None:
    class Other:
        def z(self) -> int:
            return 0

    class PolicyA(VLLMPatch[Target], exclusive={"queue-sort", "a-only"}):
        def m(self, x: int = 0) -> str:
            return "A"

    class PolicyB(VLLMPatch[Other], stackable=True, exclusive={"queue-sort"}):
        def z(self) -> int:
            return 1

    class Unrelated(VLLMPatch[Other], exclusive={"something-else"}):
        def y(self) -> int:
            return 2

    PolicyA.apply()
    before = snapshot_namespace(Other)
    with pytest.raises(PatchConflictError, match=r"both declare exclusive=\{'queue-sort'\}.*Roll 'PolicyA' back first"):
        PolicyB.apply()
    before.assert_unchanged()
    assert Unrelated.apply()
    PolicyA.rollback()
    assert PolicyB.apply()
    with pytest.raises(PatchConflictError, match="'PolicyB'"):
        PolicyA.apply()


def test_stackable_patches_adding_the_same_new_member_conflict() -> None:
    class AddsA(VLLMPatch[Target], stackable=True):
        def brand_new(self) -> int:
            return 1

    class AddsB(VLLMPatch[Target], stackable=True):
        def brand_new(self) -> int:
            return 2

    AddsA.apply()
    with pytest.raises(PatchConflictError, match=r"both set Target\.brand_new"):
        AddsB.apply()


def test_a_stack_on_a_base_class_and_a_layer_on_a_subclass_conflict() -> None:
    on_base = layer("on_base")
    on_child = layer("on_child", target=Child)
    on_base.apply()
    with pytest.raises(PatchConflictError, match=r"stack Target.m: on_base"):
        on_child.apply()
    on_base.rollback()
    on_child.apply()
    with pytest.raises(PatchConflictError, match=r"same class hierarchy"):
        on_base.apply()


def test_outside_code_replacing_a_stacked_member_blocks_join_and_rollback() -> None:
    outer, inner = layer("outer", order=1), layer("inner")
    outer.apply()
    top = vars(Target)["m"]
    Target.m = lambda self, x=0: "foreign"  # type: ignore[method-assign]
    with pytest.raises(PatchConflictError, match="replaced since, by code outside"):
        inner.apply()
    with pytest.raises(PatchConflictError, match="was replaced after the patch was applied"):
        outer.rollback()
    Target.m = top  # type: ignore[method-assign]
    assert inner.apply() and outer.rollback() and inner.rollback()


# -- order -------------------------------------------------------------------


def test_the_order_depends_only_on_the_applied_set() -> None:
    layers = [layer("b_mid"), layer("a_mid"), layer("low", order=-1), layer("high", order=10)]
    expected = "high>a_mid>b_mid>low>T1"
    states = set()
    for permutation in itertools.permutations(layers):
        for patch in permutation:
            assert patch.apply()
        assert Target().m(1) == expected
        assert chain_of() == "Target.m: high (order 10) \u2192 a_mid \u2192 b_mid \u2192 low (order -1) \u2192 original"
        states.add(tuple(sorted((k, id(v)) for k, v in vars(Target).items())))
        for patch in permutation:
            assert patch.rollback()
    assert len(states) == 1  # the very same objects on the target, whatever the order of application


def test_status_shows_each_stacked_member_on_every_layer_and_not_on_plain_patches() -> None:
    class Plain(VLLMPatch[Target]):
        def other(self) -> str:
            return "p"

    outer, inner = layer("outer", order=2), layer("inner")
    for patch in (inner, Plain, outer):
        patch.apply()
    records = {record.name: record for record in PatchManager.status()}
    line = "Target.m: outer (order 2) \u2192 inner \u2192 original"
    assert records["outer"].stacks == records["inner"].stacks == (line,)
    assert records["Plain"].stacks == ()
    assert records["inner"].as_dict()["stacks"] == [line]
    assert records["inner"].stackable and records["inner"].order == 0 and not records["Plain"].stackable


# -- original() --------------------------------------------------------------


def test_original_reaches_the_next_layer_inward_whatever_self_is() -> None:
    outer, inner = layer("outer", order=1), layer("inner")
    inner.apply()
    outer.apply()
    stub = SimpleNamespace()  # not a Target: what vLLM's own unit tests pass
    assert Target.m(stub, 5) == "outer>inner>T5"  # type: ignore[arg-type]
    assert outer.original("m") is inner._vcp_spec.members["m"]
    assert inner.original("m") is Target.__dict__["_original_m"]


def test_a_single_patch_reads_the_targets_original_at_each_call_a_stack_is_linked_by_the_framework() -> None:
    class Single(VLLMPatch[Target]):
        def m(self, x: int = 0) -> str:
            return "S>" + Single.original("m")(self, x)  # type: ignore[no-any-return]

    def stand_in(self: Any, x: int = 0) -> str:
        return f"stand-in{x}"

    # Not stackable: original() is what the target holds as _original_m when called, as it always was
    # (a test may stand in for vLLM's original by setting it).
    Single.apply()
    kept = vars(Target)["_original_m"]
    Target._original_m = stand_in  # type: ignore[attr-defined]
    try:
        assert Single.original("m") is stand_in and Target().m(1) == "S>stand-in1"
    finally:
        Target._original_m = kept  # type: ignore[attr-defined]
        Single.rollback()
    # A stack: every layer's next is linked by the framework (one C-level lookup); replacing
    # _original_m under it is an outside change. A stand-in goes in before the layers are applied.
    outer, inner = layer("outer", order=1), layer("inner")
    real = vars(Target)["m"]
    Target.m = stand_in  # type: ignore[assignment]
    try:
        outer.apply()
        inner.apply()
        assert inner.original("m") is stand_in and Target().m(1) == "outer>inner>stand-in1"
        Target._original_m = real  # type: ignore[attr-defined]
        assert Target().m(1) == "outer>inner>stand-in1"
        with pytest.raises(PatchConflictError, match=r"Target._original_m was replaced"):
            inner.rollback()
        Target._original_m = stand_in  # type: ignore[attr-defined]
        assert inner.rollback() and outer.rollback()
        assert vars(Target)["m"] is stand_in
    finally:
        Target.m = real  # type: ignore[method-assign]


def test_original_is_resolved_at_call_time() -> None:
    outer, middle, inner = layer("outer", order=2), layer("middle", order=1), layer("inner")
    outer.apply()
    inner.apply()
    lookup = outer.original  # kept by a caller: still the live table
    assert lookup("m")(Target(), 1) == "inner>T1"
    middle.apply()
    assert lookup("m")(Target(), 1) == "middle>inner>T1"
    inner.rollback()
    assert lookup("m")(Target(), 1) == "middle>T1"


def test_original_of_a_member_not_replaced_or_added_or_not_applied_is_a_clear_error() -> None:
    class Adds(VLLMPatch[Target], stackable=True):
        def m(self, x: int = 0) -> str:
            return "a"

        def extra(self) -> int:
            return 1

    with pytest.raises(PatchTargetError, match="is not applied"):
        Adds.original("m")
    Adds.apply()
    with pytest.raises(PatchTargetError, match=r"does not replace 'zzz'.*m, extra"):
        Adds.original("zzz")
    with pytest.raises(PatchTargetError, match="adds 'extra', which its target did not have"):
        Adds.original("extra")
    Adds.rollback()
    with pytest.raises(PatchTargetError, match="is not applied"):
        Adds.original("m")


class Described:
    @classmethod
    def kind(cls) -> str:
        return f"kind:{cls.__name__}"

    @property
    def size(self) -> int:
        return 1

    @staticmethod
    def static(x: int) -> int:
        return x


def test_descriptors_through_a_stack() -> None:
    class Outer(VLLMPatch[Described], stackable=True, order=1):
        @classmethod
        def kind(cls) -> str:
            return "outer>" + Outer.original("kind")()  # type: ignore[no-any-return]

        @property
        def size(self) -> int:
            return 10 * Outer.original("size").fget(self)  # type: ignore[no-any-return]

        @staticmethod
        def static(x: int) -> int:
            return 100 + Outer.original("static")(x)  # type: ignore[no-any-return]

    class Inner(VLLMPatch[Described], stackable=True):
        @classmethod
        def kind(cls) -> str:
            return f"inner({cls.__name__})>" + Inner.original("kind")()  # type: ignore[no-any-return]

        @property
        def size(self) -> int:
            return 2 + Inner.original("size").fget(self)  # type: ignore[no-any-return]

        @staticmethod
        def static(x: int) -> int:
            return 2 * Inner.original("static")(x)  # type: ignore[no-any-return]

    before = snapshot_namespace(Described)
    Inner.apply()
    Outer.apply()
    # The next layer's class method is bound to the target; its property is the property object.
    assert Described.kind() == "outer>inner(Described)>kind:Described"
    assert isinstance(Outer.original("size"), property)
    assert Described().size == 30
    assert Described.static(3) == 106
    Outer.rollback()
    assert (Described.kind(), Described().size, Described.static(3)) == ("inner(Described)>kind:Described", 3, 6)
    Inner.rollback()
    before.assert_unchanged()


# -- rollback ----------------------------------------------------------------


def _state(*patches: Any) -> tuple[dict[str, object], dict[str, object]]:
    """``vars(Target)`` and every layer's ``original('m')``, to compare with a from-scratch apply."""
    return dict(vars(Target)), {patch.name: patch.original("m") for patch in patches}


@pytest.mark.parametrize("which", ["outer", "middle", "inner"])
def test_rolling_back_any_layer_leaves_what_the_remaining_set_gives_from_scratch(which: str) -> None:
    patches = {"outer": layer("outer", order=2), "middle": layer("middle", order=1), "inner": layer("inner")}
    for patch in patches.values():
        patch.apply()
    patches[which].rollback()
    rest = [patch for name, patch in patches.items() if name != which]
    after_rollback = _state(*rest)
    for patch in rest:
        patch.rollback()
    for patch in reversed(rest):  # applied again, in the other order, from scratch
        patch.apply()
    assert _state(*rest) == after_rollback
    assert all(after_rollback[0][key] is value for key, value in _state(*rest)[0].items())
    with pytest.raises(PatchTargetError, match="is not applied"):
        patches[which].original("m")
    assert patches[which].apply()  # and back into its place
    assert Target().m(1) == "outer>middle>inner>T1"


def test_rolling_back_every_layer_in_any_order_restores_the_namespace_exactly() -> None:
    before, child_before = snapshot_namespace(Target), snapshot_namespace(Child)
    patches = [layer("one", order=1), layer("two"), layer("three", order=-1)]
    for order in itertools.permutations(patches):
        for patch in patches:
            patch.apply()
        for patch in order:
            patch.rollback()
        before.assert_unchanged()
        child_before.assert_unchanged()
    assert PatchManager._registry.stacks == {}


def test_a_stack_of_one_looks_exactly_like_a_single_patch() -> None:
    class Single(VLLMPatch[Target]):
        def m(self, x: int = 0) -> str:
            return "S>" + Single.original("m")(self, x)  # type: ignore[no-any-return]

    alone = layer("alone")
    Single.apply()
    single = {key: type(value) for key, value in vars(Target).items()}
    Single.rollback()
    alone.apply()
    assert {key: type(value) for key, value in vars(Target).items()} == single
    assert vars(Target)["_original_m"] is Target.__dict__["_original_m"]


def test_a_stack_on_an_inherited_member_and_super_inside_a_layer() -> None:
    class Base:
        def m(self) -> str:
            return "base"

    class Sub(Base):
        pass

    class Deeper(Sub):
        pass

    class UsesSuper(VLLMPatch[Sub], stackable=True, order=1):
        def m(self) -> str:
            return "super:" + super().m() + "|next:" + UsesSuper.original("m")(self)  # type: ignore[no-any-return]

    inner = layer("inner_sub", target=Sub)
    before = snapshot_namespace(Sub)
    UsesSuper.apply()
    inner.apply()
    assert Deeper().m() == "super:base|next:inner_sub>base"
    assert Base().m() == "base"
    UsesSuper.rollback()
    assert Deeper().m() == "inner_sub>base"
    inner.rollback()
    before.assert_unchanged()
    assert "m" not in vars(Sub)


def test_abc_bookkeeping_through_a_stack_in_any_order() -> None:
    class Policy(abc.ABC):
        @abc.abstractmethod
        def pick(self) -> int: ...

    class Impl(VLLMPatch[Policy], stackable=True, order=1):
        def pick(self) -> int:
            return 7

    class Logged(VLLMPatch[Policy], stackable=True):
        def pick(self) -> int:
            return Logged.original("pick")(self)  # type: ignore[no-any-return]

    before = snapshot_namespace(Policy)
    for first, second in ((Impl, Logged), (Logged, Impl)):
        Logged.apply()
        Impl.apply()
        assert Policy().pick() == 7  # type: ignore[abstract]
        first.rollback()
        second.rollback()
        with pytest.raises(TypeError, match="abstract"):
            Policy()  # type: ignore[abstract]
        before.assert_unchanged()  # the very same __abstractmethods__ object again


@pytest.mark.parametrize("order", [1, -1], ids=["outermost-on-other", "inward-on-both"])
def test_apply_is_atomic_a_patch_joins_every_stack_or_none(order: int) -> None:
    class Refuses:
        def __set_name__(self, owner: type, name: str) -> None:
            if owner is Target:
                raise RuntimeError("no")

        def __get__(self, obj: object, owner: type | None = None) -> Any:
            return lambda *args: "refuses"

    outer, inner = layer("outer", order=5), layer("inner", member="other")
    outer.apply()
    inner.apply()
    before = snapshot_namespace(Target)
    tables = (dict(outer._vcp_originals), dict(inner._vcp_originals), dict(outer._vcp_originals.through))

    class Both(VLLMPatch[Target], stackable=True, order=order):
        def m(self, x: int = 0) -> str:
            return "both"

        # Joins the 'other' stack after 'm' (outermost, or inward of 'inner': a descriptor
        # learns its name either way), and its __set_name__ refuses.
        other = Refuses()

    with pytest.raises(PatchApplyError, match="no"):
        Both.apply()
    before.assert_unchanged()
    assert (dict(outer._vcp_originals), dict(inner._vcp_originals), dict(outer._vcp_originals.through)) == tables
    assert dict(Both._vcp_originals) == {} and Both._vcp_originals.through == {}
    assert Target().m(1) == "outer>T1" and Target().other() == "inner>other"
    assert chain_of(member="m") == "Target.m: outer (order 5) \u2192 original"


@pytest.mark.parametrize("property_first", [True, False])
def test_each_layer_is_judged_against_the_original_kind_not_the_outer_layer(property_first: bool) -> None:
    class Reads(VLLMPatch[Target], stackable=True, order=1):
        @changes_kind
        @property
        def m(self) -> str:
            return "prop>" + Reads.original("m")(self, 1)  # type: ignore[no-any-return]

    calls = layer("calls")
    for patch in (Reads, calls) if property_first else (calls, Reads):
        assert patch.apply()
    assert Target().m == "prop>calls>T1"


def test_each_layer_keeps_the_kind_of_the_original_whatever_layers_are_applied() -> None:
    class AsProperty(VLLMPatch[Target], stackable=True):
        @property
        def m(self) -> str:
            return "prop"

    layer("first").apply()
    with pytest.raises(PatchTargetError, match="@changes_kind"):
        AsProperty.apply()


# -- calls in flight ---------------------------------------------------------


def test_a_call_inside_a_layer_rolled_back_completes_and_new_calls_skip_it() -> None:
    inside, release = threading.Event(), threading.Event()
    results: list[str] = []

    class Slow(VLLMPatch[Target], stackable=True, order=1):
        def m(self, x: int = 0) -> str:
            inside.set()
            assert release.wait(_HANG_GUARD_S)
            return "slow>" + Slow.original("m")(self, x)  # type: ignore[no-any-return]

    outer, inner = layer("outer", order=2), layer("inner")
    for patch in (outer, Slow, inner):
        patch.apply()
    worker = threading.Thread(target=lambda: results.append(Target().m(1)))
    worker.start()
    assert inside.wait(_HANG_GUARD_S)
    Slow.rollback()
    assert Target().m(2) == "outer>inner>T2"  # calls that start now see the new chain
    inner.rollback()  # the lingering layer's next call sees this too
    release.set()
    worker.join(_HANG_GUARD_S)
    assert results == ["outer>slow>T1"]
    # The call has returned: the next sweep (the sweeper's, or this one) removes the layer's entry.
    reg = PatchManager._registry
    with reg.lock:
        reg.lingerers.sweep()
        assert not reg.lingerers.layers
    assert dict(Slow._vcp_originals) == {} and Slow._vcp_originals.through == {}
    with pytest.raises(PatchTargetError, match="is not applied"):
        Slow.original("m")


def _run_threads(worker: Callable[[int], None], count: int) -> None:
    """``worker(i)`` on ``count`` threads released together; a deadlock fails (hang guard only)."""
    barrier = threading.Barrier(count)

    def released(index: int) -> None:
        barrier.wait()
        worker(index)

    threads = [threading.Thread(target=released, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(_HANG_GUARD_S * 2)
    assert not any(thread.is_alive() for thread in threads), "deadlock"


def test_threads_applying_and_rolling_back_layers_leave_the_chain_the_applied_set_gives() -> None:
    before = snapshot_namespace(Target)
    layers = [layer("l0"), layer("l1", order=1), layer("l2", order=-1), layer("l3")]

    class PlainM(VLLMPatch[Target]):
        def m(self, x: int = 0) -> str:
            return "plain"

    patches = [*layers, PlainM]
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(150):
            patch = rng.choice(patches)
            try:
                if rng.random() < 0.5:
                    patch.apply()
                else:
                    patch.rollback()
            except PatchConflictError:
                pass  # the plain patch and the layers exclude each other
            except BaseException as exc:
                errors.append(exc)

    _run_threads(worker, 6)
    assert errors == []
    applied = [patch for patch in layers if patch.is_applied()]
    if PlainM.is_applied():
        assert applied == [] and Target().m(1) == "plain"
    else:
        ordered = sorted(applied, key=lambda patch: (-patch._vcp_spec.order, patch.name))
        assert Target().m(1) == "".join(f"{patch.name}>" for patch in ordered) + "T1"
    PatchManager.rollback_all()
    before.assert_unchanged()
    assert PatchManager._registry.stacks == {}
