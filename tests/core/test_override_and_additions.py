"""Rule 4: @override demands an existing member; _original_<x> demands an x; additions are reported."""

from __future__ import annotations

import logging

import pytest
from typing_extensions import override

from vllm_custom_patches import PatchManager, PatchTargetError, VLLMPatch
from vllm_custom_patches.testing import snapshot_namespace


class Base:
    def inherited(self) -> str:
        return "base"


class Target(Base):
    def own(self) -> str:
        return "own"


def test_override_of_a_missing_member_fails_and_changes_nothing() -> None:
    before = snapshot_namespace(Target)

    class Misspelt(VLLMPatch[Target]):
        def own(self) -> str:
            return "patched"

        @override
        def onw(self) -> str:  # the typo @override exists to catch
            return "patched"

    with pytest.raises(PatchTargetError, match=r"'Misspelt'.*'onw'.*@override.*Target"):
        Misspelt.apply()
    before.assert_unchanged()
    assert not Misspelt.is_applied()
    (status,) = [s for s in PatchManager.status() if s.name == "Misspelt"]
    assert status.state == "failed" and "onw" in status.reason


@pytest.mark.parametrize("wrap", [staticmethod, classmethod])
def test_override_on_static_and_class_methods(wrap: type) -> None:
    def missing(*args: object) -> None:
        return None

    member = wrap(override(missing))
    patch = type("WrappedOverride", (VLLMPatch[Target],), {"missing": member})
    with pytest.raises(PatchTargetError, match="missing"):
        patch.apply()


def test_override_on_property_accessor() -> None:
    class PropOverride(VLLMPatch[Target]):
        @property
        @override
        def not_there(self) -> int:
            return 1

    with pytest.raises(PatchTargetError, match="not_there"):
        PropOverride.apply()


def test_override_of_existing_own_and_inherited_members_applies() -> None:
    class Fine(VLLMPatch[Target]):
        @override
        def own(self) -> str:
            return "p-" + self._original_own()  # type: ignore[attr-defined,no-any-return]

        @override
        def inherited(self) -> str:
            return "p-" + self._original_inherited()  # type: ignore[attr-defined,no-any-return]

    assert Fine.apply()
    assert Target().own() == "p-own" and Target().inherited() == "p-base"


def test_original_reference_to_member_the_target_lacks_fails() -> None:
    before = snapshot_namespace(Target)

    class NoSuch(VLLMPatch[Target]):
        def own(self) -> str:
            return "x"

        def ghost(self) -> str:
            return self._original_ghost()  # type: ignore[attr-defined,no-any-return]

    with pytest.raises(PatchTargetError, match=r"_original_ghost.*no member 'ghost'"):
        NoSuch.apply()
    before.assert_unchanged()


def test_additions_are_reported_in_status_and_log(caplog: pytest.LogCaptureFixture) -> None:
    class Mixed(VLLMPatch[Target]):
        def own(self) -> str:
            return "x"

        def brand_new(self) -> str:
            return "new"

    caplog.set_level(logging.INFO, logger="vllm.custom_patches")
    Mixed.apply()
    (status,) = [s for s in PatchManager.status() if s.name == "Mixed"]
    assert status.state == "applied"
    assert status.overrides == ("own",) and status.additions == ("brand_new",)
    assert any(
        "Applied patch 'Mixed'" in r.getMessage()
        and "overrides own" in r.getMessage()
        and "adds brand_new" in r.getMessage()
        for r in caplog.records
    )
