"""Rule 6: a failure half-way through apply leaves the target exactly as before."""

from __future__ import annotations

from typing import Any

import pytest

from vllm_custom_patches import PatchApplyError, PatchManager, VLLMPatch
from vllm_custom_patches.testing import snapshot_namespace


class Exploding:
    def __set_name__(self, owner: type, name: str) -> None:
        if owner.__name__ != "ExplodingPatch" and not owner.__name__.startswith("VLLMPatch"):
            raise RuntimeError(f"refusing {owner.__name__}.{name}")


class Plain:
    def a(self) -> str:
        return "a"

    def b(self) -> str:
        return "b"


def test_descriptor_set_name_failure_on_last_member_restores_everything() -> None:
    before = snapshot_namespace(Plain)

    class ExplodingPatch(VLLMPatch[Plain]):
        def a(self) -> str:
            return "A"

        def b(self) -> str:
            return "B"

        def new(self) -> str:
            return "new"

        boom = Exploding()

    with pytest.raises(PatchApplyError) as info:
        ExplodingPatch.apply()
    before.assert_unchanged()
    assert isinstance(info.value.__cause__, RuntimeError)
    assert "Plain.boom" in str(info.value) and "refusing Plain.boom" in str(info.value)
    assert "left unchanged" in str(info.value)
    assert not ExplodingPatch.is_applied()
    assert PatchManager._registry.owners.get(Plain) is None
    (status,) = [s for s in PatchManager.status() if s.name == "ExplodingPatch"]
    assert status.state == "failed"


class RefusingMeta(type):
    refuse: str | None = None
    store_then_raise = False

    def __setattr__(cls, name: str, value: Any) -> None:
        if name == RefusingMeta.refuse:
            if RefusingMeta.store_then_raise:
                super().__setattr__(name, value)
            raise PermissionError(f"metaclass refuses {name}")
        super().__setattr__(name, value)

    def __delattr__(cls, name: str) -> None:
        if name == RefusingMeta.refuse:
            raise PermissionError(f"metaclass refuses deleting {name}")
        super().__delattr__(name)


class Guarded(metaclass=RefusingMeta):
    def a(self) -> str:
        return "a"

    def b(self) -> str:
        return "b"


@pytest.mark.parametrize("store_then_raise", [False, True])
@pytest.mark.parametrize("refuse", ["a", "_original_b", "b", "c"])
def test_metaclass_setattr_failure_at_any_member_restores_everything(
    refuse: str, store_then_raise: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = snapshot_namespace(Guarded)

    class GuardedPatch(VLLMPatch[Guarded]):
        def a(self) -> str:
            return "A"

        def b(self) -> str:
            return "B"

        def c(self) -> str:
            return "C"

    monkeypatch.setattr(RefusingMeta, "refuse", refuse)
    monkeypatch.setattr(RefusingMeta, "store_then_raise", store_then_raise)
    with pytest.raises(PatchApplyError, match=f"Guarded.{refuse} failed: PermissionError") as info:
        GuardedPatch.apply()
    assert isinstance(info.value.__cause__, PermissionError)
    before.assert_unchanged()
    assert Guarded().a() == "a"


def test_keyboard_interrupt_mid_apply_restores_and_propagates_unchanged() -> None:
    class Interrupting:
        def __set_name__(self, owner: type, name: str) -> None:
            if owner is Plain:
                raise KeyboardInterrupt

    before = snapshot_namespace(Plain)
    patch = type("InterruptPatch", (VLLMPatch[Plain],), {"a": lambda self: "A", "z": Interrupting()})
    with pytest.raises(KeyboardInterrupt):
        patch.apply()
    before.assert_unchanged()


def test_a_failed_patch_can_be_fixed_and_applied_later() -> None:
    class Flaky:
        fail = True

        def __set_name__(self, owner: type, name: str) -> None:
            if owner is Plain and Flaky.fail:
                raise ValueError("not yet")

    patch = type("FlakyPatch", (VLLMPatch[Plain],), {"a": lambda self: "A", "z": Flaky()})
    with pytest.raises(PatchApplyError):
        patch.apply()
    Flaky.fail = False
    assert patch.apply()
    assert Plain().a() == "A"
