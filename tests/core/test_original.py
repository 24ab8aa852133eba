"""``MyPatch.original(name)``: the original as the target holds it, whatever ``self`` is."""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any

import pytest

from vllm_custom_patches import PatchTargetError, VLLMPatch
from vllm_custom_patches.testing import applied


class Counter:
    def __init__(self) -> None:
        self.items = [1, 2]

    def count(self) -> int:
        return len(self.items)

    @classmethod
    def kind(cls) -> str:
        return cls.__name__

    @property
    def size(self) -> int:
        return 10 * len(self.items)


def _patches() -> tuple[type, type]:
    # Defined per test: the registry is isolated per test (tests/conftest.py).
    class ThroughSelf(VLLMPatch[Counter]):
        def count(self) -> int:
            return self._original_count() + 100  # type: ignore[attr-defined,no-any-return]

    class ThroughPatch(VLLMPatch[Counter]):
        def count(self) -> int:
            return ThroughPatch.original("count")(self) + 100  # type: ignore[no-any-return]

        @classmethod
        def kind(cls) -> str:
            return "patched-" + ThroughPatch.original("kind")()  # type: ignore[operator]

        @property
        def size(self) -> int:
            return ThroughPatch.original("size").fget(self) + 1  # type: ignore[no-any-return]

    return ThroughSelf, ThroughPatch


def test_a_stand_in_self_reaches_the_original_only_through_the_patch() -> None:
    ThroughSelf, ThroughPatch = _patches()
    stub = SimpleNamespace(items=[1, 2, 3])  # what vLLM's own unit tests pass as self
    with applied(ThroughSelf), pytest.raises(AttributeError, match="_original_count"):
        Counter.count(stub)  # type: ignore[arg-type]
    with applied(ThroughPatch):
        assert Counter.count(stub) == 103  # type: ignore[arg-type]
        assert Counter().count() == 102


def test_originals_come_as_the_target_holds_them() -> None:
    _, ThroughPatch = _patches()
    with applied(ThroughPatch):
        assert Counter.kind() == "patched-Counter"  # the class method is bound to the target
        assert Counter().size == 21


def test_asking_for_a_member_the_patch_does_not_replace_or_while_not_applied_is_an_error() -> None:
    _, ThroughPatch = _patches()
    with pytest.raises(PatchTargetError, match="is not applied"):
        ThroughPatch.original("count")
    with applied(ThroughPatch), pytest.raises(PatchTargetError, match=r"does not replace 'items'.*count, kind, size"):
        ThroughPatch.original("items")


def test_a_call_in_progress_keeps_its_original_through_a_rollback() -> None:
    inside, release = threading.Event(), threading.Event()
    results: list[Any] = []

    class Slow(VLLMPatch[Counter]):
        def count(self) -> int:
            inside.set()
            release.wait(5)
            return Slow.original("count")(self) + 1  # type: ignore[no-any-return]

    Slow.apply()
    worker = threading.Thread(target=lambda: results.append(Counter().count()))
    worker.start()
    assert inside.wait(5)
    Slow.rollback()
    release.set()
    worker.join(5)
    assert results == [3]
