"""``GET /custom_patches`` costs the engines the same however often it is asked.

Each collection makes one utility call per engine core (run on the engine
loop) and, in each, one ``collective_rpc``: concurrent requests share one
collection, a view younger than about a second answers the next ones, a
failed collection is not kept, and a kill-switch change collects afresh at
once, in every API server of the server (vLLM may start several: they share
a change epoch, ``_ops.epoch``).  Through the real FastAPI app, against
stand-in engine cores that count their calls; time is an injected clock,
never a sleep.
"""

from __future__ import annotations

import asyncio
from argparse import Namespace
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from _helpers import captured_logs

from vllm_custom_patches import PatchManager, VLLMPatch
from vllm_custom_patches._ops.agent import STATUS_METHOD, process_record
from vllm_custom_patches._ops.epoch import ChangeEpoch
from vllm_custom_patches._ops.fleet import MAX_AGE_S, SharedCollection

fastapi = pytest.importorskip("fastapi", reason="vLLM's dependency; installed with vLLM")
httpx = pytest.importorskip("httpx", reason="vLLM's dependency; installed with vLLM")

HANG_GUARD_S = 60.0
ENGINES = 2


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class StaleClock(Clock):
    """Every reading is far later than the last: no view is ever young enough to be reused."""

    def __call__(self) -> float:
        self.now += 100 * MAX_AGE_S
        return self.now


class EngineCores:
    """Stands in for vLLM's engine-core client: ``ENGINES`` data-parallel engine cores answering utility calls."""

    def __init__(self) -> None:
        self.core_engines = [rank.to_bytes(2, "little") for rank in range(ENGINES)]
        self.status_calls = 0
        self.gate: asyncio.Event | None = None
        """When set to an event, every call waits for it: a collection stays in flight."""

    async def _call_utility_async(self, method: str, *args: Any, engine: bytes) -> Any:
        assert method == STATUS_METHOD
        self.status_calls += 1
        if self.gate is not None:
            await self.gate.wait()
        rank = int.from_bytes(engine, "little")
        return {"engine_core": process_record("engine_core", dp_rank=rank), "workers": []}


class EngineClient:
    def __init__(self) -> None:
        self.cores = EngineCores()
        self.fail_next = False

    @property
    def engine_core(self) -> EngineCores:
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("the engine client broke while collecting")
        return self.cores


class Target:
    def run(self) -> str:
        return "original"


@pytest.fixture
def patch() -> Iterator[type[VLLMPatch[Any]]]:
    class Coalesced(VLLMPatch[Target]):
        name = "coalesced"

        def run(self) -> str:
            return "patched"

    PatchManager.register(Coalesced)
    PatchManager.apply(Coalesced)
    yield Coalesced
    PatchManager.rollback_all()


Scenario = Callable[[Any, Any, EngineClient], Awaitable[None]]


def _serve(scenario: Scenario, clock: Clock) -> EngineClient:
    """Run ``scenario(client, endpoint, engine)`` against the real app with the plugin's routes."""
    from vllm_custom_patches.endpoint import CustomPatchesEndpoint

    engine = EngineClient()

    async def main() -> None:
        app = fastapi.FastAPI()
        endpoint = CustomPatchesEndpoint(clock=clock)
        endpoint.attach_router(app)
        await endpoint.init_state(engine, app.state, Namespace(api_key=None))
        assert endpoint._refresher is not None
        endpoint._refresher.cancel()  # not yet started: the background refresh makes no call here
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://server") as client:
            await asyncio.wait_for(scenario(client, endpoint, engine), HANG_GUARD_S)

    asyncio.run(main())
    return engine


def test_200_concurrent_gets_make_one_collection() -> None:
    async def scenario(client: Any, endpoint: Any, engine: EngineClient) -> None:
        answers = await asyncio.gather(*(client.get("/custom_patches") for _ in range(200)))
        assert [a.status_code for a in answers] == [200] * 200
        assert all(len(a.json()["processes"]) == 1 + ENGINES for a in answers)

    engine = _serve(scenario, Clock())
    # One utility call per engine core for all 200 (each GET made its own before: 200 * ENGINES).
    assert engine.cores.status_calls == ENGINES


def test_concurrent_gets_share_the_collection_in_flight_even_with_no_view_to_reuse() -> None:
    async def scenario(client: Any, endpoint: Any, engine: EngineClient) -> None:
        engine.cores.gate = asyncio.Event()
        gets = [asyncio.ensure_future(client.get("/custom_patches")) for _ in range(200)]
        # Every request waits on the collection, which is at the engines.
        await _until(lambda: endpoint._status.waiting == 200 and engine.cores.status_calls >= ENGINES)
        engine.cores.gate.set()
        answers = await asyncio.gather(*gets)
        assert [a.status_code for a in answers] == [200] * 200
        assert len({a.json()["collected_in_s"] for a in answers}) == 1  # the same view, to each
        assert engine.cores.status_calls == ENGINES

    _serve(scenario, StaleClock())


def test_a_view_older_than_the_window_is_collected_again() -> None:
    clock = Clock()

    async def scenario(client: Any, endpoint: Any, engine: EngineClient) -> None:
        assert (await client.get("/custom_patches")).json()["age_s"] == 0
        clock.now += MAX_AGE_S / 2
        assert (await client.get("/custom_patches")).json()["age_s"] == MAX_AGE_S / 2
        assert engine.cores.status_calls == ENGINES
        clock.now += MAX_AGE_S / 2
        assert (await client.get("/custom_patches")).json()["age_s"] == 0
        assert engine.cores.status_calls == 2 * ENGINES

    _serve(scenario, clock)


def test_a_failed_collection_is_not_kept() -> None:
    async def scenario(client: Any, endpoint: Any, engine: EngineClient) -> None:
        engine.fail_next = True
        assert (await client.get("/custom_patches")).status_code == 500
        assert engine.cores.status_calls == 0
        answer = await client.get("/custom_patches")  # the clock has not moved: still tried again
        assert answer.status_code == 200 and answer.json()["age_s"] == 0
        assert engine.cores.status_calls == ENGINES

    _serve(scenario, Clock())


TOKEN = "k" * 32


@pytest.fixture
def change_here(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kill switch on, its change made in this process only (the stand-in engine cores answer only the status).

    The stand-in engine cores report this process's patches, so they show the change.
    """
    from vllm_custom_patches._ops import switch as _switch

    monkeypatch.setenv("VLLM_CUSTOM_PATCHES_CONTROL_TOKEN", TOKEN)
    real_change = _switch.change

    async def change(engine_client: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return await real_change(None, *args, **kwargs)

    monkeypatch.setattr(_switch, "change", change)


def test_a_kill_switch_change_shows_in_the_status_at_once(patch: type[VLLMPatch[Any]], change_here: None) -> None:
    def applied_here(answer: Any) -> list[str]:
        (api_server,) = [p for p in answer.json()["processes"] if p["role"] == "api_server"]
        return list(api_server["applied"])

    async def scenario(client: Any, endpoint: Any, engine: EngineClient) -> None:
        assert applied_here(await client.get("/custom_patches")) == ["coalesced"]
        headers = {"Authorization": f"Bearer {TOKEN}"}
        assert (await client.post("/custom_patches/coalesced/rollback", headers=headers)).status_code == 200
        assert engine.cores.status_calls == 2 * ENGINES  # the change collected afresh
        # The clock has not moved: without that, the view from before the change would answer.
        answer = await client.get("/custom_patches")
        assert applied_here(answer) == [] and answer.json()["age_s"] == 0
        assert engine.cores.status_calls == 2 * ENGINES

    _serve(scenario, Clock())


def _engine_cores_applied(answer: Any) -> list[list[str]]:
    assert answer.status_code == 200, answer.text
    return [list(p["applied"]) for p in answer.json()["processes"] if p["role"] == "engine_core"]


def test_a_change_through_one_api_server_shows_at_once_in_the_others(
    patch: type[VLLMPatch[Any]], change_here: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """vLLM serves one address from several API servers (``--data-parallel-size 2`` starts two), each with its own
    view; a GET after a change answered by one of them, sent to another, must show the change."""
    from vllm_custom_patches.endpoint import CustomPatchesEndpoint

    monkeypatch.setenv("VLLM_RPC_BASE_PATH", str(tmp_path))  # where vLLM puts the server's sockets
    args = Namespace(api_key=None, host="127.0.0.1", port=8000, uds=None)  # both API servers' (vLLM's arguments)
    engine, clock = EngineClient(), Clock()  # the clock never moves: every view stays young enough to reuse

    async def main() -> None:
        clients = []
        for _ in range(2):
            app = fastapi.FastAPI()
            endpoint = CustomPatchesEndpoint(clock=clock)
            endpoint.attach_router(app)
            await endpoint.init_state(engine, app.state, args)
            assert endpoint._refresher is not None
            endpoint._refresher.cancel()
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            clients.append(httpx.AsyncClient(transport=transport, base_url="http://server"))
        first, second = clients
        try:
            assert _engine_cores_applied(await second.get("/custom_patches")) == [["coalesced"]] * ENGINES
            assert _engine_cores_applied(await first.get("/custom_patches")) == [["coalesced"]] * ENGINES
            headers = {"Authorization": f"Bearer {TOKEN}"}
            rolled_back = await first.post("/custom_patches/coalesced/rollback", headers=headers)
            assert rolled_back.status_code == 200 and rolled_back.json()["ok"], rolled_back.text
            # Before the fix: the second API server's view from before the rollback, 0 s old, answered.
            assert _engine_cores_applied(await second.get("/custom_patches")) == [[]] * ENGINES
            assert _engine_cores_applied(await first.get("/custom_patches")) == [[]] * ENGINES
            calls = engine.cores.status_calls
            # No change since: both reuse their views again.
            assert _engine_cores_applied(await second.get("/custom_patches")) == [[]] * ENGINES
            assert _engine_cores_applied(await first.get("/custom_patches")) == [[]] * ENGINES
            assert engine.cores.status_calls == calls
        finally:
            for client in clients:
                await client.aclose()

    asyncio.run(asyncio.wait_for(main(), HANG_GUARD_S))


# -- the coalescer itself -------------------------------------------------------------


class Collector:
    def __init__(self) -> None:
        self.started = 0
        self.gate = asyncio.Event()

    async def __call__(self) -> dict[str, Any]:
        self.started += 1
        number = self.started
        await self.gate.wait()
        return {"collection": number}


async def _until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0)


def test_a_refresh_waits_for_the_collection_in_flight_and_only_later_requests_get_its_view() -> None:
    async def main() -> None:
        collect = Collector()
        shared = SharedCollection(collect, clock=Clock())
        before = asyncio.ensure_future(shared.get())
        await _until(lambda: collect.started == 1)
        refreshed = asyncio.ensure_future(shared.refresh())
        after = asyncio.ensure_future(shared.get())
        await _until(lambda: shared.waiting == 3)
        assert collect.started == 1  # never two collections at once
        collect.gate.set()
        assert (await before)["collection"] == 1  # asked before the change: the view in flight
        assert (await refreshed)["collection"] == 2 and (await after)["collection"] == 2
        assert (await shared.get())["collection"] == 2 and collect.started == 2

    asyncio.run(asyncio.wait_for(main(), HANG_GUARD_S))


def test_a_caller_that_goes_away_does_not_cancel_the_others_collection() -> None:
    async def main() -> None:
        collect = Collector()
        shared = SharedCollection(collect, clock=Clock())
        leaving, staying = asyncio.ensure_future(shared.get()), asyncio.ensure_future(shared.get())
        await _until(lambda: shared.waiting == 2)
        leaving.cancel()
        await _until(lambda: shared.waiting == 1)
        collect.gate.set()
        assert (await staying)["collection"] == 1 and collect.started == 1

    asyncio.run(asyncio.wait_for(main(), HANG_GUARD_S))


def test_a_collection_in_flight_when_a_change_is_made_elsewhere_is_not_given_to_a_later_request() -> None:
    """The interleaving behind a stale answer: a collection begun before a change (made through another API
    server) ends after it; a request made after the change must not get it, nor the view it leaves."""

    async def main() -> None:
        collect, epoch = Collector(), ["before"]
        shared = SharedCollection(collect, clock=Clock(), epoch=lambda: epoch[0])
        before = asyncio.ensure_future(shared.get())
        await _until(lambda: collect.started == 1)
        epoch[0] = "after"  # the other API server's change is done and answered
        after = asyncio.ensure_future(shared.get())
        await _until(lambda: shared.waiting == 2)
        assert collect.started == 1  # still one collection at a time
        collect.gate.set()
        assert (await before)["collection"] == 1  # asked before the change: the view in flight
        assert (await after)["collection"] == 2  # begun after the change
        assert (await shared.get())["collection"] == 2 and collect.started == 2  # which is reused
        epoch[0] = "later"
        assert (await shared.get())["collection"] == 3  # a view from before a change is not reused either

    asyncio.run(asyncio.wait_for(main(), HANG_GUARD_S))


# -- the epoch the API servers share --------------------------------------------------


def test_the_api_servers_of_one_server_share_an_epoch_and_other_servers_do_not(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("VLLM_RPC_BASE_PATH", str(tmp_path))
    one, same = (ChangeEpoch.for_server(Namespace(host="127.0.0.1", port=8000, uds=None)) for _ in range(2))
    other = ChangeEpoch.for_server(Namespace(host="127.0.0.1", port=8001, uds=None))
    assert one.path == same.path and one.path != other.path and one.path is not None
    assert one.path.parent == tmp_path
    assert one.read() == same.read() == other.read() == ""  # no change yet
    one.advance()
    first = same.read()
    assert first and one.read() == first and other.read() == ""
    same.advance()
    assert one.read() not in ("", first) and one.read() == same.read()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([one.path.name])  # no temporary file left


def test_an_epoch_without_an_address_is_this_process_s_only() -> None:
    epoch = ChangeEpoch.for_server(Namespace(api_key=None))
    assert epoch.path is None
    epoch.advance()
    assert epoch.read() == ""


def test_an_epoch_that_cannot_be_written_or_read_is_logged_and_no_view_is_reused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("VLLM_RPC_BASE_PATH", str(tmp_path / "missing"))
    epoch = ChangeEpoch.for_server(Namespace(host="h", port=1, uds=None))
    with captured_logs() as logs:
        epoch.advance()  # its directory does not exist
    (warning,) = logs.messages()
    assert "cannot write the status epoch" in warning and "up to 1 s" in warning
    assert epoch.read() == ""

    tmp_path.joinpath("missing").mkdir()
    assert epoch.path is not None
    epoch.path.symlink_to(tmp_path / "elsewhere")  # not followed: no API server wrote it
    with captured_logs() as logs:
        readings = {epoch.read() for _ in range(3)}
    assert len(readings) == 3  # each one new: nothing collected under one is reused
    (warning,) = logs.messages()  # said once
    assert "cannot read the status epoch" in warning
