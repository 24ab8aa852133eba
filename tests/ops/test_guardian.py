"""The guardian (issue 20 item 4): window semantics, driven step by step on an injected clock and metrics.

No test sleeps: the clock is a number the test moves, the metrics page is
built from what the test says each rank served (``_vllm_metrics``, vLLM's
names and buckets), the status is a dict, and ``end`` records its calls.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import pytest
from _helpers import captured_logs
from _vllm_metrics import Engine, metrics_text

from vllm_custom_patches._env import ENV_GUARD_INTERVAL
from vllm_custom_patches._ops.figures import Reading
from vllm_custom_patches._ops.guardian import DEFAULT_INTERVAL_S, Guardian, guard_interval, watch, watching
from vllm_custom_patches._ops.vllm_metrics import parse

HANG_GUARD_S = 30.0
INTERVAL = 5.0
FAST, SLOW = 0.015, 0.09  # seconds to first token: different buckets of vLLM's TTFT histogram


class Server:
    """What the guardian reads: two ranks' cumulative metrics, the status, a clock; and what ``end`` did."""

    def __init__(self, guards: list[str], window_s: float, *, canary: int = 1, telemetry: bool = False) -> None:
        self.now = 1000.0
        self.engines = {0: Engine(), 1: Engine()}
        self.record: dict[str, Any] = {
            "id": "abc123def456", "patch": "slow_schedule", "dp_ranks": [canary], "since": self.now,
            "guards": guards, "window_s": window_s, "state": "active",
        }  # fmt: skip
        self.patch_errors = 0
        self.telemetry = telemetry
        self.ends: list[tuple[str, Mapping[str, Any], str]] = []
        self.end_answer: dict[str, Any] = {"ok": True}
        self.status_fails = False

    def clock(self) -> float:
        return self.now

    def read_metrics(self) -> str:
        return metrics_text(self.engines)

    async def read_status(self) -> Mapping[str, Any]:
        if self.status_fails:
            raise ConnectionError("engine core 0 did not answer")
        processes = []
        for rank in self.engines:
            record: dict[str, Any] = {"role": "engine_core", "dp_rank": rank, "tp_rank": None}
            if self.telemetry and rank in self.record["dp_ranks"]:
                record["telemetry"] = [
                    {"patch": "slow_schedule", "member": "Scheduler.schedule", "calls": 10, "own_s": 0.5,
                     "total_s": 0.7, "errors": self.patch_errors, "last_error": None},
                ]  # fmt: skip
            processes.append(record)
        return {"processes": processes, "rollouts": [dict(self.record)]}

    async def end(self, patch: str, figures: Mapping[str, Any], reason: str) -> Mapping[str, Any]:
        self.ends.append((patch, figures, reason))
        if self.end_answer.get("ok"):
            self.record["state"] = "rolled_back_by_guard"
        return self.end_answer

    def serve(self, seconds: float, canary: Engine | None, baseline: Engine | None) -> None:
        """``seconds`` pass while each side serves what it is given."""
        self.now += seconds
        canary_rank = self.record["dp_ranks"][0]
        for rank, served in ((canary_rank, canary), (1 - canary_rank, baseline)):
            if served is not None:
                self.engines[rank] = self.engines[rank].plus(served)

    def guardian(self) -> Guardian:
        return Guardian(
            self.record, read_status=self.read_status, read_metrics=self.read_metrics, end=self.end, clock=self.clock
        )


def run(coroutine: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coroutine, HANG_GUARD_S))


def slow() -> Engine:
    return Engine.serving(5, ttft=SLOW)


def fast() -> Engine:
    return Engine.serving(5, ttft=FAST)


async def steps(server: Server, guardian: Guardian, *served: tuple[Engine | None, Engine | None]) -> list[bool]:
    """One interval of traffic, then one step, for each item; what each step returned."""
    results = []
    for canary, baseline in served:
        server.serve(INTERVAL, canary, baseline)
        results.append(await guardian.step())
    return results


def test_a_whole_window_of_breach_ends_the_rollout_once_with_the_figures() -> None:
    server = Server(["ttft_p99<=1.2x", "errors==0"], window_s=30)

    async def scenario() -> None:
        guardian = server.guardian()
        assert await guardian.begin()
        # Broken from the start: the breach is counted from the rollout's start reading.
        kept = await steps(server, guardian, *[(slow(), fast())] * 5)
        assert kept == [True] * 5 and server.ends == []  # 25 s of breach < 30 s
        assert guardian.view()["guards"][0]["breach_since"] == 1000.0
        assert await steps(server, guardian, (slow(), fast())) == [False]  # 30 s: the window is covered

    run(scenario())
    assert len(server.ends) == 1
    patch, figures, reason = server.ends[0]
    assert patch == "slow_schedule"
    assert reason.startswith("ttft_p99<=1.2x broken for 30.0 s (window 30 s): canary ttft_p99 ")
    (broken,) = figures["broken"]
    assert broken["guard"] == "ttft_p99<=1.2x" and broken["verdict"] == "broken" and broken["broken_for_s"] == 30.0
    assert 0.08 < broken["canary"] <= 0.1 and 0.01 < broken["baseline"] <= 0.02
    assert figures["canary"]["dp_ranks"] == [1] and figures["baseline"]["dp_ranks"] == [0]
    assert [g["verdict"] for g in figures["guards"]] == ["broken", "ok"]
    assert figures["window_s"] == 30


def test_a_breach_shorter_than_the_window_does_nothing() -> None:
    server = Server(["ttft_p99<=1.2x"], window_s=30)

    async def scenario() -> Guardian:
        guardian = server.guardian()
        await guardian.begin()
        await steps(server, guardian, (fast(), fast()), (fast(), fast()))
        # 20 s of breach (judged at 15, 20, 25, 30 s: it began at the 10 s reading), then it holds again.
        assert await steps(server, guardian, *[(slow(), fast())] * 4) == [True] * 4
        assert guardian.view()["guards"][0]["breach_since"] == 1010.0
        assert await steps(server, guardian, *[(fast(), fast())] * 10) == [True] * 10
        return guardian

    guardian = run(scenario())
    assert server.ends == []
    assert guardian.view()["guards"][0] | {"why": ""} == {
        **guardian.view()["guards"][0], "verdict": "ok", "breach_since": None, "why": "",
    }  # fmt: skip


def test_an_ok_judgement_in_the_middle_starts_the_count_again() -> None:
    server = Server(["ttft_p99<=1.2x"], window_s=20)

    async def scenario() -> None:
        guardian = server.guardian()
        await guardian.begin()
        await steps(server, guardian, *[(slow(), fast())] * 3, (fast(), fast()), *[(slow(), fast())] * 3)
        assert server.ends == []  # 15 s, a break, 15 s
        assert await steps(server, guardian, (slow(), fast())) == [False]  # 20 s since the break

    run(scenario())
    assert len(server.ends) == 1


def test_cannot_evaluate_does_nothing_and_says_so_at_most_once_a_minute() -> None:
    server = Server(["ttft_p99<=1.2x"], window_s=10)

    async def scenario() -> Guardian:
        guardian = server.guardian()
        await guardian.begin()
        # The canary is slow, but the baseline serves nothing: a multiple of nothing compares nothing.
        assert await steps(server, guardian, *[(slow(), None)] * 30) == [True] * 30
        return guardian

    with captured_logs() as logs:
        guardian = run(scenario())
    assert server.ends == []
    (verdict,) = guardian.view()["guards"]
    assert verdict["verdict"] == "cannot_evaluate"
    assert verdict["why"] == "ttft_p99 is unknown on the baseline ranks (no request finished in the window)"
    said = [m for m in logs.messages(logging.INFO) if "cannot evaluate" in m]
    # 150 s of judgements every 5 s: the first, then once a minute.
    assert len(said) == 3
    assert said[0] == (
        "vllm-custom-patches guard ttft_p99<=1.2x of slow_schedule: cannot evaluate (ttft_p99 is unknown on the "
        "baseline ranks (no request finished in the window)); nothing done"
    )


def test_cannot_evaluate_inside_a_breach_neither_counts_nor_breaks_it() -> None:
    server = Server(["ttft_p99<=1.2x"], window_s=20)

    async def scenario() -> None:
        guardian = server.guardian()
        await guardian.begin()
        await steps(server, guardian, (slow(), fast()), (None, None), (None, None))
        assert server.ends == []
        # The next judgement covers the quiet 10 s too (its data begins at the last judged reading).
        assert await steps(server, guardian, (slow(), fast())) == [False]

    run(scenario())
    assert len(server.ends) == 1
    assert server.ends[0][1]["broken"][0]["span_s"] == 15.0


def test_a_whole_window_without_a_judgement_drops_the_breach() -> None:
    server = Server(["ttft_p99<=1.2x"], window_s=20)

    async def scenario() -> Guardian:
        guardian = server.guardian()
        await guardian.begin()
        await steps(server, guardian, (slow(), fast()), *[(None, None)] * 5)
        assert guardian.view()["guards"][0]["breach_since"] is None
        # Judged again, broken: a new breach, begun at the judgement before (30 s), not at the data's start.
        assert await steps(server, guardian, (slow(), fast())) == [True]
        return guardian

    guardian = run(scenario())
    assert server.ends == []
    assert guardian.view()["guards"][0]["breach_since"] == 1030.0


def test_errors_in_every_interval_for_a_window_roll_back_and_telemetry_off_cannot_tell() -> None:
    server = Server(["patch_errors==0"], window_s=10, telemetry=True)

    async def scenario() -> None:
        guardian = server.guardian()
        await guardian.begin()
        for _ in range(2):
            server.patch_errors += 1
            await steps(server, guardian, (fast(), fast()))
        assert len(server.ends) == 1

    run(scenario())
    assert "patch_errors==0 broken for 10.0 s" in server.ends[0][2]

    quiet = Server(["patch_errors==0", "errors==0"], window_s=10, telemetry=False)

    async def without_telemetry() -> Guardian:
        guardian = quiet.guardian()
        await guardian.begin()
        await steps(quiet, guardian, *[(Engine.serving(5, FAST, errors=1), fast())] * 3)
        return guardian

    guardian = run(without_telemetry())
    patch_errors, errors = guardian.view()["guards"]
    assert patch_errors["verdict"] == "cannot_evaluate" and "telemetry is off" in patch_errors["why"]
    # errors falls back on failed requests, and says so: they failed in every interval, so it rolled back.
    assert "failed requests only" in errors["why"]
    assert len(quiet.ends) == 1 and "errors==0 broken" in quiet.ends[0][2]


def test_a_refused_rollback_starts_the_count_over() -> None:
    server = Server(["ttft_p99<=1.2x"], window_s=10)
    server.end_answer = {"ok": False, "outcome": "refused", "error": "a worker refused"}

    async def scenario() -> None:
        guardian = server.guardian()
        await guardian.begin()
        with captured_logs() as logs:
            assert await steps(server, guardian, *[(slow(), fast())] * 2) == [True, True]
        assert len(server.ends) == 1
        assert any("failed (a worker refused)" in m for m in logs.messages(logging.ERROR))
        assert await steps(server, guardian, (slow(), fast())) == [True]  # 5 s of the new breach
        server.end_answer = {"ok": True}
        assert await steps(server, guardian, (slow(), fast())) == [False]

    run(scenario())
    assert len(server.ends) == 2


def test_the_guardian_stops_when_the_rollout_is_no_longer_active() -> None:
    server = Server(["ttft_p99<=1.2x"], window_s=10)

    async def scenario() -> None:
        guardian = server.guardian()
        await guardian.begin()
        assert await steps(server, guardian, (slow(), fast())) == [True]
        server.record["state"] = "promoted"
        assert await steps(server, guardian, (slow(), fast())) == [False]

    run(scenario())
    assert server.ends == []


def test_an_unreadable_server_skips_a_judgement() -> None:
    server = Server(["ttft_p99<=1.2x"], window_s=10)

    async def scenario() -> None:
        guardian = server.guardian()
        await guardian.begin()
        server.status_fails = True
        with captured_logs() as logs:
            assert await steps(server, guardian, (slow(), fast())) == [True]
        assert any("engine core 0 did not answer" in m for m in logs.messages(logging.WARNING))
        server.status_fails = False
        # The skipped interval is judged with the next (its data begins at the last reading).
        assert await steps(server, guardian, (slow(), fast())) == [False]

    run(scenario())
    assert len(server.ends) == 1


def test_a_shrunk_canary_is_judged_on_its_ranks_now() -> None:
    server = Server(["ttft_p99<=1.2x"], window_s=10)
    server.engines[2] = Engine()

    async def scenario() -> Guardian:
        guardian = server.guardian()
        server.record["dp_ranks"] = [1, 2]
        guardian.dp_ranks = [1, 2]
        await guardian.begin()
        server.record["dp_ranks"] = [1]
        await steps(server, guardian, (slow(), fast()))
        return guardian

    guardian = run(scenario())
    assert guardian.dp_ranks == [1]


def test_the_start_reading_of_the_record_is_the_first_mark() -> None:
    server = Server(["ttft_p99<=1.2x"], window_s=10)
    # Before the guardian began, the canary served slowly for a while after the rollout's start.
    server.record["at_start"] = Reading(parse(server.read_metrics(), at=server.now)).to_json()
    server.serve(5.0, slow(), fast())

    async def scenario() -> None:
        guardian = server.guardian()
        await guardian.begin()
        assert await steps(server, guardian, (slow(), fast())) == [False]  # 10 s since the start reading

    run(scenario())
    assert server.ends[0][1]["broken"][0]["breach_since"] == 1000.0


def test_watch_runs_the_loop_on_its_clock_and_ends_once() -> None:
    server = Server(["ttft_p99<=1.2x"], window_s=15)
    seen: list[dict[str, Any]] = []

    async def sleep(seconds: float) -> None:
        seen.append(watching())
        server.serve(seconds, slow(), fast())

    async def end(engine_client: object, patch: str, figures: Mapping[str, Any], reason: str) -> Mapping[str, Any]:
        assert engine_client == "engine client"
        return await server.end(patch, figures, reason)

    async def scenario() -> None:
        task = watch(
            "engine client", server.record, end=end, read_metrics=server.read_metrics, interval_s=INTERVAL,
            read_status=server.read_status, clock=server.clock, sleep=sleep,
        )  # fmt: skip
        await task

    run(scenario())
    assert len(server.ends) == 1
    assert server.now == 1015.0
    assert list(seen[0]) == ["abc123def456"] and seen[0]["abc123def456"]["patch"] == "slow_schedule"
    assert watching() == {}


def test_the_interval_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert guard_interval({}) == DEFAULT_INTERVAL_S
    assert guard_interval({ENV_GUARD_INTERVAL: " 0.5 "}) == 0.5
    with captured_logs() as logs:
        for bad in ("fast", "0", "-1", "nan", "1e9"):
            assert guard_interval({ENV_GUARD_INTERVAL: bad}) == DEFAULT_INTERVAL_S
    assert len(logs.messages(logging.WARNING)) == 5
    assert "is not a number of seconds between 0.05 and 3600" in logs.messages()[0]
