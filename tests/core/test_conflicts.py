"""Rule 5: a member owned by an applied patch is never taken over silently."""

from __future__ import annotations

import pytest

from vllm_custom_patches import PatchConflictError, PatchManager, VLLMPatch
from vllm_custom_patches.testing import snapshot_namespace


class Target:
    def a(self) -> str:
        return "a"

    def b(self) -> str:
        return "b"


class Child(Target):
    pass


def test_second_patch_on_same_member_is_refused_naming_both() -> None:
    class First(VLLMPatch[Target]):
        def a(self) -> str:
            return "first"

    class Second(VLLMPatch[Target]):
        def b(self) -> str:
            return "second-b"

        def a(self) -> str:  # conflict found on the last member
            return "second"

    First.apply()
    after_first = snapshot_namespace(Target)
    with pytest.raises(PatchConflictError) as info:
        Second.apply()
    assert "'Second'" in str(info.value) and "'First'" in str(info.value) and "Target.a" in str(info.value)
    after_first.assert_unchanged()
    assert Target().b() == "b"
    assert PatchManager.applied() == ["First"]


def test_two_patches_adding_the_same_new_member_conflict() -> None:
    class AddsX(VLLMPatch[Target]):
        def x(self) -> int:
            return 1

    class AlsoAddsX(VLLMPatch[Target]):
        def x(self) -> int:
            return 2

    AddsX.apply()
    with pytest.raises(PatchConflictError, match="AddsX"):
        AlsoAddsX.apply()


def test_disjoint_patches_coexist_and_roll_back_independently() -> None:
    original = snapshot_namespace(Target)

    class PatchA(VLLMPatch[Target]):
        def a(self) -> str:
            return "A"

    class PatchB(VLLMPatch[Target]):
        def b(self) -> str:
            return "B"

    PatchA.apply()
    PatchB.apply()
    PatchA.rollback()
    assert Target().a() == "a" and Target().b() == "B"
    assert "_original_b" in vars(Target) and "_original_a" not in vars(Target)
    PatchB.rollback()
    original.assert_unchanged()


def test_existing_foreign_original_attribute_is_a_conflict() -> None:
    class Foreign:
        def m(self) -> int:
            return 1

        def _original_m(self) -> int:
            return 0

    class OverM(VLLMPatch[Foreign]):
        def m(self) -> int:
            return 2

    before = snapshot_namespace(Foreign)
    with pytest.raises(PatchConflictError, match="not made by vllm-custom-patches"):
        OverM.apply()
    before.assert_unchanged()


@pytest.mark.parametrize("order", ["base-first", "child-first"])
def test_same_member_on_base_and_subclass_is_refused(order: str) -> None:
    class OnBase(VLLMPatch[Target]):
        def a(self) -> str:
            return "base:" + self._original_a()  # type: ignore[attr-defined,no-any-return]

    class OnChild(VLLMPatch[Child]):
        def a(self) -> str:
            return "child:" + self._original_a()  # type: ignore[attr-defined,no-any-return]

    first, second = (OnBase, OnChild) if order == "base-first" else (OnChild, OnBase)
    first.apply()
    with pytest.raises(PatchConflictError, match="same class hierarchy"):
        second.apply()
    # What stays applied still works, without recursion.
    assert Child().a() in {"base:a", "child:a"}


def test_conflict_check_does_not_fire_after_rollback() -> None:
    class One(VLLMPatch[Target]):
        def a(self) -> str:
            return "1"

    class Two(VLLMPatch[Target]):
        def a(self) -> str:
            return "2"

    One.apply()
    One.rollback()
    assert Two.apply()
    assert Target().a() == "2"
