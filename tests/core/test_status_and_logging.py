"""status() records and rule 11: one log line per patch applied or rolled back."""

from __future__ import annotations

import logging

import pytest

from vllm_custom_patches import PatchManager, PatchState, PatchTargetError, VLLMPatch, min_vllm_version


class Target:
    def m(self) -> int:
        return 1


def _status(name: str) -> object:
    (status,) = [s for s in PatchManager.status() if s.name == name]
    return status


def test_states_move_through_available_applied_failed(monkeypatch: pytest.MonkeyPatch) -> None:
    class Cycle(VLLMPatch[Target]):
        def m(self) -> int:
            return 2

    class Broken(VLLMPatch["no_such_module_for_vcp_tests.sub:Cls"]):
        pass

    assert _status("Cycle").state is PatchState.AVAILABLE  # type: ignore[attr-defined]
    assert _status("Cycle").overrides == ("m",)  # type: ignore[attr-defined]
    Cycle.apply()
    assert _status("Cycle").state == "applied"  # type: ignore[attr-defined]
    Cycle.rollback()
    assert _status("Cycle").state == "available"  # type: ignore[attr-defined]
    with pytest.raises(PatchTargetError, match=r"cannot import module 'no_such_module_for_vcp_tests\.sub'") as info:
        Broken.apply()
    assert isinstance(info.value.__cause__, ImportError)
    broken = _status("Broken")
    assert broken.state == "failed" and "no_such_module_for_vcp_tests" in broken.reason  # type: ignore[attr-defined]


def test_missing_attribute_in_existing_module_is_a_target_error() -> None:
    class Missing(VLLMPatch[f"{__name__}:Target.Nope"]):  # type: ignore[misc]
        pass

    with pytest.raises(PatchTargetError, match="has no attribute 'Nope'"):
        Missing.apply()

    class NotAClass(VLLMPatch[f"{__name__}:_status"]):  # type: ignore[misc]
        pass

    with pytest.raises(PatchTargetError, match="is a function, not a class"):
        NotAClass.apply()


def test_status_as_dict_is_json_ready(monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    monkeypatch.setenv("VLLM_CUSTOM_PATCHES_VLLM_VERSION", "0.32.0")

    @min_vllm_version("0.10")
    class Described(VLLMPatch[Target]):
        """Doc."""

        def m(self) -> int:
            return 2

        def extra(self) -> None:
            return None

    Described.apply()
    record = json.loads(json.dumps(_status("Described").as_dict()))  # type: ignore[attr-defined]
    assert record == {
        "name": "Described",
        "target": f"{__name__}:Target",
        "state": "applied",
        "reason": "",
        "overrides": ["m"],
        "additions": ["extra"],
        "versions": ">=0.10",
        "description": "Doc.",
        "stackable": False,
        "order": 0,
        "exclusive": [],
        "stacks": [],
    }


def test_one_info_line_per_apply_and_rollback(caplog: pytest.LogCaptureFixture) -> None:
    class Logged(VLLMPatch[Target]):
        def m(self) -> int:
            return 2

    caplog.set_level(logging.INFO, logger="vllm.custom_patches")
    Logged.apply()
    Logged.apply()  # no-op: no second line
    Logged.rollback()
    Logged.rollback()  # no-op
    lines = [r.getMessage() for r in caplog.records if r.name == "vllm.custom_patches"]
    assert lines == [
        f"Applied patch 'Logged' to {__name__}:Target (overrides m)",
        f"Rolled back patch 'Logged' from {__name__}:Target",
    ]
    assert all(r.levelno == logging.INFO for r in caplog.records)
