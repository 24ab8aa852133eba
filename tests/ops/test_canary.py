"""Canaries (issue 20, part 2): a patch on chosen data-parallel ranks, its rollout record, promote, rollback.

Through the real endpoint (its FastAPI routes, the switch, the rollout
records, the status collection and its consistency rule) against stand-in
engine cores of several data-parallel ranks.  Each stand-in keeps its own
patch state, in its engine core and its one worker, and its own copy of the
rollouts, kept by the real engine-core method (``_agent._engine_core_rollouts``
over ``_rollouts.keep``, with that engine core's store swapped in); every step
it runs is checked with the real signature check (``_auth.verify``).  The real
``vllm serve --data-parallel-size 2`` proof is in
``tests/real_vllm/test_vllm_fleet.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
import types
import uuid
from argparse import Namespace
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from vllm_custom_patches import PatchManager, VLLMPatch
from vllm_custom_patches._ops import rollouts as rollouts_module
from vllm_custom_patches._ops.agent import CONTROL_METHOD, ROLLOUTS_METHOD, STATUS_METHOD, _engine_core_rollouts
from vllm_custom_patches._ops.auth import Replays, sign_with_payload, verify
from vllm_custom_patches._ops.fleet import analyse
from vllm_custom_patches.testing import isolated_registry

fastapi = pytest.importorskip("fastapi", reason="vLLM's dependency; installed with vLLM")
httpx = pytest.importorskip("httpx", reason="vLLM's dependency; installed with vLLM")

TOKEN = "canary-unit-test-token-0123"
PATCH = "canary_policy"
OTHER = "other_policy"
HANG_GUARD_S = 60.0
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(autouse=True)
def _control_token(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VLLM_CUSTOM_PATCHES_CONTROL_TOKEN", TOKEN)
    monkeypatch.setenv("VLLM_RPC_BASE_PATH", str(tmp_path))  # where the API servers' shared epoch goes


@pytest.fixture(autouse=True)
def patches() -> Iterator[None]:
    """Two patches of a scheduler that is never imported in this process (the API server's): there, not relevant."""
    with isolated_registry():

        class CanaryPolicy(VLLMPatch["vcp_canary_never_imported.sched:Scheduler"]):
            name = PATCH

            def schedule(self) -> None:
                pass

        class OtherPolicy(VLLMPatch["vcp_canary_never_imported.sched:Scheduler"]):
            name = OTHER

            def add_request(self) -> None:
                pass

        PatchManager.register(CanaryPolicy)
        PatchManager.register(OtherPolicy)
        yield


# -- stand-in engine cores ------------------------------------------------------------------------


class Process:
    """One engine core or worker of a stand-in rank: which patches it has applied, and its part of a change."""

    def __init__(self, role: str, dp_rank: int, applied: set[str]) -> None:
        self.role, self.dp_rank = role, dp_rank
        self.applied = set(applied)
        self.refuse: set[str] = set()
        """Actions this process refuses (as a conflict would)."""
        self.changes: dict[str, tuple[str, str]] = {}

    def identity(self) -> dict[str, Any]:
        worker = self.role == "worker"
        return {"role": self.role, "pid": 5000 + 10 * self.dp_rank + worker, "host": "node",
                "process": f"{self.role}-{self.dp_rank}", "dp_rank": self.dp_rank,
                "tp_rank": 0 if worker else None, "pp_rank": 0 if worker else None}  # fmt: skip

    def step(self, action: str, name: str, op_id: str) -> dict[str, Any]:
        if action == "undo":
            done = self.changes.pop(op_id, None)
            if done is not None:
                self._set(done[1], done[0] == "rollback")
            return self._record(done is not None, undone=done is not None)
        if action in self.refuse:
            return {**self._record(False, name), "ok": False, "error": "PatchConflictError: refused by this test"}
        want = action == "apply"
        changed = (name in self.applied) != want
        self._set(name, want)
        if changed:
            self.changes[op_id] = (action, name)
        return self._record(changed, name)

    def _set(self, name: str, applied: bool) -> None:
        (self.applied.add if applied else self.applied.discard)(name)

    def _record(self, changed: bool, name: str = PATCH, *, undone: bool = False) -> dict[str, Any]:
        state = "applied" if name in self.applied else "available"
        return {**self.identity(), "ok": True, "changed": changed, "relevant": True, "state": state, "error": None,
                "waiting": False, "undone": undone}  # fmt: skip

    def status(self) -> dict[str, Any]:
        patches = [{"name": n, "state": "applied" if n in self.applied else "available", "reason": ""}
                   for n in (PATCH, OTHER)]  # fmt: skip
        return {**self.identity(), "selection": "", "applied": sorted(self.applied), "patches": patches,
                "stacks": [], "error": None}  # fmt: skip


class Rank:
    """One data-parallel rank: its engine core, one worker, and the engine core's copy of the rollouts."""

    def __init__(self, dp_rank: int, applied: set[str]) -> None:
        self.dp_rank = dp_rank
        self.core = Process("engine_core", dp_rank, applied)
        self.worker = Process("worker", dp_rank, applied)
        self.kept: dict[str, dict[str, Any]] = {}
        self._replays, self._rollout_replays = Replays(), Replays()
        # What the real engine-core method reads to name itself.
        self.vllm_config = types.SimpleNamespace(parallel_config=types.SimpleNamespace(data_parallel_index=dp_rank))

    def answer(self, method: str, args: tuple[Any, ...]) -> Any:
        if method == STATUS_METHOD:
            return {"engine_core": self.core.status(), "workers": [self.worker.status()],
                    "rollouts": self._rollouts()["rollouts"]}  # fmt: skip
        if method == ROLLOUTS_METHOD:
            return self._rollouts(*args)
        assert method == CONTROL_METHOD
        problem = verify(args, f"engine_core dp={self.dp_rank}", self._replays)
        if problem is not None:
            return [{**self.core.identity(), "ok": False, "changed": False, "relevant": True, "state": "unknown",
                     "error": f"refused: {problem}"}]  # fmt: skip
        action, name, op_id = str(args[0]), str(args[1]), str(args[2])
        return [self.core.step(action, name, op_id), self.worker.step(action, name, op_id)]

    def _rollouts(self, *args: Any) -> dict[str, Any]:
        # The real engine-core method, on this rank's own copy (a real engine core is its own process).
        saved = rollouts_module._kept, rollouts_module._replays
        rollouts_module._kept, rollouts_module._replays = self.kept, self._rollout_replays
        try:
            return _engine_core_rollouts(self, *args)
        finally:
            rollouts_module._kept, rollouts_module._replays = saved


class Engines:
    """Stands in for vLLM's engine client: one engine core per data-parallel rank, answering utility calls."""

    def __init__(self, ranks: int = 3, applied: set[str] | None = None) -> None:
        self.ranks = [Rank(rank, applied or set()) for rank in range(ranks)]
        self.core_engines = [rank.to_bytes(2, "little") for rank in range(ranks)]
        self.engine_core = self
        self.calls: list[tuple[str, int, str]] = []
        """(method, rank, the step's action) of every call."""
        self.deaf_to_records: set[int] = set()
        """Ranks whose engine core does not answer a rollout record's write (it times out)."""

    async def _call_utility_async(self, method: str, *args: Any, engine: bytes) -> Any:
        rank = int.from_bytes(engine, "little")
        self.calls.append((method, rank, str(args[0]) if args else ""))
        await asyncio.sleep(0)  # a real call is a round trip: other tasks run meanwhile
        if method == ROLLOUTS_METHOD and args and rank in self.deaf_to_records:
            raise asyncio.TimeoutError()
        return self.ranks[rank].answer(method, args)

    def applied(self, role: str = "engine_core") -> list[bool]:
        return [PATCH in (r.core if role == "engine_core" else r.worker).applied for r in self.ranks]

    def changes(self) -> list[tuple[str, int, str]]:
        """The calls that could change something (control steps and rollout writes)."""
        return [c for c in self.calls if c[0] == CONTROL_METHOD or (c[0] == ROLLOUTS_METHOD and c[2])]


# -- the real endpoint over them ------------------------------------------------------------------

ARGS = Namespace(api_key=None, host="127.0.0.1", port=8000, uds=None)
METRICS = """# TYPE vllm:request_success_total counter
vllm:request_success_total{engine="0",finished_reason="stop",model_name="m"} 3.0
vllm:request_success_total{engine="1",finished_reason="stop",model_name="m"} 5.0
"""
"""vLLM's /metrics as the stand-in API server reads it for a canary's start (one counter per rank)."""


def _metrics() -> str:
    return METRICS


async def _endpoint(engines: Engines) -> tuple[Any, Any]:
    from vllm_custom_patches.endpoint import CustomPatchesEndpoint

    app = fastapi.FastAPI()
    endpoint = CustomPatchesEndpoint()
    endpoint.read_metrics = _metrics
    endpoint.attach_router(app)
    await endpoint.init_state(engines, app.state, ARGS)
    assert endpoint._refresher is not None
    endpoint._refresher.cancel()
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return endpoint, httpx.AsyncClient(transport=transport, base_url="http://server")


Scenario = Callable[[Any, Engines], Awaitable[None]]


def _serve(scenario: Scenario, engines: Engines) -> None:
    async def main() -> None:
        _, client = await _endpoint(engines)
        async with client:
            await scenario(client, engines)

    asyncio.run(asyncio.wait_for(main(), HANG_GUARD_S))


def _applied_by_role(status: dict[str, Any]) -> dict[str, list[list[str]]]:
    by_role: dict[str, list[list[str]]] = {}
    for process in sorted(status["processes"], key=lambda p: (p["role"], p["dp_rank"] or 0)):
        by_role.setdefault(process["role"], []).append(process["applied"])
    return by_role


async def _status(client: Any) -> dict[str, Any]:
    answer = await client.get("/custom_patches")
    assert answer.status_code == 200, answer.text
    status: dict[str, Any] = answer.json()
    return status


async def _post(client: Any, action: str, body: dict[str, Any] | None = None, name: str = PATCH) -> Any:
    return await client.post(f"/custom_patches/{name}/{action}", headers=AUTH, json=body or {})


# -- a canary -------------------------------------------------------------------------------------


def test_a_canary_on_rank_1_changes_only_rank_1_s_engine_core_and_worker_and_the_server_stays_consistent() -> None:
    async def scenario(client: Any, engines: Engines) -> None:
        before = time.time()
        answer = await _post(client, "apply", {"dp_ranks": [1], "reason": "try it on one rank"})
        assert answer.status_code == 200, answer.text
        report = answer.json()
        assert report["ok"] and report["outcome"] == "done" and report["dp_ranks"] == [1]
        # Only rank 1's processes were asked: no API server, no other rank.
        assert sorted((p["role"], p["dp_rank"], p["changed"]) for p in report["processes"]) == [
            ("engine_core", 1, True), ("worker", 1, True),
        ]  # fmt: skip
        assert {rank for method, rank, _ in engines.calls if method == CONTROL_METHOD} == {1}
        assert engines.applied() == [False, True, False] and engines.applied("worker") == [False, True, False]
        rollout = report["rollout"]
        assert {k: rollout[k] for k in ("patch", "dp_ranks", "state", "reason", "guards", "window_s", "ended")} == {
            "patch": PATCH, "dp_ranks": [1], "state": "active", "reason": "try it on one rank", "guards": [],
            "window_s": None, "ended": None,
        }  # fmt: skip
        assert before - 1 <= rollout["since"] <= time.time() + 1 and rollout["requester"].startswith("127.0.0.1:")

        status = await _status(client)
        assert _applied_by_role(status) == {
            "api_server": [[]], "engine_core": [[], [PATCH], []], "worker": [[], [PATCH], []],
        }  # fmt: skip
        assert status["consistent"] is True, status["inconsistencies"]  # the divergence was declared
        assert status["rollouts"] == [rollout]
        # Every engine core keeps its copy (any API server can read it from any of them).
        assert all(rank.kept == {rollout["id"]: rollout} for rank in engines.ranks)

    _serve(scenario, Engines(3))


def test_a_canary_is_all_or_nothing_across_its_ranks_when_rank_1_s_worker_refuses() -> None:
    engines = Engines(3)
    engines.ranks[1].worker.refuse = {"apply"}

    async def scenario(client: Any, engines: Engines) -> None:
        answer = await _post(client, "apply", {"dp_ranks": [0, 1]})
        assert answer.status_code == 409, answer.text
        report = answer.json()
        assert report["outcome"] == "refused" and report["undo_failed"] == [] and report["rollout"] is None
        (refused,) = [p for p in report["processes"] if not p["ok"]]
        assert (refused["role"], refused["dp_rank"]) == ("worker", 1) and "refused by this test" in refused["error"]
        reverted = sorted((p["role"], p["dp_rank"]) for p in report["processes"] if p.get("reverted"))
        assert reverted == [("engine_core", 0), ("engine_core", 1), ("worker", 0)]
        assert engines.applied() == [False] * 3 and engines.applied("worker") == [False] * 3
        assert {rank for method, rank, _ in engines.calls if method == CONTROL_METHOD} == {0, 1}  # rank 2 untouched
        status = await _status(client)
        assert status["consistent"] is True and status["rollouts"] == []  # the rollout never began

    _serve(scenario, engines)


@pytest.mark.parametrize(
    ("action", "body", "problem"),
    [
        ("apply", {"dp_ranks": [1], "tp_ranks": [0]}, "unknown field(s) 'tp_ranks'"),
        ("apply", {"dp_ranks": [1], "pp_ranks": [0]}, "chosen by data-parallel rank only"),
        ("apply", {"dp_ranks": []}, "non-empty list"),
        ("apply", {"dp_ranks": 1}, "non-empty list"),
        ("apply", {"dp_ranks": "1"}, "non-empty list"),
        ("apply", {"dp_ranks": [1, 1]}, "more than once"),
        ("apply", {"dp_ranks": [True]}, "non-negative integers"),
        ("apply", {"dp_ranks": [1.0]}, "non-negative integers"),
        ("apply", {"dp_ranks": [-1]}, "non-negative integers"),
        (
            "apply",
            {"dp_ranks": [1, 7]},
            "no engine core has dp rank(s) [7]; this server's engine cores have dp ranks [0, 1, 2]",
        ),
        ("apply", {"dp_ranks": [1], "guards": ["ttft_p99<=banana"]}, "threshold 'banana' is not a number"),
        ("apply", {"dp_ranks": [1], "guards": ["latency<1"]}, "unknown figure 'latency'"),
        ("apply", {"dp_ranks": [1], "guards": "errors==0"}, "'guards' must be a list"),
        ("apply", {"guards": ["errors==0"]}, "give 'dp_ranks' too"),
        ("apply", {"dp_ranks": [1], "window_s": 30}, "give 'guards' too"),
        ("apply", {"dp_ranks": [1], "guards": ["errors==0"], "window_s": 0}, "'window_s' must be a number"),
        ("rollback", {"dp_ranks": [1], "guards": ["errors==0"]}, "unknown field(s) 'guards' in the body of rollback"),
        ("promote", {"dp_ranks": [1]}, "unknown field(s) 'dp_ranks' in the body of promote"),
    ],
)
def test_a_bad_request_is_422_names_the_problem_and_changes_nothing(
    action: str, body: dict[str, Any], problem: str
) -> None:
    async def scenario(client: Any, engines: Engines) -> None:
        answer = await _post(client, action, body)
        assert answer.status_code == 422, answer.text
        assert problem in answer.json()["error"]
        assert "\n" not in answer.json()["error"]
        assert engines.changes() == []  # no step sent anywhere
        assert engines.applied() == [False] * 3 and (await _status(client))["rollouts"] == []

    _serve(scenario, Engines(3))


def test_the_canary_routes_keep_the_kill_switch_s_security_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario(client: Any, engines: Engines) -> None:
        for action in ("apply", "rollback", "promote"):
            # 403 before the body is read: a malformed body with a wrong or missing token is still 403.
            for headers in ({"Authorization": "Bearer not-the-token-at-all"}, {}):
                answer = await client.post(f"/custom_patches/{PATCH}/{action}", headers=headers, content=b"{not json")
                assert answer.status_code == 403, answer.text
        answer = await _post(client, "promote", name="no_such_patch")
        assert answer.status_code == 404 and "no patch named 'no_such_patch'" in answer.json()["error"]
        answer = await _post(client, "apply", {"dp_ranks": [1]}, name="no_such_patch")
        assert answer.status_code == 404
        answer = await client.post(f"/custom_patches/{PATCH}/shrink", headers=AUTH)
        assert answer.status_code == 404 and "use one of: rollback, apply, promote" in answer.json()["error"]
        assert engines.changes() == []

    from _helpers import captured_logs

    with captured_logs() as logs:
        _serve(scenario, Engines(3))
    refusals = [m for m in logs.messages() if "refused" in m and "control:" in m]
    assert sum("promote of 'canary_policy' from 127.0.0.1" in m and "wrong token" in m for m in refusals) == 1
    assert sum("promote of 'canary_policy' from 127.0.0.1" in m and "no bearer token" in m for m in refusals) == 1

    # Without a control token the routes do not exist at all.
    monkeypatch.delenv("VLLM_CUSTOM_PATCHES_CONTROL_TOKEN")

    async def absent(client: Any, engines: Engines) -> None:
        for action in ("apply", "promote"):
            assert (await _post(client, action, {"dp_ranks": [1]})).status_code == 404

    _serve(absent, Engines(3))


# -- promote, rollback, and what is refused during a rollout ----------------------------------------


def test_promote_applies_the_canary_everywhere_and_ends_the_rollout_promoted() -> None:
    async def scenario(client: Any, engines: Engines) -> None:
        started = (await _post(client, "apply", {"dp_ranks": [1]})).json()["rollout"]
        answer = await _post(client, "promote", {"reason": "p99 fine"})
        assert answer.status_code == 200, answer.text
        report = answer.json()
        assert report["ok"] and report["action"] == "promote"
        # Everywhere: the API server (not relevant here), every engine core and worker; rank 1 was already so.
        changed = sorted((p["role"], p["dp_rank"]) for p in report["processes"] if p["changed"])
        assert changed == [("engine_core", 0), ("engine_core", 2), ("worker", 0), ("worker", 2)]
        assert "api_server" in {p["role"] for p in report["processes"]}
        assert engines.applied() == [True] * 3 and engines.applied("worker") == [True] * 3
        promoted = report["rollout"]
        assert promoted["id"] == started["id"] and promoted["state"] == "promoted" and promoted["ended"] is not None
        assert promoted["end_reason"] == "p99 fine" and promoted["revision"] == started["revision"] + 1
        status = await _status(client)
        assert status["consistent"] is True and status["rollouts"] == [promoted]
        # Promoted: nothing left to promote.
        again = await _post(client, "promote")
        assert again.status_code == 409 and "has no active rollout to promote" in again.json()["error"]

    _serve(scenario, Engines(3))


def test_rollback_without_ranks_is_the_kill_switch_and_ends_the_rollout_rolled_back() -> None:
    async def scenario(client: Any, engines: Engines) -> None:
        await _post(client, "apply", {"dp_ranks": [0, 2]})
        assert engines.applied() == [True, False, True]
        answer = await _post(client, "rollback", {"reason": "errors"})
        assert answer.status_code == 200 and answer.json()["rollout"]["state"] == "rolled_back", answer.text
        assert engines.applied() == [False] * 3 and engines.applied("worker") == [False] * 3
        (rollout,) = (await _status(client))["rollouts"]
        assert rollout["state"] == "rolled_back" and rollout["end_reason"] == "errors"
        # A new canary of the patch may start now; the ended rollout stays listed.
        assert (await _post(client, "apply", {"dp_ranks": [1]})).status_code == 200
        states = [r["state"] for r in (await _status(client))["rollouts"]]
        assert states == ["rolled_back", "active"]

    _serve(scenario, Engines(3))


def test_a_rollback_on_some_canary_ranks_shrinks_it_and_ranks_outside_it_are_refused() -> None:
    async def scenario(client: Any, engines: Engines) -> None:
        await _post(client, "apply", {"dp_ranks": [1, 2]})
        outside = await _post(client, "rollback", {"dp_ranks": [0, 2]})
        assert outside.status_code == 409 and "dp rank(s) [0] are not in the canary" in outside.json()["error"]
        assert engines.applied() == [False, True, True]
        shrunk = await _post(client, "rollback", {"dp_ranks": [2]})
        assert shrunk.status_code == 200 and shrunk.json()["rollout"]["dp_ranks"] == [1], shrunk.text
        assert shrunk.json()["rollout"]["state"] == "active" and engines.applied() == [False, True, False]
        status = await _status(client)
        assert status["consistent"] is True and status["rollouts"][0]["dp_ranks"] == [1]
        last = await _post(client, "rollback", {"dp_ranks": [1]})
        assert last.json()["rollout"]["state"] == "rolled_back" and engines.applied() == [False] * 3

    _serve(scenario, Engines(3))


def test_what_would_diverge_undeclared_is_refused_with_a_clear_message_and_changes_nothing() -> None:
    async def scenario(client: Any, engines: Engines) -> None:
        none = await _post(client, "rollback", {"dp_ranks": [1]})
        assert none.status_code == 409
        assert "rollback with dp_ranks shrinks an active canary, and patch 'canary_policy' has none" in none.text
        assert (await _post(client, "promote")).status_code == 409
        first = (await _post(client, "apply", {"dp_ranks": [1]})).json()["rollout"]
        calls = len(engines.changes())
        second = await _post(client, "apply", {"dp_ranks": [2]})
        assert second.status_code == 409
        error = second.json()["error"]
        assert (
            f"patch 'canary_policy' has an active canary (rollout {first['id']} of canary_policy on dp ranks [1]"
            in error
        )
        assert "promote it (promote NAME) or roll it back (rollback NAME) before starting another canary" in error
        everywhere = await _post(client, "apply")
        assert everywhere.status_code == 409 and "to apply it on every rank, promote it" in everywhere.json()["error"]
        assert len(engines.changes()) == calls and engines.applied() == [False, True, False]
        # Another patch is not held up by this one's canary.
        assert (await _post(client, "apply", {"dp_ranks": [2]}, name=OTHER)).status_code == 200
        assert [r["patch"] for r in (await _status(client))["rollouts"]] == [PATCH, OTHER]

    _serve(scenario, Engines(3))


def test_a_canary_that_changes_nothing_starts_no_rollout() -> None:
    async def scenario(client: Any, engines: Engines) -> None:
        answer = await _post(client, "apply", {"dp_ranks": [1]})
        assert answer.status_code == 409 and "nothing changed on dp ranks [1]" in answer.json()["error"]
        assert (await _status(client))["rollouts"] == []

    _serve(scenario, Engines(3, applied={PATCH}))  # applied everywhere already


def test_a_canary_keeps_a_reading_of_its_start_taken_before_it_is_applied() -> None:
    """What ``compare`` and the guards measure the rollout's life from (``at_start``)."""
    engines = Engines(2)
    readings: list[list[bool]] = []

    def metrics() -> str:
        readings.append(engines.applied())  # what the canary ranks had when the reading was taken
        return METRICS

    async def main() -> None:
        endpoint, client = await _endpoint(engines)
        endpoint.read_metrics = metrics
        async with client:
            rollout = (await _post(client, "apply", {"dp_ranks": [1]})).json()["rollout"]
            start = rollout["at_start"]
            assert readings == [[False, False]]  # before the apply
            assert sorted(start["metrics"]["engines"]) == ["0", "1"] and start["telemetry"] is None
            assert start["metrics"]["at"] <= rollout["since"] + 1
            assert (await _post(client, "apply", {"dp_ranks": [0]})).status_code == 409
            assert len(readings) == 1  # a refused canary reads nothing
            (shown,) = (await _status(client))["rollouts"]
            assert shown["at_start"] == start  # every API server reads it from the engine cores

            def unreadable() -> str:
                raise RuntimeError("no metrics here")

            endpoint.read_metrics = unreadable
            other = (await _post(client, "apply", {"dp_ranks": [0]}, name=OTHER)).json()
            assert other["ok"] and other["rollout"]["at_start"] is None  # the canary goes ahead without it

    asyncio.run(asyncio.wait_for(main(), HANG_GUARD_S))


def test_an_engine_core_that_misses_a_record_s_revision_does_not_hide_it_and_is_named_in_the_log() -> None:
    from _helpers import captured_logs

    engines = Engines(3)

    async def scenario(client: Any, engines: Engines) -> None:
        engines.deaf_to_records = {2}
        with captured_logs() as logs:
            started = await _post(client, "apply", {"dp_ranks": [1]})
        assert started.status_code == 200 and engines.ranks[2].kept == {}, started.text
        (warning,) = [m for m in logs.messages() if "not kept by engine core" in m]
        assert "dp_rank=2: did not answer in time" in warning and "revision 1, active" in warning
        assert [r["state"] for r in (await _status(client))["rollouts"]] == ["active"]
        engines.deaf_to_records = {0}  # now rank 0 misses the promote's revision
        assert (await _post(client, "promote")).status_code == 200
        rollout_id = started.json()["rollout"]["id"]
        assert engines.ranks[0].kept[rollout_id]["state"] == "active"  # its stale copy
        status = await _status(client)
        assert [r["state"] for r in status["rollouts"]] == ["promoted"] and status["consistent"] is True
        # Its stale active copy must not refuse the patch's next canary: the next change gives it what it missed.
        engines.deaf_to_records = set()
        assert (await _post(client, "rollback")).status_code == 200
        assert [rank.kept[rollout_id]["state"] for rank in engines.ranks] == ["promoted"] * 3
        again = await _post(client, "apply", {"dp_ranks": [2]})
        assert again.status_code == 200, again.text

    _serve(scenario, engines)


# -- two API servers ------------------------------------------------------------------------------


def test_a_rollout_made_through_one_api_server_is_shown_and_promoted_through_another() -> None:
    """``vllm serve --data-parallel-size N`` starts N API servers on one port; the record lives in the engine cores."""
    engines = Engines(2)

    async def main() -> None:
        (_, first), (_, second) = await _endpoint(engines), await _endpoint(engines)
        async with first, second:
            assert (await _status(second))["rollouts"] == []  # its view, collected before the canary
            started = (await _post(first, "apply", {"dp_ranks": [1], "reason": "via the first"})).json()["rollout"]
            status = await _status(second)
            assert status["rollouts"] == [started] and status["consistent"] is True
            assert _applied_by_role(status)["engine_core"] == [[], [PATCH]]
            # The second knows of the canary without having made it: it refuses another, and promotes it.
            assert (await _post(second, "apply", {"dp_ranks": [0]})).status_code == 409
            promoted = await _post(second, "promote")
            assert promoted.status_code == 200 and promoted.json()["rollout"]["id"] == started["id"]
            assert [r["state"] for r in (await _status(first))["rollouts"]] == ["promoted"]
            assert _applied_by_role(await _status(first))["engine_core"] == [[PATCH], [PATCH]]

    asyncio.run(asyncio.wait_for(main(), HANG_GUARD_S))


def test_two_canaries_of_one_patch_begun_at_once_through_two_api_servers_are_never_both_active() -> None:
    from vllm_custom_patches._ops.switch import control

    engines = Engines(2)

    async def main() -> None:
        # Two API servers' requests, each past its own checks, interleaved (each API server has its own lock).
        reports = await asyncio.gather(
            control(engines, "apply", PATCH, "10.0.0.1:1", dp_ranks=[0]),
            control(engines, "apply", PATCH, "10.0.0.2:2", dp_ranks=[1]),
        )
        accepted = [r for r in reports if r["ok"]]
        assert len(accepted) <= 1, reports
        for refused in (r for r in reports if not r["ok"]):
            assert "has an active canary" in refused["error"]
        (_, client) = await _endpoint(engines)
        async with client:
            status = await _status(client)
        active = [r for r in status["rollouts"] if r["state"] == "active"]
        assert len(active) == len(accepted) and status["consistent"] is True
        ranks = accepted[0]["dp_ranks"] if accepted else []
        assert engines.applied() == [rank in ranks for rank in range(2)]

    asyncio.run(asyncio.wait_for(main(), HANG_GUARD_S))


def test_an_engine_core_refuses_to_begin_a_second_active_rollout_of_a_patch() -> None:
    rank = Rank(0, set())

    def step(step: str, record: dict[str, Any]) -> dict[str, Any]:
        signed = sign_with_payload(step, record["patch"], uuid.uuid4().hex, "t", json.dumps(record))
        return rank.answer(ROLLOUTS_METHOD, signed)  # type: ignore[no-any-return]

    first = rollouts_module.new_record(PATCH, [1], "a")
    second = rollouts_module.new_record(PATCH, [0], "b")
    assert step(rollouts_module.BEGIN, first)["ok"]
    refused = step(rollouts_module.BEGIN, second)
    assert not refused["ok"] and refused["conflict"]["id"] == first["id"]
    assert step(rollouts_module.PUT, rollouts_module.ended(first, "promoted", "a"))["ok"]
    assert step(rollouts_module.BEGIN, second)["ok"]  # the first one ended
    # An older revision never overwrites a newer one; an unsigned write is refused.
    assert step(rollouts_module.PUT, first)["ok"]
    assert rank.kept[first["id"]]["state"] == "promoted"
    forged = rank.answer(ROLLOUTS_METHOD, (rollouts_module.PUT, PATCH, "x", "y", "1", "00", json.dumps(first)))
    assert not forged["ok"] and forged["error"].startswith("refused: bad signature")
    assert rank.kept[first["id"]]["state"] == "promoted"


def test_an_engine_core_keeps_every_active_rollout_and_the_latest_ended_ones_without_their_start_reading(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(rollouts_module, "MAX_KEPT", 3)
    rank = Rank(0, set())

    def put(record: dict[str, Any]) -> None:
        signed = sign_with_payload(rollouts_module.PUT, record["patch"], uuid.uuid4().hex, "t", json.dumps(record))
        assert rank.answer(ROLLOUTS_METHOD, signed)["ok"]

    active = rollouts_module.new_record(OTHER, [1], "t", at_start={"metrics": {"at": 1.0, "engines": {}}})
    put(active)
    ended = []
    for i in range(5):
        start = {"metrics": {"at": 1.0, "engines": {}}}
        record = rollouts_module.new_record(PATCH, [1], "t", at_start=start, now=1000.0 + i)
        ended.append(rollouts_module.ended(record, "rolled_back", "t", now=1000.5 + i))
        put(ended[-1])
    assert ended[-1]["at_start"] is None and active["at_start"] is not None
    assert list(rank.kept) == [active["id"], *(r["id"] for r in ended[-3:])]
    put(ended[0])  # a late copy of an older one (another engine core's, by a repair) does not push out newer ones
    assert list(rank.kept) == [active["id"], *(r["id"] for r in ended[-3:])]


# -- the consistency rule -----------------------------------------------------------------------------


def _process(role: str, dp_rank: int, applied: list[str]) -> dict[str, Any]:
    return {**Process(role, dp_rank, set(applied)).status(), "selection": PATCH}


def _server(applied_by_rank: list[list[str]], *, workers: bool = True) -> list[dict[str, Any]]:
    processes = [{**_process("api_server", 0, []), "dp_rank": None}]
    for rank, applied in enumerate(applied_by_rank):
        processes.append(_process("engine_core", rank, applied))
        if workers:
            processes.append(_process("worker", rank, applied))
    return processes


def _rollout(ranks: list[int], state: str = "active", patch: str = PATCH) -> dict[str, Any]:
    record = rollouts_module.new_record(patch, ranks, "test")
    return record if state == "active" else rollouts_module.ended(record, state, "test")


def test_consistent_means_the_declared_canary_on_exactly_its_ranks() -> None:
    rollout = _rollout([1, 2])
    assert analyse(_server([[], [PATCH], [PATCH]]), [rollout])["consistent"] is True
    assert analyse(_server([[], [PATCH], [PATCH]], workers=False), [rollout])["consistent"] is True
    assert analyse(_server([[OTHER], [PATCH, OTHER], [PATCH, OTHER]]), [rollout])["consistent"] is True
    # Before the canary was applied, or after it was rolled back everywhere: no divergence at all.
    assert analyse(_server([[], [], []]), [rollout])["consistent"] is True


@pytest.mark.parametrize(
    ("applied", "rollouts", "missing", "unexpected"),
    [
        # Undeclared: the same divergence without a rollout, or after it ended.
        ([[], [PATCH], []], [], ["engine_core dp_rank=0", "engine_core dp_rank=2"], []),
        ([[], [PATCH], []], [_rollout([1], "rolled_back")], ["engine_core dp_rank=0", "engine_core dp_rank=2"], []),
        # Applied on a rank outside the canary.
        ([[PATCH], [PATCH], []], [_rollout([1])], [], ["engine_core dp_rank=0"]),
        # Missing on a rank of the canary.
        ([[], [PATCH], []], [_rollout([1, 2])], ["engine_core dp_rank=2"], []),
        # Everywhere, while the canary says rank 1 only.
        ([[PATCH], [PATCH], [PATCH]], [_rollout([1])], [], ["engine_core dp_rank=0", "engine_core dp_rank=2"]),
        # Another patch's divergence is not covered by this patch's canary.
        ([[], [PATCH, OTHER], []], [_rollout([1])], ["engine_core dp_rank=0", "engine_core dp_rank=2"], []),
    ],
)
def test_any_other_divergence_is_still_inconsistent(
    applied: list[list[str]], rollouts: list[dict[str, Any]], missing: list[str], unexpected: list[str]
) -> None:
    report = analyse(_server(applied, workers=False), rollouts)
    assert report["consistent"] is False
    issues = report["inconsistencies"]
    assert sorted(m["description"].split(" pid=")[0] for i in issues for m in i["missing_in"]) == missing
    assert sorted(m["description"].split(" pid=")[0] for i in issues for m in i.get("unexpected_in", [])) == unexpected
    for issue in issues:
        for wrong in issue.get("unexpected_in", []):
            assert wrong["why"].startswith("applied outside the canary's dp ranks")


def test_a_worker_of_a_canary_rank_without_the_patch_is_inconsistent() -> None:
    processes = _server([[], [PATCH], [PATCH]])
    (worker,) = [p for p in processes if p["role"] == "worker" and p["dp_rank"] == 2]
    worker["applied"] = []
    worker["patches"][0]["state"] = "failed"
    report = analyse(processes, [_rollout([1, 2])])
    assert report["consistent"] is False
    (issue,) = report["inconsistencies"]
    assert issue["role"] == "worker" and issue["rollout"]
    (missing,) = issue["missing_in"]
    assert missing["dp_rank"] == 2 and missing["why"] == "failed"


# -- the guard's way to roll a canary back ---------------------------------------------------------------


def test_end_by_guard_rolls_the_canary_back_all_or_nothing_and_records_the_figures() -> None:
    engines = Engines(3)

    async def main() -> None:
        endpoint, client = await _endpoint(engines)
        async with client:
            started = (await _post(client, "apply", {"dp_ranks": [1, 2]})).json()["rollout"]
            (await _status(client))  # a view the guard's change must replace
            # Refused everywhere: rank 2's worker refuses the rollback; the canary stays as it was.
            engines.ranks[2].worker.refuse = {"rollback"}
            refused = await endpoint._end_by_guard(PATCH, {"ttft_p99": 0.9}, "ttft_p99 broken for 60 s")
            assert refused["outcome"] == "refused" and engines.applied() == [False, True, True]
            assert [r["state"] for r in (await _status(client))["rollouts"]] == ["active"]
            engines.ranks[2].worker.refuse = set()
            figures = {"canary": {"ttft_p99": 0.9}, "baseline": {"ttft_p99": 0.2}}
            report = await endpoint._end_by_guard(PATCH, figures, "ttft_p99 broken for 60 s", started["id"])
            assert report["ok"] and report["dp_ranks"] == [1, 2], report
            assert {p["dp_rank"] for p in report["processes"]} == {1, 2}  # the canary's ranks only
            assert engines.applied() == [False] * 3 and engines.applied("worker") == [False] * 3
            (ended,) = (await _status(client))["rollouts"]  # shown at once (the view was refreshed)
            assert ended["state"] == "rolled_back_by_guard" and ended["figures"] == figures
            assert ended["end_reason"] == "ttft_p99 broken for 60 s" and ended["ended_by"].startswith(
                "guard of rollout"
            )
            # Nothing active any more: a late verdict changes nothing.
            late = await endpoint._end_by_guard(PATCH, figures, "late")
            assert late["outcome"] == "refused" and "has no active rollout" in late["error"]

    asyncio.run(asyncio.wait_for(main(), HANG_GUARD_S))


def test_an_accepted_canary_with_guards_is_handed_to_the_guardian(monkeypatch: pytest.MonkeyPatch) -> None:
    watched: list[tuple[Any, dict[str, Any], dict[str, Any]]] = []
    guardian = types.ModuleType("vllm_custom_patches._ops.guardian")
    guardian.watch = lambda engine_client, rollout, **kwargs: watched.append((engine_client, rollout, kwargs))  # type: ignore[attr-defined]
    monkeypatch.setitem(__import__("sys").modules, "vllm_custom_patches._ops.guardian", guardian)

    async def scenario(client: Any, engines: Engines) -> None:
        body = {"dp_ranks": [1], "guards": ["ttft_p99 <= 1.2x", "errors==0"], "window_s": 30}
        answer = await _post(client, "apply", body)
        assert answer.status_code == 200, answer.text
        rollout = answer.json()["rollout"]
        assert rollout["guards"] == ["ttft_p99<=1.2x", "errors==0"] and rollout["window_s"] == 30.0  # canonical
        ((engine_client, given, kwargs),) = watched
        assert engine_client is engines and given == rollout and set(kwargs) == {"end", "read_status"}
        assert (await kwargs["read_status"]())["rollouts"][-1]["id"] == rollout["id"]  # the status route's view
        # Without guards, or refused: nothing to watch.
        await _post(client, "apply", {"dp_ranks": [2]}, name=OTHER)
        refused = await _post(client, "apply", {"dp_ranks": [2], "guards": ["errors==0"]})
        assert refused.status_code == 409, refused.text  # one is active
        assert len(watched) == 1, watched
        # What the guardian calls when a guard breaks: the canary's ranks rolled back, the record ended.
        assert engines.applied() == [False, True, False]
        report = await kwargs["end"](engines, PATCH, {"ttft_p99": 2.0}, "ttft_p99 broken for 30 s")
        assert report["ok"] and report["rollout"]["id"] == rollout["id"], report
        assert report["rollout"]["state"] == "rolled_back_by_guard" and engines.applied() == [False] * 3
        # The guard's end names its rollout: once that ended, a late call ends nothing, not even a new canary.
        assert (await _post(client, "apply", {"dp_ranks": [0]})).status_code == 200
        late = await kwargs["end"](engines, PATCH, {}, "late")
        assert late["outcome"] == "refused" and f"rollout {rollout['id']} of patch" in late["error"]
        assert engines.applied() == [True, False, False]

    _serve(scenario, Engines(3))
    default = rollouts_module.new_record(PATCH, [1], "t", guards=["errors==0"])
    assert default["window_s"] == rollouts_module.DEFAULT_WINDOW_S


# -- the CLI against a real HTTP server -----------------------------------------------------------------


@contextlib.contextmanager
def _http_server(engines: Engines) -> Iterator[str]:
    """The endpoint's app under a real uvicorn (in a thread), over ``engines``."""
    import uvicorn

    from vllm_custom_patches.endpoint import CustomPatchesEndpoint

    endpoint = CustomPatchesEndpoint()
    endpoint.read_metrics = _metrics

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        await endpoint.init_state(engines, app.state, ARGS)
        assert endpoint._refresher is not None
        endpoint._refresher.cancel()
        yield

    app = fastapi.FastAPI(lifespan=lifespan)
    endpoint.attach_router(app)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + HANG_GUARD_S
    while not server.started:  # hang guard only: the server says when it listens
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(HANG_GUARD_S)
        sock.close()


def test_the_cli_runs_a_canary_shows_it_and_keeps_its_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    from vllm_custom_patches._cli.main import main

    def cli(*args: str) -> tuple[int, str, str]:
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse's refusal, as the console script ends with it
            code = int(str(exc.code))
        out, err = capsys.readouterr()
        return code, out, err

    engines = Engines(3)
    with _http_server(engines) as url:
        control = ("--url", url, "--token", TOKEN)
        code, out, err = cli("apply", PATCH, "--dp-ranks", "1", "--reason", "one rank first", *control)
        assert code == 0, out + err
        assert f"patch '{PATCH}' applied on dp rank(s) 1 where it applies" in out
        assert f"{PATCH} on dp rank(s) 1: active since" in out and "(one rank first)" in out
        assert engines.applied() == [False, True, False]

        code, out, err = cli("status", "--url", url)
        assert code == 0 and "rollout " in out and ": active since" in out and "consistent" in out, out + err
        code, out, err = cli("status", "--url", url, "--json")
        (rollout,) = json.loads(out)["rollouts"]
        assert code == 0 and rollout["state"] == "active" and rollout["dp_ranks"] == [1]

        # Refused by the server before any change: exit 1, one line saying why.
        code, out, err = cli("apply", PATCH, "--dp-ranks", "2", *control)
        assert code == 1 and out.startswith("REFUSED: patch 'canary_policy' has an active canary"), out + err
        assert out.count("\n") == 1
        # Did not get that far: exit 2, one line on stderr.
        for args, problem in (
            (("--dp-ranks", "9"), "no engine core has dp rank(s) [9]"),
            (("--dp-ranks", "2", "--guard", "ttft_p99<=fast"), "threshold 'fast' is not a number"),
            (("--dp-ranks", "2", "--window", "30"), "give 'guards' too"),
            (("--dp-ranks", "one"), "is not a comma-separated list of data-parallel ranks"),
            (("--dp-ranks", "1,1"), "more than once"),
            (("--dp-ranks", ""), "is not a comma-separated list"),
        ):
            code, out, err = cli("apply", OTHER, *args, *control)
            assert code == 2 and problem in err and err.count("\n") == 1 and not out, (args, out, err)
        assert engines.applied() == [False, True, False]

        code, out, err = cli("promote", PATCH, *control)
        assert code == 0 and f"{PATCH} on dp rank(s) 1: promoted at" in out, out + err
        assert engines.applied() == [True] * 3
        code, out, err = cli("promote", PATCH, *control)
        assert code == 1 and "has no active rollout to promote" in out
        code, out, err = cli("status", "--url", url)
        assert code == 0 and ": promoted at" in out

        code, out, err = cli("rollback", PATCH, "--dp-ranks", "1", *control)
        assert code == 1 and "shrinks an active canary" in out
        code, out, err = cli("rollback", PATCH, *control)
        assert code == 0 and engines.applied() == [False] * 3
