"""The core's instrument hook (``_core.instrument``), with telemetry as the instrument (issue 20, part 1).

Off (nothing installed): apply grafts exactly the objects it always did.  On:
what goes on the target is a stand-in of the same kind, and every promise of
the core holds as without it: exact rollback (the target's ``__dict__``
identical, names and objects), ``super()``, descriptors, stacks, kind checks,
threads, exceptions, recursion, and a rolled-back patch's original kept while a
call is still inside it.  The figures themselves are tests/runtime/test_telemetry.py's.
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from vllm_custom_patches import PatchManager, PatchTargetError, VLLMPatch, changes_kind
from vllm_custom_patches._core import instrument
from vllm_custom_patches._core.graft import MISSING
from vllm_custom_patches._core.kinds import member_kind
from vllm_custom_patches._core.registry import REGISTRY
from vllm_custom_patches._runtime import telemetry
from vllm_custom_patches.testing import snapshot_namespace

_HANG_GUARD_S = 30


@pytest.fixture(autouse=True)
def _telemetry_off_after() -> Iterator[None]:
    yield
    telemetry._reset_for_tests()
    assert instrument.installed() is None


def row(patch: str, member: str) -> dict[str, Any]:
    return next(r for r in telemetry.rows() if r["patch"] == patch and r["member"] == member)


def fresh_target() -> type:
    """A class with one member of every kind, its own for each test."""

    class Base:
        def m(self, x: int = 1) -> int:
            return x

    class Target(Base):
        def m(self, x: int = 1) -> int:
            return super().m(x) + 1

        @staticmethod
        def s(a: int, *, b: int = 2) -> int:
            return a + b

        @classmethod
        def c(cls, a: int) -> tuple[str, int]:
            return cls.__name__, a

        @property
        def p(self) -> int:
            return int(self.__dict__.get("_p", 0))

        @p.setter
        def p(self, value: int) -> None:
            self.__dict__["_p"] = value

        def gen(self) -> Iterator[int]:
            yield 1

        async def coro(self) -> int:
            return 1

        @functools.cached_property
        def cached(self) -> int:
            return 7

    return Target


def every_kind_patch(target: type, patch_name: str) -> Any:
    class EveryKind(VLLMPatch[target]):  # type: ignore[valid-type,misc]
        name = patch_name

        def m(self, x: int = 1) -> int:
            return self._original_m(x) * 10  # type: ignore[no-any-return]

        @staticmethod
        def s(a: int, *, b: int = 2) -> int:
            return target._original_s(a, b=b) * 2  # type: ignore[no-any-return]

        @classmethod
        def c(cls, a: int) -> tuple[str, int]:
            return cls._original_c(a + 1)  # type: ignore[no-any-return]

        @property
        def p(self) -> int:
            return EveryKind.original("p").fget(self) + 100  # type: ignore[no-any-return]

        @p.setter
        def p(self, value: int) -> None:
            EveryKind.original("p").fset(self, value * 2)

        def gen(self) -> Iterator[int]:
            yield 2

        async def coro(self) -> int:
            return 2

        @functools.cached_property
        def cached(self) -> int:
            return 8

        def added(self) -> str:
            return "added"

        LIMIT = 3

    return EveryKind


def check_behaviour(target: type) -> None:
    obj = target()
    assert obj.m() == 20 and obj.m(3) == 40  # the original (with its super()) times ten
    assert target.s(1) == 6 and target.s(1, b=5) == 12
    assert obj.c(4) == (target.__name__, 5)
    obj.p = 4
    assert obj.p == 108
    assert list(obj.gen()) == [2]
    assert obj.cached == 8
    assert obj.added() == "added" and target.LIMIT == 3


# -- off: exactly what apply always grafted ----------------------------------------------------


def test_off_the_target_holds_the_patch_objects_themselves_and_the_originals_raw() -> None:
    target = fresh_target()
    originals = dict(vars(target))
    patch = every_kind_patch(target, "every_off")
    PatchManager.apply(patch)
    members = patch._vcp_spec.members
    for name in ("m", "s", "c", "p", "gen", "coro", "cached", "added", "LIMIT"):
        assert vars(target)[name] is members[name], name
    for name in ("m", "s", "c", "p", "gen", "coro", "cached"):
        assert vars(target)[f"_original_{name}"] is originals[name], name
    check_behaviour(target)
    assert telemetry.rows() == []  # nothing was timed


def test_off_a_stack_holds_the_layers_members_and_its_tables_the_raw_next_layer() -> None:
    class Target:
        def m(self) -> str:
            return "T"

    base = vars(Target)["m"]

    class Outer(VLLMPatch[Target], stackable=True, order=1):
        def m(self) -> str:
            return "O>" + Outer.original("m")(self)  # type: ignore[no-any-return]

    class Inner(VLLMPatch[Target], stackable=True):
        def m(self) -> str:
            return "I>" + Inner.original("m")(self)  # type: ignore[no-any-return]

    Outer.apply()
    Inner.apply()
    assert vars(Target)["m"] is Outer._vcp_spec.members["m"]
    assert Outer.original("m") is Inner._vcp_spec.members["m"]
    assert Inner.original("m") is base
    assert REGISTRY.stacks[(Target, "m")].reach is MISSING
    assert Target().m() == "O>I>T"


# -- on: stand-ins of the same kind, exact rollback ---------------------------------------------


def test_on_every_timeable_member_is_a_stand_in_of_its_own_kind_and_rollback_is_exact() -> None:
    target = fresh_target()
    snapshot = snapshot_namespace(target)
    telemetry.enable()
    patch = every_kind_patch(target, "every_on")
    PatchManager.apply(patch)
    members = patch._vcp_spec.members
    held = vars(target)
    for name in ("m", "s", "c", "p", "added"):
        assert held[name] is not members[name], f"{name} is not timed"
        assert type(held[name]) is type(members[name]), name
        assert member_kind(held[name], name) == member_kind(members[name], name), name
    # Generators, coroutines, cached_property and plain values are left as the patch wrote them.
    for name in ("gen", "coro", "cached", "LIMIT"):
        assert held[name] is members[name], name
    assert inspect.iscoroutinefunction(target.coro)
    # The stand-ins look like what they stand for.
    assert held["m"].__wrapped__ is members["m"] and held["m"].__name__ == "m"
    assert inspect.signature(held["m"]) == inspect.signature(members["m"])
    assert inspect.signature(target.s) == inspect.signature(members["s"].__func__)
    # The originals the patch reaches are timing shims of the same kind as the originals.
    for name in ("m", "s", "c", "p"):
        assert type(held[f"_original_{name}"]) is type(snapshot.entries[name]), name
        assert held[f"_original_{name}"] is not snapshot.entries[name], name
    check_behaviour(target)
    assert {r["member"] for r in telemetry.rows() if r["patch"] == "every_on"} == {"m", "s", "c", "p", "added"}
    PatchManager.rollback(patch)
    snapshot.assert_unchanged()
    assert target().m(3) == 4


def test_telemetry_changes_only_what_is_applied_afterwards() -> None:
    class Target:
        def m(self) -> int:
            return 1

    class Before(VLLMPatch[Target]):
        def m(self) -> int:
            return self._original_m() + 1  # type: ignore[no-any-return]

    Before.apply()
    telemetry.enable()
    assert vars(Target)["m"] is Before._vcp_spec.members["m"]  # applied before: untouched
    Before.rollback()
    Before.apply()
    assert vars(Target)["m"] is not Before._vcp_spec.members["m"]  # applied again while on: timed
    telemetry.disable()
    assert Target().m() == 2 and row("Before", "m")["calls"] == 1
    Before.rollback()
    Before.apply()
    assert vars(Target)["m"] is Before._vcp_spec.members["m"]


def test_super_in_a_timed_member_walks_the_targets_mro() -> None:
    class Base:
        def m(self) -> str:
            return "base"

    class Target(Base):
        pass

    class UsesSuper(VLLMPatch[Target]):
        def m(self) -> str:
            return "patched>" + super().m()  # type: ignore[misc]

    telemetry.enable()
    snapshot = snapshot_namespace(Target)
    UsesSuper.apply()
    assert Target().m() == "patched>base"
    assert row("UsesSuper", "m")["calls"] == 1
    UsesSuper.rollback()
    snapshot.assert_unchanged()
    assert Target().m() == "base"


def test_a_kind_change_the_patch_marks_is_kept_and_one_it_does_not_is_still_refused() -> None:
    class Target:
        @staticmethod
        def helper(x: int) -> int:
            return x

        def other(self) -> int:
            return 1

    class Marked(VLLMPatch[Target]):
        @changes_kind
        def helper(self, x: int) -> int:
            return x + 1

    class Unmarked(VLLMPatch[Target]):
        @staticmethod
        def other() -> int:
            return 2

    telemetry.enable()
    snapshot = snapshot_namespace(Target)
    Marked.apply()
    assert member_kind(vars(Target)["helper"], "helper") == "method"
    assert Target().helper(1) == 2
    with pytest.raises(PatchTargetError, match="is a @staticmethod in the patch but a plain method"):
        Unmarked.apply()
    Marked.rollback()
    snapshot.assert_unchanged()


def test_an_instrument_that_would_change_a_kind_is_not_followed(caplog: pytest.LogCaptureFixture) -> None:
    class Target:
        def m(self) -> int:
            return 1

    class Wrong:
        def member(self, patch: str, target: type, name: str, value: object) -> object:
            return staticmethod(lambda: 99)  # would make a method a static method

        def original(self, target: type, name: str, value: object) -> object:
            return property(lambda self: 99)

    class Plain(VLLMPatch[Target]):
        def m(self) -> int:
            return self._original_m() + 1  # type: ignore[no-any-return]

    snapshot = snapshot_namespace(Target)
    instrument.install(Wrong())
    try:
        with caplog.at_level(logging.WARNING, logger="vllm.custom_patches"):
            Plain.apply()
    finally:
        instrument.install(None)
    assert vars(Target)["m"] is Plain._vcp_spec.members["m"]
    assert vars(Target)["_original_m"] is snapshot.entries["m"]
    assert Target().m() == 2
    assert "a stand-in must be of the same type" in caplog.text
    Plain.rollback()
    snapshot.assert_unchanged()


# -- stacks -------------------------------------------------------------------------------------


def _layer(name: str, target: type, order: int) -> Any:
    def m(self: Any) -> str:
        return f"{name}>" + patch.original("m")(self)

    patch: Any = type(VLLMPatch)(name, (VLLMPatch[target],), {"m": m}, stackable=True, order=order)
    return patch


@pytest.mark.parametrize("order_of_rollbacks", [("a", "b", "c"), ("b", "a", "c"), ("c", "b", "a")])
def test_a_timed_stack_calls_every_layer_and_rolls_back_exactly_in_any_order(
    order_of_rollbacks: tuple[str, ...],
) -> None:
    class Target:
        def m(self) -> str:
            return "T"

    snapshot = snapshot_namespace(Target)
    telemetry.enable()
    layers = {name: _layer(name, Target, order) for name, order in (("a", 3), ("b", 2), ("c", 1))}
    for layer in layers.values():
        layer.apply()
    assert Target().m() == "a>b>c>T"
    # The innermost reaches vLLM's original through the timing shim; the target keeps the original raw.
    stack = REGISTRY.stacks[(Target, "m")]
    assert vars(Target)["_original_m"] is snapshot.entries["m"]
    assert layers["c"].original("m") is stack.reach is not snapshot.entries["m"]
    assert stack.reach.__wrapped__ is snapshot.entries["m"]
    calls = dict.fromkeys("abc", 1)
    remaining = ["a", "b", "c"]
    for name in order_of_rollbacks:
        layers[name].rollback()
        remaining.remove(name)
        assert Target().m() == "".join(f"{n}>" for n in remaining) + "T"
        calls.update({n: calls[n] + 1 for n in remaining})
    snapshot.assert_unchanged()
    assert {n: row(n, "m")["calls"] for n in "abc"} == calls


def test_layers_applied_with_and_without_telemetry_stack_together() -> None:
    class Target:
        def m(self) -> str:
            return "T"

    snapshot = snapshot_namespace(Target)
    untimed = _layer("untimed", Target, 2)
    untimed.apply()
    telemetry.enable()
    timed = _layer("timed", Target, 1)
    timed.apply()
    assert Target().m() == "untimed>timed>T"
    assert row("timed", "m")["calls"] == 1 and {r["patch"] for r in telemetry.rows()} == {"timed"}
    timed.rollback()
    untimed.rollback()
    snapshot.assert_unchanged()


# -- threads, exceptions, recursion ------------------------------------------------------------


def test_threads_count_every_call_without_losing_one() -> None:
    class Target:
        def m(self, x: int) -> int:
            return x

    class Counted(VLLMPatch[Target]):
        def m(self, x: int) -> int:
            return self._original_m(x) + 1  # type: ignore[no-any-return]

    telemetry.enable()
    Counted.apply()
    threads, calls = 8, 5000
    start = threading.Barrier(threads)
    obj = Target()

    def work() -> None:
        start.wait(timeout=_HANG_GUARD_S)
        for i in range(calls):
            assert obj.m(i) == i + 1

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=_HANG_GUARD_S)
    assert not any(worker.is_alive() for worker in workers)
    figures = row("Counted", "m")
    assert figures["calls"] == threads * calls
    assert 0 <= figures["own_s"] <= figures["total_s"]


def test_an_exception_passes_through_unchanged_and_is_counted_only_where_it_was_raised() -> None:
    class Target:
        def m(self, fail: str) -> str:
            if fail in ("original", "translate"):
                raise KeyError(fail)
            return "T"

    def outer_m(self: Any, fail: str) -> str:
        if fail == "outer":
            raise RuntimeError("the outer layer's own")
        return "O>" + Outer.original("m")(self, fail)  # type: ignore[no-any-return]

    def inner_m(self: Any, fail: str) -> str:
        try:
            return "I>" + Inner.original("m")(self, fail)  # type: ignore[no-any-return]
        except KeyError as exc:
            if fail == "translate":  # caught, and a new error raised: the layer's own
                raise ValueError("the inner layer's own") from exc
            raise

    Outer: Any = type(VLLMPatch)("Outer", (VLLMPatch[Target],), {"m": outer_m}, stackable=True, order=1)
    Inner: Any = type(VLLMPatch)("Inner", (VLLMPatch[Target],), {"m": inner_m}, stackable=True)
    telemetry.enable()
    Outer.apply()
    Inner.apply()
    obj = Target()
    with pytest.raises(KeyError, match="original"):
        obj.m("original")
    assert row("Outer", "m")["errors"] == row("Inner", "m")["errors"] == 0  # vLLM's, not theirs
    assert obj.m("no") == "O>I>T"
    with pytest.raises(ValueError, match="the inner layer's own"):
        obj.m("translate")
    assert (row("Outer", "m")["errors"], row("Inner", "m")["errors"]) == (0, 1)  # it passed through the outer
    assert row("Inner", "m")["last_error"] == "ValueError: the inner layer's own"
    with pytest.raises(RuntimeError, match="the outer layer's own"):
        obj.m("outer")
    assert (row("Outer", "m")["errors"], row("Inner", "m")["errors"]) == (1, 1)
    assert row("Outer", "m")["last_error"] == "RuntimeError: the outer layer's own"
    assert row("Outer", "m")["calls"] == 4 and row("Inner", "m")["calls"] == 3


def test_recursion_and_re_entrancy_keep_own_time_between_zero_and_the_total() -> None:
    class Target:
        def fib(self, n: int) -> int:
            return n if n < 2 else self.fib(n - 1) + self.fib(n - 2)

    class Recursive(VLLMPatch[Target]):
        def fib(self, n: int) -> int:
            # Through the target: each level is a timed call of this very member again.
            return self._original_fib(n) if n < 2 else self.fib(n - 1) + self.fib(n - 2)  # type: ignore[no-any-return]

    telemetry.enable()
    Recursive.apply()
    assert Target().fib(12) == 144
    figures = row("Recursive", "fib")
    assert figures["calls"] == 465  # every call of fib(12)'s tree
    assert 0 < figures["own_s"] <= figures["total_s"]


def test_a_rollback_while_a_thread_is_inside_the_stand_in_keeps_the_original_until_it_returns() -> None:
    """The thread is inside the timing stand-in, not yet in the patch's code: its original must not go."""

    class Target:
        def m(self) -> str:
            return "original"

    class Slow(VLLMPatch[Target]):
        def m(self) -> str:
            return "patched>" + self._original_m()  # type: ignore[no-any-return]

    inside, release = threading.Event(), threading.Event()
    block = threading.local()

    def clock() -> int:
        if getattr(block, "once", False):  # the worker's first clock read, before the patch runs
            block.once = False
            inside.set()
            assert release.wait(_HANG_GUARD_S)
        return 0

    telemetry.enable(telemetry.Telemetry(clock))
    Slow.apply()
    results: list[str] = []

    def call() -> None:
        block.once = True
        results.append(Target().m())

    worker = threading.Thread(target=call)
    worker.start()
    try:
        assert inside.wait(_HANG_GUARD_S)
        Slow.rollback()
        kept = "_original_m" in vars(Target)  # the call in flight still needs it
    finally:
        release.set()
        worker.join(_HANG_GUARD_S)
    assert kept
    assert results == ["patched>original"]
    assert Target().m() == "original"


# -- the stand-ins take exactly the parameters of what they stand for -----------------------------

_SENTINEL = object()


def test_every_parameter_form_reaches_the_patch_as_the_caller_gave_it() -> None:
    """Positional-only, defaults (the very objects), *args, keyword-only, **kwargs, and names a stand-in uses."""

    class Target:
        def m(self, a: Any, /, b: Any = _SENTINEL, *rest: Any, c: Any, d: Any = None, **more: Any) -> Any:
            return ("T", a, b, rest, c, d, more)

        def named(self, isinstance: Any, _vcp_func: Any = 1, Exception: Any = 2) -> Any:
            return ("T", isinstance, _vcp_func, Exception)

    class Forms(VLLMPatch[Target]):
        def m(self, a: Any, /, b: Any = _SENTINEL, *rest: Any, c: Any, d: Any = None, **more: Any) -> Any:
            return (b is _SENTINEL, self._original_m(a, b, *rest, c=c, d=d, **more))

        def named(self, isinstance: Any, _vcp_func: Any = 1, Exception: Any = 2) -> Any:
            if isinstance == "raise":
                raise ValueError("own")
            return self._original_named(isinstance, _vcp_func, Exception=Exception)

    telemetry.enable()
    Forms.apply()
    obj = Target()
    assert obj.m(1, c=3) == (True, ("T", 1, _SENTINEL, (), 3, None, {}))
    assert obj.m(1, 2, 5, 6, c=3, d=4, e=7) == (False, ("T", 1, 2, (5, 6), 3, 4, {"e": 7}))
    with pytest.raises(TypeError):
        obj.m(a=1, c=3)  # positional-only, as in the patch
    with pytest.raises(TypeError):
        obj.m(1)  # c is required
    assert inspect.signature(Target.m) == inspect.signature(Forms._vcp_spec.members["m"])
    assert obj.named("x") == ("T", "x", 1, 2)
    assert obj.named(isinstance="x", _vcp_func=5, Exception=6) == ("T", "x", 5, 6)
    with pytest.raises(ValueError, match="own"):
        obj.named("raise")
    # A call the parameters refuse never entered the member: the caller's error, not counted.
    assert (row("Forms", "m")["calls"], row("Forms", "m")["errors"]) == (2, 0)
    assert (row("Forms", "named")["calls"], row("Forms", "named")["errors"]) == (3, 1)
