"""Regression tests for the adversarial review of the core (issue 8).

Each test reproduces one way in which "exact" was not exact, and failed
before its fix.  The item numbers are the review's.
"""

from __future__ import annotations

import abc
import collections.abc
import functools
import threading
import time
from typing import Any

import pytest

from vllm_custom_patches import (
    PatchConflictError,
    PatchDefinitionError,
    PatchManager,
    PatchTargetError,
    VLLMPatch,
)
from vllm_custom_patches.testing import applied, snapshot_namespace

# -- 1. __set_name__ is never called on a kept original -------------------------


class Field:
    """A descriptor that remembers its name and reads the instance's ``_<name>``."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: object, owner: type | None = None) -> Any:
        if obj is None:
            return self
        return vars(obj)["_" + self.name]

    def __set__(self, obj: object, value: object) -> None:
        vars(obj)["_" + self.name] = value


def test_a_descriptor_original_keeps_its_name_while_applied_and_after_rollback() -> None:
    class Holder:
        x = Field()

    class Doubled(VLLMPatch[Holder]):
        @property
        def x(self) -> int:
            return 2 * self._original_x  # type: ignore[attr-defined,no-any-return]

    descriptor = vars(Holder)["x"]
    before = snapshot_namespace(Holder)
    holder = Holder()
    holder.x = 21
    with applied(Doubled):
        assert holder.x == 42  # the original still reads holder._x
    assert holder.x == 21
    assert vars(Holder)["x"] is descriptor and descriptor.name == "x"
    before.assert_unchanged()


def test_an_inherited_descriptor_original_is_not_renamed_on_the_base() -> None:
    class Base:
        x = Field()

    class Sub(Base):
        pass

    class OnSub(VLLMPatch[Sub]):
        @property
        def x(self) -> int:
            return self._original_x + 1  # type: ignore[attr-defined,no-any-return]

    before = snapshot_namespace(Base)
    base, sub = Base(), Sub()
    base.x = sub.x = 1
    with applied(OnSub):
        assert (base.x, sub.x) == (1, 2)
    assert (base.x, sub.x) == (1, 1)
    before.assert_unchanged()


def test_a_cached_property_can_be_overridden() -> None:
    class Cached:
        @functools.cached_property
        def size(self) -> int:
            return 10

    class Bigger(VLLMPatch[Cached]):
        @functools.cached_property
        def size(self) -> int:
            return self._original_size + 1  # type: ignore[attr-defined,no-any-return]

    before = snapshot_namespace(Cached)
    with applied(Bigger):
        assert Cached().size == 11
    assert Cached().size == 10
    before.assert_unchanged()


def test_snapshot_reports_a_member_mutated_in_place() -> None:
    class Holder:
        x = Field()

    before = snapshot_namespace(Holder)
    vars(Holder)["x"].__set_name__(Holder, "renamed")
    with pytest.raises(AssertionError, match="x is the same object but was mutated"):
        before.assert_unchanged()


# -- 2. only members the author wrote are grafted --------------------------------


def test_defining_eq_does_not_make_the_target_unhashable() -> None:
    class Request:
        def __init__(self, rid: str) -> None:
            self.rid = rid

    class EqualById(VLLMPatch[Request]):  # noqa: PLW1641 - the implicit __hash__ = None is the subject
        def __eq__(self, other: object) -> bool:
            return isinstance(other, Request) and other.rid == self.rid  # type: ignore[attr-defined,no-any-return]

    before = snapshot_namespace(Request)
    with applied(EqualById):
        assert "__hash__" not in vars(Request)
        assert len({Request("a"), Request("a")}) == 2  # hashable, by identity as before
        assert Request("a") == Request("a")
    before.assert_unchanged()


def test_a_written_hash_none_is_grafted() -> None:
    class Request:
        pass

    class Unhashable(VLLMPatch[Request]):
        __hash__ = None  # type: ignore[assignment]

        def __eq__(self, other: object) -> bool:
            return True

    with applied(Unhashable), pytest.raises(TypeError, match="unhashable"):
        hash(Request())
    assert isinstance(hash(Request()), int)


# -- 3. __new__ inherited from object cannot be rolled back exactly --------------


def test_replacing_an_inherited_object_new_is_refused_and_changes_nothing() -> None:
    class Point:
        def __init__(self, x: int) -> None:
            self.x = x

    class Counting(VLLMPatch[Point]):
        def __new__(cls, *args: object, **kwargs: object) -> Any:
            return cls._original___new__(cls)  # type: ignore[attr-defined]

    before = snapshot_namespace(Point)
    with pytest.raises(PatchTargetError, match="inherits from object; CPython cannot restore"):
        Counting.apply()
    before.assert_unchanged()
    assert Point(1).x == 1


def test_a_python_new_can_be_replaced_and_rolled_back() -> None:
    class Base:
        def __new__(cls, *args: object) -> Any:
            return super().__new__(cls)

    class Point(Base):
        def __init__(self, x: int) -> None:
            self.x = x

    class Tagged(VLLMPatch[Point]):
        def __new__(cls, *args: object) -> Any:
            obj = cls._original___new__(cls, *args)  # type: ignore[attr-defined]
            obj.tagged = True
            return obj

    before = snapshot_namespace(Point)
    with applied(Tagged):
        assert Point(1).tagged  # type: ignore[attr-defined]
    before.assert_unchanged()
    assert Point(2).x == 2 and not hasattr(Point(2), "tagged")


# -- 4. a subclass patch cannot stack on a base patch's addition -----------------


class Base4:
    pass


class Sub4(Base4):
    pass


def test_overriding_another_patchs_addition_is_a_conflict() -> None:
    class AddsHelper(VLLMPatch[Base4]):
        def helper(self) -> str:
            return "A"

    class WrapsHelper(VLLMPatch[Sub4]):
        def helper(self) -> str:
            return "B>" + self._original_helper()  # type: ignore[attr-defined,no-any-return]

    AddsHelper.apply()
    before = snapshot_namespace(Sub4)
    with pytest.raises(PatchConflictError, match=r"'AddsHelper'.*as the original of Sub4\.helper"):
        WrapsHelper.apply()
    before.assert_unchanged()
    AddsHelper.rollback()
    assert not hasattr(Sub4(), "helper")


def test_the_other_order_does_not_stack_and_is_allowed() -> None:
    class AddsHelper(VLLMPatch[Base4]):
        def helper(self) -> str:
            return "A"

    class SubHelper(VLLMPatch[Sub4]):
        def helper(self) -> str:
            return "B"

    with applied(SubHelper, AddsHelper):  # both are additions; neither keeps the other as original
        assert (Base4().helper(), Sub4().helper()) == ("A", "B")  # type: ignore[attr-defined]
        AddsHelper.rollback()
        assert Sub4().helper() == "B"  # type: ignore[attr-defined]


# -- 5. siblings in a diamond -----------------------------------------------------


def _diamond() -> tuple[type, type, type, type]:
    class Base:
        def step(self) -> list[str]:
            return ["base"]

    class Left(Base):
        def step(self) -> list[str]:
            return ["left", *super().step()]

    class Right(Base):
        pass

    class Both(Left, Right):
        pass

    return Base, Left, Right, Both


@pytest.mark.parametrize("order", ["left-first", "right-first"])
def test_patching_both_sides_of_a_diamond_is_a_conflict(order: str) -> None:
    _, left, right, both = _diamond()

    class OnLeft(VLLMPatch[left]):  # type: ignore[valid-type,misc]
        def step(self) -> list[str]:
            return ["L", *self._original_step()]

    class OnRight(VLLMPatch[right]):  # type: ignore[valid-type,misc]
        def step(self) -> list[str]:
            return ["R", *self._original_step()]

    first, second = (OnLeft, OnRight) if order == "left-first" else (OnRight, OnLeft)
    first.apply()
    before = snapshot_namespace(second._vcp_spec.target)  # type: ignore[arg-type]
    with pytest.raises(PatchConflictError, match="same class hierarchy"):
        second.apply()
    before.assert_unchanged()
    assert both().step()[0] in {"L", "left"}  # no RecursionError


def test_unrelated_siblings_without_a_common_subclass_can_both_be_patched() -> None:
    _base, left, right, both = _diamond()
    both.__bases__ = (left,)  # Right is no longer in any common MRO

    class OnLeft(VLLMPatch[left]):  # type: ignore[valid-type,misc]
        def step(self) -> list[str]:
            return ["L", *self._original_step()]

    class OnRight(VLLMPatch[right]):  # type: ignore[valid-type,misc]
        def step(self) -> list[str]:
            return ["R", *self._original_step()]

    with applied(OnLeft, OnRight):
        assert right().step() == ["R", "base"]
        assert left().step() == ["L", "left", "base"]


# -- 7. abc's bookkeeping ---------------------------------------------------------


def test_abc_caches_do_not_keep_what_a_rolled_back_patch_taught_them() -> None:
    class Batch:
        pass

    class Sized(VLLMPatch[Batch]):
        def __len__(self) -> int:
            return 3

    assert not isinstance(Batch(), collections.abc.Sized)  # now in Sized's negative cache
    with applied(Sized):
        assert isinstance(Batch(), collections.abc.Sized)  # the negative cache was invalidated
    assert not isinstance(Batch(), collections.abc.Sized)  # and the positive one cleared


def test_abc_caches_follow_a_none_member_replaced_and_put_back() -> None:
    class Key:  # noqa: PLW1641 - the implicit __hash__ = None is the subject
        def __eq__(self, other: object) -> bool:
            return True  # so Python set __hash__ = None: not Hashable

    class HashById(VLLMPatch[Key]):
        def __hash__(self) -> int:
            return id(self)

    assert not isinstance(Key(), collections.abc.Hashable)
    with applied(HashById):
        assert isinstance(Key(), collections.abc.Hashable)
    assert not isinstance(Key(), collections.abc.Hashable)


def test_implementing_an_abstract_method_makes_the_class_concrete_and_rollback_restores_it() -> None:
    class Policy(abc.ABC):
        @abc.abstractmethod
        def pick(self) -> int: ...

    class Child(Policy):
        pass

    class Picks(VLLMPatch[Policy]):
        def pick(self) -> int:
            return 7

    before, child_before = snapshot_namespace(Policy), snapshot_namespace(Child)
    with pytest.raises(TypeError, match="abstract"):
        Policy()
    with applied(Picks):
        assert Policy().pick() == 7  # type: ignore[abstract]
        assert Child().pick() == 7  # type: ignore[abstract]
    with pytest.raises(TypeError, match="abstract"):
        Policy()
    with pytest.raises(TypeError, match="abstract"):
        Child()
    before.assert_unchanged()  # __abstractmethods__ is the very same frozenset again
    child_before.assert_unchanged()


# -- 9. a global named _original_* is not an attribute ---------------------------


def _original_schedule(obj: object) -> str:
    """A module-level leftover of a hand-written monkey patch."""
    return "global"


def test_a_global_named_like_an_original_is_not_taken_for_one() -> None:
    class Scheduler:
        def run(self) -> str:
            return "run"

    class Migrated(VLLMPatch[Scheduler]):
        def run(self) -> str:
            return _original_schedule(self)

    with applied(Migrated):
        assert Scheduler().run() == "global"


def test_an_attribute_original_without_its_member_is_still_refused() -> None:
    with pytest.raises(PatchDefinitionError, match=r"uses self\._original_other"):

        class Wrong(VLLMPatch[Base4]):
            def run(self) -> object:
                # The call inside a nested function is the subject (found in its code object).
                return (lambda: self._original_other())()  # type: ignore[attr-defined]  # noqa: PLC3002, PLW0108


# -- 10. members of plain mixins are grafted --------------------------------------


class LogMixin:
    def _log(self, message: str) -> str:
        return f"[{type(self).__name__}] {message}"

    def describe(self) -> str:
        return "mixin:" + super().describe()  # type: ignore[misc,no-any-return]


def test_members_of_a_plain_mixin_are_grafted_with_super_rebound() -> None:
    class Base:
        def describe(self) -> str:
            return "base"

    class Engine(Base):
        def step(self) -> str:
            return "step"

    class Logged(LogMixin, VLLMPatch[Engine]):
        def step(self) -> str:
            return self._log(self._original_step())  # type: ignore[attr-defined,no-any-return]

    before = snapshot_namespace(Engine)
    assert set(Logged._vcp_spec.members) == {"_log", "describe", "step"}
    with applied(Logged):
        engine = Engine()
        assert engine.step() == "[Engine] step"
        assert engine.describe() == "mixin:base"  # super() walks Engine's MRO
    before.assert_unchanged()


def test_a_mixin_with_slots_is_refused_and_empty_slots_are_fine() -> None:
    class Slotted:
        __slots__ = ("cache",)

    class Empty:
        __slots__ = ()

        def helper(self) -> int:
            return 1

    with pytest.raises(PatchDefinitionError, match=r"Slotted declares __slots__ = \('cache',\)"):

        class Bad(Slotted, VLLMPatch[Base4]):
            pass

    class Good(Empty, VLLMPatch[Base4]):
        pass

    assert set(Good._vcp_spec.members) == {"helper"}


def test_a_mixin_defining_eq_does_not_graft_the_implicit_hash() -> None:
    class EqMixin:  # noqa: PLW1641 - the implicit __hash__ = None is the subject
        def __eq__(self, other: object) -> bool:
            return True

    class Plain:
        pass

    class P(EqMixin, VLLMPatch[Plain]):
        pass

    assert set(P._vcp_spec.members) == {"__eq__"}


# -- 11. rollback while a call is inside the patched method ----------------------


def _wait_until_removed(cls: type, name: str, timeout: float = 5) -> None:
    """The sweeper removes a lingering original soon after the last call returns."""
    deadline = time.monotonic() + timeout
    while name in vars(cls) and time.monotonic() < deadline:
        time.sleep(0.005)


def test_a_call_in_progress_survives_a_rollback_and_the_original_goes_after() -> None:
    class Engine:
        def step(self) -> str:
            return "original"

    inside, release = threading.Event(), threading.Event()

    class Slow(VLLMPatch[Engine]):
        def step(self) -> str:
            inside.set()
            release.wait(5)
            return "patched>" + self._original_step()  # type: ignore[attr-defined,no-any-return]

    before = snapshot_namespace(Engine)
    results: list[str] = []
    Slow.apply()
    worker = threading.Thread(target=lambda: results.append(Engine().step()))
    worker.start()
    assert inside.wait(5)
    assert Slow.rollback()
    assert Engine().step() == "original"  # new calls reach the original at once
    assert "_original_step" in vars(Engine)  # kept: the call in progress still needs it
    release.set()
    worker.join(5)
    assert results == ["patched>original"]
    _wait_until_removed(Engine, "_original_step")
    before.assert_unchanged()


def test_reapplying_while_an_original_lingers_takes_it_over_and_stays_exact() -> None:
    class Engine:
        def step(self) -> str:
            return "original"

    inside, release = threading.Event(), threading.Event()

    class Slow(VLLMPatch[Engine]):
        def step(self) -> str:
            if threading.current_thread().name == "slow-caller":
                inside.set()
                release.wait(5)
            return "patched>" + self._original_step()  # type: ignore[attr-defined,no-any-return]

    before = snapshot_namespace(Engine)
    results: list[str] = []
    Slow.apply()
    worker = threading.Thread(target=lambda: results.append(Engine().step()), name="slow-caller")
    worker.start()
    assert inside.wait(5)
    Slow.rollback()
    assert Slow.apply()  # not refused as an outside "_original_step"
    release.set()
    worker.join(5)
    assert results == ["patched>original"]
    assert Engine().step() == "patched>original"
    time.sleep(0.1)  # the sweeper must not remove what the second apply owns
    assert Engine().step() == "patched>original"
    Slow.rollback()
    before.assert_unchanged()


def test_rollback_from_inside_the_patched_method_keeps_its_original() -> None:
    class Engine:
        def step(self) -> str:
            return "original"

    class SelfRemoving(VLLMPatch[Engine]):
        def step(self) -> str:
            PatchManager.rollback("SelfRemoving")
            return "patched>" + self._original_step()  # type: ignore[attr-defined,no-any-return]

    before = snapshot_namespace(Engine)
    SelfRemoving.apply()
    assert Engine().step() == "patched>original"
    _wait_until_removed(Engine, "_original_step")
    before.assert_unchanged()


def test_a_class_refusing_its_abstractmethods_update_keeps_the_ledger_in_step() -> None:
    class Refusing(abc.ABCMeta):
        def __setattr__(cls, name: str, value: Any) -> None:
            if name == "__abstractmethods__" and "_sealed" in vars(cls):
                raise TypeError("__abstractmethods__ is sealed")
            super().__setattr__(name, value)

    class Policy(metaclass=Refusing):
        @abc.abstractmethod
        def pick(self) -> int: ...

    type.__setattr__(Policy, "_sealed", True)

    class Picks(VLLMPatch[Policy]):
        def pick(self) -> int:
            return 7

    before = snapshot_namespace(Policy)
    assert Picks.apply() and Picks.is_applied()  # applied and recorded, abc merely left as it was
    assert Picks.rollback() and not Picks.is_applied()
    before.assert_unchanged()
