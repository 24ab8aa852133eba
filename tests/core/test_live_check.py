"""A patch's live check (``VLLMPatch.check_live``): applying in a running process asks the patch about
every instance its target already has, and a refusal refuses the apply there, atomically.

The catalogue's policies against the real vLLM ``Scheduler`` are in
``tests/real_vllm/test_vllm_scheduler_patches.py``; the kill switch refusing on a real
``vllm serve --scheduling-policy priority`` in ``tests/real_vllm/test_vllm_control_hardening.py``.
"""

from __future__ import annotations

import gc
import textwrap
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _helpers import clean_env, forget_modules, fresh_plugin

from vllm_custom_patches import (
    PatchApplyError,
    PatchConfigError,
    PatchDefinitionError,
    PatchManager,
    PatchState,
    VLLMPatch,
    plugin,
)
from vllm_custom_patches._core import live as _live
from vllm_custom_patches._ops.control import perform
from vllm_custom_patches.testing import snapshot_namespace


class Queue:
    def __init__(self, fcfs: bool) -> None:
        self.fcfs = fcfs

    def take(self) -> str:
        return "original"


class SubQueue(Queue):
    pass


class Seen:
    """What a check was called with, held weakly: a strong list would keep garbage instances alive."""

    def __init__(self) -> None:
        self.refs: list[weakref.ref[Any]] = []

    def add(self, instance: Any) -> None:
        self.refs.append(weakref.ref(instance))

    def __contains__(self, instance: object) -> bool:
        return any(ref() is instance for ref in self.refs)

    def __len__(self) -> int:
        return len(self.refs)

    def objects(self) -> list[Any]:
        return [obj for ref in self.refs if (obj := ref()) is not None]


def _fcfs_only() -> tuple[type[VLLMPatch[Queue]], Seen]:
    seen = Seen()

    class FcfsOnly(VLLMPatch[Queue]):
        name = "fcfs_only"

        @classmethod
        def check_live(cls, instance: Any) -> None:
            seen.add(instance)
            if not instance.fcfs:
                raise PatchConfigError(f"patch 'fcfs_only' needs an FCFS queue; this one is not (at {id(instance):#x})")

        def take(self) -> str:
            assert self.fcfs, "the hot path must never meet a configuration the check refused"
            return "patched"

        def added(self) -> int:
            return 1

    return FcfsOnly, seen


def _state(name: str) -> tuple[PatchState, str]:
    return next((s.state, s.reason) for s in PatchManager.status() if s.name == name)


def test_a_failing_live_check_refuses_the_apply_and_changes_nothing() -> None:
    good, bad = Queue(fcfs=True), SubQueue(fcfs=False)  # a subclass's instance is the target's too
    patch, seen = _fcfs_only()
    before, before_sub = snapshot_namespace(Queue), snapshot_namespace(SubQueue)
    applied_before = PatchManager.applied()

    with pytest.raises(PatchConfigError, match="needs an FCFS queue"):
        patch.apply()

    assert bad in seen
    before.assert_unchanged()
    before_sub.assert_unchanged()
    assert PatchManager.applied() == applied_before and not patch.is_applied()
    assert Queue not in PatchManager._registry.owners
    assert _state("fcfs_only")[0] is PatchState.FAILED  # as any refused apply: the reason is shown
    assert bad.take() == good.take() == "original"


def test_a_passing_live_check_sees_every_live_instance_then_applies() -> None:
    queues = [Queue(fcfs=True), SubQueue(fcfs=True), Queue(fcfs=True)]
    patch, seen = _fcfs_only()

    assert PatchManager.apply(patch) is True
    assert all(q in seen for q in queues)
    assert all(type(s) in (Queue, SubQueue) for s in seen.objects())  # nothing but instances is handed over
    assert [q.take() for q in queues] == ["patched"] * 3
    patch.rollback()


def test_the_check_is_not_called_when_no_instance_exists() -> None:
    class Lonely:
        def run(self) -> str:
            return "original"

    calls = Seen()

    class Checked(VLLMPatch[Lonely]):
        @classmethod
        def check_live(cls, instance: Any) -> None:
            calls.add(instance)
            raise PatchConfigError("never acceptable")

        def run(self) -> str:
            return "patched"

    assert Checked.apply() is True
    assert len(calls) == 0 and Lonely().run() == "patched"
    Checked.rollback()


def test_instances_in_a_frozen_heap_are_found(monkeypatch: pytest.MonkeyPatch) -> None:
    # vLLM freezes its heap after start-up: its scheduler is then invisible to gc.get_referrers.
    bad = Queue(fcfs=False)
    patch, seen = _fcfs_only()
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        with pytest.raises(PatchConfigError):
            patch.apply()
        assert bad in seen
        assert gc.get_freeze_count() >= frozen  # frozen again afterwards
        assert gc.isenabled()
    finally:
        gc.unfreeze()
    assert not patch.is_applied()


def test_a_check_that_fails_by_accident_refuses_the_apply_as_an_apply_error() -> None:
    queue = Queue(fcfs=True)

    class Buggy(VLLMPatch[Queue]):
        @classmethod
        def check_live(cls, instance: Any) -> None:
            instance.no_such_attribute  # noqa: B018

        def take(self) -> str:
            return "patched"

    before = snapshot_namespace(Queue)
    with pytest.raises(
        PatchApplyError, match=r"check_live failed on the live Queue .*AttributeError.*Nothing was applied"
    ) as info:
        Buggy.apply()
    assert isinstance(info.value.__cause__, AttributeError)
    before.assert_unchanged()
    assert queue.take() == "original"


def test_patches_without_a_check_never_walk_the_heap(monkeypatch: pytest.MonkeyPatch) -> None:
    bad = Queue(fcfs=False)

    def no_walk(*args: Any) -> list[Any]:
        raise AssertionError("the heap was walked for a patch without check_live")

    monkeypatch.setattr(_live.gc, "get_referrers", no_walk)

    class Unchecked(VLLMPatch[Queue]):
        def take(self) -> str:
            return "patched"

    assert Unchecked.apply() is True
    assert bad.take() == "patched"
    Unchecked.rollback()


def test_check_live_is_a_hook_never_grafted_and_must_be_a_class_method() -> None:
    patch, _ = _fcfs_only()
    assert "check_live" not in patch._vcp_spec.members
    patch.apply()
    try:
        assert "check_live" not in vars(Queue)
    finally:
        patch.rollback()

    with pytest.raises(PatchDefinitionError, match=r"check_live is the framework's hook and must be a class method"):

        class Plain(VLLMPatch[Queue]):
            def check_live(self, instance: Any) -> None:  # type: ignore[override]
                pass

    class Mixin:
        @classmethod
        def check_live(cls, instance: Any) -> None:
            raise PatchConfigError("refused by the mixin's check")

    live = Queue(fcfs=True)

    class FromMixin(Mixin, VLLMPatch[Queue]):
        def take(self) -> str:
            return "patched"

    assert "check_live" not in FromMixin._vcp_spec.members
    with pytest.raises(PatchConfigError, match="mixin's check"):
        FromMixin.apply()
    assert live.take() == "original"


def test_the_kill_switchs_step_reports_the_refusal_and_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_CUSTOM_PATCHES_CONTROL_TOKEN", "unit-test-control-token-0123")
    bad = Queue(fcfs=False)
    patch, _ = _fcfs_only()
    before = snapshot_namespace(Queue)

    result = perform("apply", "fcfs_only", "op-live-1", "test")

    assert result["ok"] is False and result["changed"] is False
    assert "PatchConfigError" in result["error"] and "needs an FCFS queue" in result["error"]
    before.assert_unchanged()
    assert not patch.is_applied() and bad.take() == "original"


# -- start-up: the plugin applies a pending patch when its module is imported -------------

LATE = "vcp_live_late_target"


@pytest.fixture
def late_module(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[str]:
    clean_env(monkeypatch, VLLM_CUSTOM_PATCHES_VLLM_VERSION="0.32.0")
    (tmp_path / f"{LATE}.py").write_text(
        textwrap.dedent(
            """
            class Late:
                def __init__(self, fcfs=True):
                    self.fcfs = fcfs

                def run(self):
                    return "original"
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with fresh_plugin():
        yield LATE
    forget_modules(LATE)


def test_start_up_applies_on_import_without_a_check_or_a_heap_walk(
    monkeypatch: pytest.MonkeyPatch, late_module: str
) -> None:
    calls = Seen()

    class LateChecked(VLLMPatch[f"{LATE}:Late"]):  # type: ignore[misc]
        name = "late_checked"

        @classmethod
        def check_live(cls, instance: Any) -> None:
            calls.add(instance)
            if not instance.fcfs:
                raise PatchConfigError("late_checked refuses this instance")

        def run(self) -> str:
            return "patched"

    walks: list[tuple[Any, ...]] = []
    real = _live.gc.get_referrers

    def counting(*objs: Any) -> list[Any]:
        walks.append(objs)
        return real(*objs)

    monkeypatch.setattr(_live.gc, "get_referrers", counting)
    monkeypatch.setenv("VLLM_CUSTOM_PATCHES", "late_checked")
    plugin.register()
    assert _state("late_checked")[0] is PatchState.PENDING
    import vcp_live_late_target as module  # type: ignore[import-not-found]

    assert _state("late_checked")[0] is PatchState.APPLIED
    assert walks == [] and len(calls) == 0  # start-up: nothing walked, nothing checked

    # Later, in the running process: a live instance is checked when the patch is applied again.
    bad = module.Late(fcfs=False)
    assert bad.run() == "patched"  # made while applied (a real patch would refuse it in __init__)
    LateChecked.rollback()
    with pytest.raises(PatchConfigError, match="refuses this instance"):
        PatchManager.apply("late_checked")
    assert walks and bad in calls
    assert bad.run() == "original"
