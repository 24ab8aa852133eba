"""The kill switch without vLLM: one process's part (``_control``), the all-or-nothing orchestration
(``_switch``) against stand-in engine cores, and the endpoint's request checks.

The routes on a real ``vllm serve``, under load, with tensor parallelism,
are tested in ``tests/real_vllm/test_vllm_control.py``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from vllm_custom_patches import PatchManager, VLLMPatch
from vllm_custom_patches._ops.agent import CONTROL_METHOD, unreachable_record
from vllm_custom_patches._ops.auth import sign
from vllm_custom_patches._ops.control import perform, undo
from vllm_custom_patches._ops.switch import change
from vllm_custom_patches.testing import isolated_registry, snapshot_namespace

TOKEN = "unit-test-control-token-0123"


@pytest.fixture(autouse=True)
def _control_token(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every process of a server has the token: here, this one (the switch signs each step with it).
    monkeypatch.setenv("VLLM_CUSTOM_PATCHES_CONTROL_TOKEN", TOKEN)


class Target:
    def run(self) -> str:
        return "original"


@pytest.fixture
def patch() -> Iterator[type[VLLMPatch[Any]]]:
    with isolated_registry():

        class Switchable(VLLMPatch[Target]):
            name = "switchable"

            def run(self) -> str:
                return "patched"

        PatchManager.register(Switchable)
        yield Switchable


def _state(name: str) -> str:
    return next(s.state.value for s in PatchManager.status() if s.name == name)


def test_rollback_then_undo_restores_the_patch_and_a_second_undo_does_nothing(patch: Any) -> None:
    before = snapshot_namespace(Target)
    PatchManager.apply(patch)
    result = perform("rollback", "switchable", "op1", "test")
    assert result == {
        "ok": True,
        "changed": True,
        "relevant": True,
        "state": "available",
        "error": None,
        "waiting": False,
    }
    assert Target().run() == "original"
    before.assert_unchanged()  # exactly as before the patch
    undone = undo("op1", "test")
    assert undone["ok"] and undone["undone"] and undone["state"] == "applied"
    assert Target().run() == "patched"
    again = undo("op1", "test")
    assert again["ok"] and not again.get("undone") and _state("switchable") == "applied"
    PatchManager.rollback("switchable")


def test_an_operation_that_changed_nothing_here_is_not_undone_here(patch: Any) -> None:
    # Not applied in this process: the rollback changes nothing, so undoing it must not apply it.
    result = perform("rollback", "switchable", "op2", "test")
    assert result["ok"] and not result["changed"]
    assert not undo("op2", "test").get("undone")
    assert _state("switchable") == "available" and Target().run() == "original"


def test_a_rollback_refused_by_an_outside_change_reports_it_and_leaves_the_patch(
    patch: Any, caplog: pytest.LogCaptureFixture
) -> None:
    PatchManager.apply(patch)
    grafted = Target.__dict__["run"]

    def outside(self: Any) -> str:  # e.g. a profiler wrapping the method after the patch
        return str(grafted(self))

    Target.run = outside  # type: ignore[method-assign]
    try:
        with caplog.at_level(logging.WARNING, logger="vllm.custom_patches"):
            result = perform("rollback", "switchable", "op3", "10.0.0.1:5555")
        assert not result["ok"] and not result["changed"] and result["state"] == "applied"
        assert "was replaced after the patch was applied" in result["error"]
        assert "control op op3, requested by 10.0.0.1:5555" in caplog.text
    finally:
        Target.run = grafted  # type: ignore[method-assign]
        PatchManager.rollback("switchable")


def test_a_patch_whose_target_is_not_imported_here_is_left_alone(patch: Any) -> None:
    with isolated_registry():

        class Elsewhere(VLLMPatch["vcp_not_imported_anywhere.sub:Cls"]):
            name = "elsewhere"

            def run(self) -> None:
                pass

        PatchManager.register(Elsewhere)
        result = perform("apply", "elsewhere", "op4", "test")
        assert result["ok"] and not result["relevant"] and not result["changed"]
        import sys

        assert "vcp_not_imported_anywhere" not in sys.modules  # not imported to apply it


def test_bad_requests_are_results_not_exceptions(patch: Any) -> None:
    assert "unknown action 'explode'" in perform("explode", "switchable", "op5", "test")["error"]
    unknown = perform("apply", "no_such_patch_anywhere", "op6", "test")
    assert not unknown["ok"] and "no patch named 'no_such_patch_anywhere'" in unknown["error"]
    assert perform("rollback", "no_such_patch_anywhere", "op7", "test")["relevant"] is False


# -- all or nothing across processes ---------------------------------------------------


class _EngineCoreClient:
    """Stands in for vLLM's engine-core client: two engine cores, each answering utility calls."""

    def __init__(self, answers: dict[bytes, Any]) -> None:
        self.core_engines = list(answers)
        self.answers = answers
        self.calls: list[tuple[str, tuple[Any, ...], int]] = []

    async def _call_utility_async(self, method: str, *args: Any, engine: bytes) -> Any:
        self.calls.append((method, args, int.from_bytes(engine, "little")))
        answer = self.answers[engine]
        if isinstance(answer, BaseException):
            raise answer
        return answer(*args)


class _EngineClient:
    def __init__(self, core: _EngineCoreClient) -> None:
        self.engine_core = core


def _engine(dp_rank: int, ok: bool) -> Any:
    def answer(action: str, *signed: str) -> list[dict[str, Any]]:
        record = {**unreachable_record("engine_core", "", dp_rank=dp_rank), "pid": 1000 + dp_rank, "error": None}
        refused = ok is False and action != "undo"
        return [{**record, "ok": not refused, "changed": not refused and action != "undo", "relevant": True,
                 "state": "applied", "error": "PatchConflictError: outside change" if refused else None,
                 "undone": action == "undo"}]  # fmt: skip

    return answer


def test_one_engine_core_refusing_undoes_the_change_everywhere(patch: Any) -> None:
    PatchManager.apply(patch)
    core = _EngineCoreClient(
        {(0).to_bytes(2, "little"): _engine(0, ok=True), (1).to_bytes(2, "little"): _engine(1, ok=False)}
    )
    report = asyncio.run(change(_EngineClient(core), "rollback", "switchable", "test"))
    assert report["ok"] is False
    # The API server (this process) rolled back, then put the patch back.
    assert _state("switchable") == "applied" and Target().run() == "patched"
    op = report["op_id"]
    assert [(m, a[0], a[2], rank) for m, a, rank in core.calls] == [
        (CONTROL_METHOD, "rollback", op, 0), (CONTROL_METHOD, "rollback", op, 1),
        (CONTROL_METHOD, "undo", op, 0), (CONTROL_METHOD, "undo", op, 1),
    ]  # fmt: skip
    api, first, second = report["processes"]
    assert api["role"] == "api_server" and api["changed"] and api["reverted"] and api["state"] == "applied"
    assert first["reverted"] and not second["ok"] and "outside change" in second["error"]
    PatchManager.rollback("switchable")


def test_an_engine_core_that_does_not_answer_fails_the_change_and_it_is_undone(patch: Any) -> None:
    PatchManager.apply(patch)
    core = _EngineCoreClient({(0).to_bytes(2, "little"): asyncio.TimeoutError()})
    report = asyncio.run(change(_EngineClient(core), "rollback", "switchable", "test"))
    assert report["ok"] is False and _state("switchable") == "applied"
    silent = report["processes"][1]
    assert (silent["role"], silent["dp_rank"], silent["ok"], silent["error"]) == (
        "engine_core",
        0,
        False,
        "did not answer in time",
    )
    # It could not be asked to undo either: whether it rolled back is unknown, which is not "undone everywhere".
    assert report["outcome"] == "inconsistent"
    assert [(p["description"], p["error"]) for p in report["undo_failed"]] == [
        ("engine_core dp_rank=0", "did not answer in time")
    ]
    PatchManager.rollback("switchable")


def test_every_process_agreeing_is_a_change(patch: Any) -> None:
    PatchManager.apply(patch)
    core = _EngineCoreClient({(0).to_bytes(2, "little"): _engine(0, ok=True)})
    report = asyncio.run(change(_EngineClient(core), "rollback", "switchable", "test"))
    assert report["ok"] is True and "undo_failed" not in report
    assert _state("switchable") == "available" and Target().run() == "original"
    assert [c[1][0] for c in core.calls] == ["rollback"]


# -- the endpoint's checks of a request -----------------------------------------------


@pytest.mark.parametrize(
    ("raw", "reason", "problem"),
    [
        (b"", "", None),
        (b"  ", "", None),
        (b"{}", "", None),
        (b'{"reason": "bad p99 after deploy"}', "bad p99 after deploy", None),
        (b"not json", "", "the body is not JSON"),
        (b"[1]", "", "must be a JSON object"),
        (b'{"reason": "x", "force": true}', "", "unknown field(s) 'force'"),
        (b'{"tp_ranks": [1]}', "", "chosen by data-parallel rank only"),
        (b'{"reason": 7}', "", "'reason' must be a string"),
    ],
)
def test_the_body_is_optional_and_checked(raw: bytes, reason: str, problem: str | None) -> None:
    from vllm_custom_patches.endpoint import _parse_body

    got_body, got_problem = _parse_body(raw)
    assert got_body.reason == reason
    assert (got_problem is None) if problem is None else (problem in str(got_problem))


@pytest.mark.parametrize(
    ("token", "enabled"), [(None, False), ("", False), ("short", False), (" " + "x" * 20, False), ("x" * 16, True)]
)
def test_the_control_routes_need_a_long_token(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, token: str | None, enabled: bool
) -> None:
    from vllm_custom_patches.endpoint import _control_token_hash

    if token is None:
        monkeypatch.delenv("VLLM_CUSTOM_PATCHES_CONTROL_TOKEN", raising=False)
    else:
        monkeypatch.setenv("VLLM_CUSTOM_PATCHES_CONTROL_TOKEN", token)
    with caplog.at_level(logging.WARNING, logger="vllm.custom_patches"):
        assert (_control_token_hash() is not None) is enabled
    if token and not enabled and token.strip():
        assert "is set but unusable" in caplog.text


# -- the engine-side methods, on stand-ins for vLLM's engine core ------------------------


class _Parallel:
    tensor_parallel_size = 2
    pipeline_parallel_size = 1
    data_parallel_rank = 0
    data_parallel_index = 1  # what vLLM 0.32 sets in each engine of `vllm serve --data-parallel-size N`


class _Executor:
    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.calls: list[tuple[str, float | None, tuple[Any, ...]]] = []

    def collective_rpc(self, method: str, timeout: float | None = None, args: tuple[Any, ...] = ()) -> Any:
        self.calls.append((method, timeout, args))
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer


class _EngineCore:
    def __init__(self, answer: Any) -> None:
        self.vllm_config = type("Config", (), {"parallel_config": _Parallel()})()
        self.model_executor = _Executor(answer)


def test_an_engine_core_reports_itself_with_its_data_parallel_rank_and_forwards_to_its_workers(patch: Any) -> None:
    from vllm_custom_patches._ops.agent import (
        STATUS_METHOD,
        WORKER_TIMEOUT_S,
        _engine_core_control,
        _engine_core_status,
    )

    worker = {"role": "worker", "pid": 7, "applied": ["switchable"]}
    core = _EngineCore([worker, worker])
    answer = _engine_core_status(core)
    assert answer["engine_core"]["role"] == "engine_core" and answer["engine_core"]["dp_rank"] == 1
    assert answer["workers"] == [worker, worker]
    assert core.model_executor.calls == [(STATUS_METHOD, WORKER_TIMEOUT_S, ())]

    PatchManager.apply(patch)
    signed = sign("rollback", "switchable", "op9", "test")
    records = _engine_core_control(core, *signed)
    assert records[0]["role"] == "engine_core" and records[0]["changed"] and records[0]["dp_rank"] == 1
    assert core.model_executor.calls[-1] == (CONTROL_METHOD, WORKER_TIMEOUT_S, signed)
    assert undo("op9", "test")["undone"]
    PatchManager.rollback("switchable")


def test_workers_that_do_not_answer_are_reported_per_rank_not_raised(patch: Any) -> None:
    from vllm_custom_patches._ops.agent import _engine_core_control, _engine_core_status

    core = _EngineCore(TimeoutError("RPC call to execute_model timed out."))
    workers = _engine_core_status(core)["workers"]
    assert [(w["role"], w["dp_rank"], w["tp_rank"]) for w in workers] == [("worker", 1, 0), ("worker", 1, 1)]
    assert all("its workers did not answer: TimeoutError" in w["error"] for w in workers)
    records = _engine_core_control(core, *sign("apply", "switchable", "op10", "test"))
    assert [r["ok"] for r in records] == [True, False, False]  # the engine core changed; its workers count as failed
    assert undo("op10", "test")["undone"]  # what the API server then asks for
    assert _state("switchable") == "available"
