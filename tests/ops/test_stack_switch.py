"""Stacks on the operations plane (issue 19): each process's status record carries the chains, the
status table shows them, and the kill switch rolls back one layer of a stack and leaves the others
(all or nothing across processes, as for any patch).

The engine cores are the in-process stand-ins of ``test_control.py``: canned answers, while this
process plays the API server and really rolls back (and undoes) its part.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator
from typing import Any

import pytest

from vllm_custom_patches import PatchManager, VLLMPatch
from vllm_custom_patches._ops.agent import process_record, unreachable_record
from vllm_custom_patches._ops.remote import print_status
from vllm_custom_patches._ops.switch import change
from vllm_custom_patches.testing import isolated_registry, snapshot_namespace

TOKEN = "unit-test-control-token-0123"
CHAIN = "Target.run: outer (order 2) \u2192 middle (order 1) \u2192 inner \u2192 original"
WITHOUT_MIDDLE = "Target.run: outer (order 2) \u2192 inner \u2192 original"


@pytest.fixture(autouse=True)
def _control_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_CUSTOM_PATCHES_CONTROL_TOKEN", TOKEN)


class Target:
    def run(self) -> str:
        return "T"


def _layer(name: str, order: int) -> type[VLLMPatch[Any]]:
    def run(self: Any) -> str:
        return f"{name}>" + patch.original("run")(self)

    patch: Any = type(VLLMPatch)(name, (VLLMPatch[Target],), {"run": run}, stackable=True, order=order)
    return patch  # type: ignore[no-any-return]


@pytest.fixture
def stack() -> Iterator[None]:
    with isolated_registry():
        for name, order in (("inner", 0), ("outer", 2), ("middle", 1)):
            PatchManager.apply(_layer(name, order))
        yield
        PatchManager.rollback_all()


class _EngineCoreClient:
    """vLLM's engine core client as the switch uses it: one utility call per engine core."""

    def __init__(self, answers: dict[bytes, Any]) -> None:
        self.core_engines = list(answers)
        self.answers = answers
        self.calls: list[str] = []

    async def _call_utility_async(self, method: str, *args: Any, engine: bytes) -> Any:
        self.calls.append(args[0])
        return self.answers[engine](*args)


class _EngineClient:
    def __init__(self, core: _EngineCoreClient) -> None:
        self.engine_core = core


def _engine(ok: bool) -> Any:
    def answer(action: str, *signed: str) -> list[dict[str, Any]]:
        record = {**unreachable_record("engine_core", "", dp_rank=0), "pid": 1000, "error": None}
        refused = not ok and action != "undo"
        return [{**record, "ok": not refused, "changed": not refused and action != "undo", "relevant": True,
                 "state": "applied", "error": "PatchConflictError: refused here" if refused else None,
                 "undone": action == "undo"}]  # fmt: skip

    return answer


def _chains() -> list[str]:
    return sorted({line for status in PatchManager.status() for line in status.stacks})


def test_the_kill_switch_rolls_back_one_layer_and_leaves_the_others(stack: None) -> None:
    assert Target().run() == "outer>middle>inner>T" and _chains() == [CHAIN]
    core = _EngineCoreClient({(0).to_bytes(2, "little"): _engine(ok=True)})
    report = asyncio.run(change(_EngineClient(core), "rollback", "middle", "test"))
    assert report["ok"] is True and core.calls == ["rollback"]
    assert Target().run() == "outer>inner>T" and _chains() == [WITHOUT_MIDDLE]
    assert sorted(PatchManager.applied()) == ["inner", "outer"]
    report = asyncio.run(change(_EngineClient(core), "apply", "middle", "test"))
    assert report["ok"] is True
    assert Target().run() == "outer>middle>inner>T" and _chains() == [CHAIN]


def test_a_layer_rollback_refused_elsewhere_is_undone_here_back_into_its_place(stack: None) -> None:
    before = snapshot_namespace(Target)
    core = _EngineCoreClient({(0).to_bytes(2, "little"): _engine(ok=False)})
    report = asyncio.run(change(_EngineClient(core), "rollback", "middle", "test"))
    assert report["ok"] is False and core.calls == ["rollback", "undo"]
    api = report["processes"][0]
    assert api["role"] == "api_server" and api["changed"] and api["reverted"]
    before.assert_unchanged()  # the same outermost member on the target, the same _original_run
    assert Target().run() == "outer>middle>inner>T" and _chains() == [CHAIN]


def test_each_process_record_and_the_status_table_show_the_chains(stack: None) -> None:
    record = process_record("engine_core", dp_rank=0)
    assert record["stacks"] == [CHAIN]
    mine = {"inner", "outer", "middle"}  # other test modules may have registered patches of their own
    assert {patch["name"]: patch["stacks"] for patch in record["patches"] if patch["name"] in mine} == {
        "inner": [CHAIN],
        "outer": [CHAIN],
        "middle": [CHAIN],
    }
    PatchManager.rollback("middle")
    other = process_record("engine_core", dp_rank=1)  # a process where the middle layer went
    out = io.StringIO()
    print_status({"consistent": False, "processes": [record, other]}, out)
    text = out.getvalue()
    assert f"stack  {CHAIN}   (1 process(es))" in text
    assert f"stack  {WITHOUT_MIDDLE}   (1 process(es))" in text
