"""Rule 7: rollback restores the target's own __dict__ exactly, keys and identities."""

from __future__ import annotations

import pytest

from vllm_custom_patches import PatchConflictError, PatchManager, VLLMPatch
from vllm_custom_patches.testing import applied, snapshot_namespace


class Base:
    def inherited(self) -> str:
        return "base"

    @staticmethod
    def static_inherited() -> str:
        return "static-base"


class Target(Base):
    value = 1

    def own(self) -> str:
        return "own"

    @classmethod
    def cm(cls) -> str:
        return cls.__name__

    @property
    def prop(self) -> int:
        return 3


def _full_patch() -> type:
    class Everything(VLLMPatch[Target]):
        value = 2

        def own(self) -> str:
            return "p"

        def inherited(self) -> str:
            return "p"

        @staticmethod
        def static_inherited() -> str:
            return "p"

        @classmethod
        def cm(cls) -> str:
            return "p"

        @property
        def prop(self) -> int:
            return 4

        def added(self) -> str:
            return "p"

    return Everything


def test_rollback_restores_namespace_exactly_and_returns_flags() -> None:
    target_before, base_before = snapshot_namespace(Target), snapshot_namespace(Base)
    patch = _full_patch()
    assert patch.apply() is True
    assert target_before.changes()
    assert patch.rollback() is True
    target_before.assert_unchanged()
    base_before.assert_unchanged()
    assert patch.rollback() is False
    assert not patch.is_applied()
    obj = Target()
    assert (obj.own(), obj.inherited(), Target.static_inherited(), Target.cm(), obj.prop, Target.value) == (
        "own",
        "base",
        "static-base",
        "Target",
        3,
        1,
    )


def test_inherited_member_leaves_no_copy_on_the_subclass() -> None:
    patch = _full_patch()
    patch.apply()
    assert "inherited" in vars(Target)
    patch.rollback()
    assert "inherited" not in vars(Target)
    assert "_original_inherited" not in vars(Target)


def test_reapply_after_rollback_works_repeatedly() -> None:
    before = snapshot_namespace(Target)
    patch = _full_patch()
    for _ in range(3):
        assert patch.apply()
        assert Target().own() == "p" and Target().added() == "p"  # type: ignore[attr-defined]
        assert patch.rollback()
        before.assert_unchanged()


def test_rollback_by_name_and_class() -> None:
    patch = _full_patch()
    patch.apply()
    assert PatchManager.is_applied("Everything") and PatchManager.is_applied(patch)
    assert PatchManager.rollback("Everything")
    assert not PatchManager.rollback(patch)


def test_rollback_refuses_when_outside_code_replaced_a_member() -> None:
    patch = _full_patch()
    patch.apply()
    patched = snapshot_namespace(Target)
    foreign = lambda self: "foreign"  # noqa: E731
    Target.own = foreign  # type: ignore[method-assign]
    with pytest.raises(PatchConflictError, match=r"Target.own was replaced.*nothing was rolled back"):
        patch.rollback()
    assert vars(Target)["own"] is foreign
    assert patched.changes() == [f"~ own: {patched.entries['own']!r} -> {foreign!r}"]
    assert patch.is_applied()
    Target.own = patched.entries["own"]  # type: ignore[method-assign]
    assert patch.rollback()


def test_rollback_all_goes_in_reverse_order() -> None:
    class Other:
        def x(self) -> int:
            return 0

    class P1(VLLMPatch[Target]):
        def own(self) -> str:
            return "1"

    class P2(VLLMPatch[Other]):
        def x(self) -> int:
            return 2

    class P3(VLLMPatch[Target]):
        @classmethod
        def cm(cls) -> str:
            return "3"

    before_target, before_other = snapshot_namespace(Target), snapshot_namespace(Other)
    for patch in (P1, P2, P3):
        patch.apply()
    assert PatchManager.applied() == ["P1", "P2", "P3"]
    assert PatchManager.rollback_all() == ["P3", "P2", "P1"]
    assert PatchManager.applied() == []
    assert PatchManager.rollback_all() == []
    before_target.assert_unchanged()
    before_other.assert_unchanged()


def test_applied_context_manager_rolls_back_on_error() -> None:
    before = snapshot_namespace(Target)
    patch = _full_patch()
    with pytest.raises(RuntimeError, match="inside"), applied(patch):
        assert Target().own() == "p"
        raise RuntimeError("inside")
    before.assert_unchanged()


def test_snapshot_reports_each_kind_of_change() -> None:
    before = snapshot_namespace(Target)
    patch = _full_patch()
    patch.apply()
    lines = before.changes()
    assert any(line.startswith("+ added") for line in lines)
    assert any(line.startswith("~ own") for line in lines)
    with pytest.raises(AssertionError, match=r"Target\.__dict__ changed"):
        before.assert_unchanged()
