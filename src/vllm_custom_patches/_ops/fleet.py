"""The server-wide view: every process of a running vLLM server, and whether they agree.

:func:`collect` runs in the API server (the endpoint plugin calls it) and asks
every engine core (every data-parallel rank, on every node) for itself and its
workers, through the engine client; one engine that cannot answer is reported
as such without hiding the others.  :func:`analyse` is pure: the CLI uses it
too.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any

from .agent import STATUS_METHOD, WORKER_TIMEOUT_S, process_record, unreachable_record
from .rollouts import declared, merge

__all__ = [
    "ENGINE_TIMEOUT_S", "MAX_AGE_S", "SharedCollection", "analyse", "call_engine_cores", "collect", "describe_process",
    "engine_failure", "engine_ranks",
]  # fmt: skip

ENGINE_TIMEOUT_S = WORKER_TIMEOUT_S + 3.0
"""How long the API server waits for one engine core (which itself waits for its workers)."""


async def collect(engine_client: Any, timeout: float = ENGINE_TIMEOUT_S) -> dict[str, Any]:
    """Ask every process of this server for its patch status; the endpoint's JSON.

    ``engine_client`` is vLLM's ``EngineClient`` (``AsyncLLM``), or ``None``
    where the server has no engine (only the API server then answers).
    """
    started = time.monotonic()
    processes = [process_record("api_server")]
    rollouts: list[dict[str, Any]] = []
    if engine_client is not None:
        engine_processes, copies = await _engine_processes(engine_client, timeout)
        processes += engine_processes
        rollouts = merge(copies)
    report = analyse(processes, rollouts)
    report["collected_in_s"] = round(time.monotonic() - started, 4)
    return report


MAX_AGE_S = 1.0
"""How long one collected view answers the status route before a request collects again."""


class SharedCollection:
    """The status route's view of the server: one collection at a time, shared, reused for :data:`MAX_AGE_S`.

    A collection makes one utility call per engine core (run on the engine
    loop, between two scheduler steps) and, in each, one ``collective_rpc`` to
    its workers.  Made per request, N anonymous GETs would be N of each: so
    concurrent requests await the collection in flight, a request finding a
    view younger than ``max_age_s`` gets it (with its ``age_s``), and a
    collection never starts while another runs.  A failed collection is not
    kept: the next request tries again.  :meth:`refresh`, after a change,
    drops the view and returns one collected after the call.

    ``epoch`` answers something new after every change made anywhere in the
    server (``epoch.ChangeEpoch``: another API server of the same server may
    have made it): a view, or a collection in flight, that began under another
    epoch is never given to a request.  So a request made after a change has
    been answered gets a view collected after it, whichever API server made it.
    """

    def __init__(
        self,
        collect: Callable[[], Awaitable[dict[str, Any]]],
        *,
        max_age_s: float = MAX_AGE_S,
        clock: Callable[[], float] = time.monotonic,
        epoch: Callable[[], Hashable] = lambda: None,
    ) -> None:
        self._collect = collect
        self._max_age_s = max_age_s
        self._clock = clock
        self._epoch = epoch
        self._generation = 0
        """Bumped by refresh(): a collection started before it is not given to later requests."""
        self._task: asyncio.Task[tuple[dict[str, Any], float]] | None = None
        self._task_key: tuple[int, Hashable] | None = None
        """The generation and epoch read just before the collection in flight was started."""
        self._latest: tuple[dict[str, Any], float, tuple[int, Hashable]] | None = None
        """The last view, when (on ``clock``) it was collected, and the key its collection started under."""
        self.waiting = 0
        """How many callers await the collection in flight (for tests and debugging)."""

    def _key(self) -> tuple[int, Hashable]:
        return self._generation, self._epoch()

    async def get(self) -> dict[str, Any]:
        """A view no older than ``max_age_s``, begun after every change made before this call."""
        key = self._key()
        if self._latest is not None:
            report, collected_at, began = self._latest
            age = self._clock() - collected_at
            if began == key and 0 <= age < self._max_age_s:
                return {**report, "age_s": round(age, 3)}
        return await self._join(key)

    async def refresh(self) -> dict[str, Any]:
        """A view collected after this call (after a change: the new state, at once)."""
        self._generation += 1
        self._latest = None
        return await self._join(self._key())

    async def _join(self, key: tuple[int, Hashable]) -> dict[str, Any]:
        task = self._task
        if task is None or task.done() or self._task_key != key:
            previous = task if task is not None and not task.done() else None
            task = asyncio.get_running_loop().create_task(self._run(previous, key))
            task.add_done_callback(_retrieve)
            self._task, self._task_key = task, key
        self.waiting += 1
        try:
            # Shielded: a client that goes away must not cancel the others' collection.
            report, collected_at = await asyncio.shield(task)
        finally:
            self.waiting -= 1
        return {**report, "age_s": round(max(0.0, self._clock() - collected_at), 3)}

    async def _run(
        self, previous: asyncio.Task[tuple[dict[str, Any], float]] | None, key: tuple[int, Hashable]
    ) -> tuple[dict[str, Any], float]:
        if previous is not None:
            await asyncio.wait([previous])  # one at a time; its outcome is its own awaiters'
        report = await self._collect()
        collected_at = self._clock()
        if key[0] == self._generation:
            # Kept with its key: get() gives it only while no change has been made since that key was read.
            self._latest = (report, collected_at, key)
        return report, collected_at


def _retrieve(task: asyncio.Task[Any]) -> None:
    # Every awaiter may have gone; the exception is theirs, not the event loop's to log.
    if not task.cancelled():
        task.exception()


async def _engine_processes(
    engine_client: Any, timeout: float
) -> tuple[list[dict[str, Any]], list[list[dict[str, Any]]]]:
    """Every engine core and worker, and each engine core's copy of the rollouts (``_rollouts``)."""
    processes: list[dict[str, Any]] = []
    copies: list[list[dict[str, Any]]] = []
    for dp_rank, answer in await call_engine_cores(engine_client, STATUS_METHOD, (), timeout):
        if isinstance(answer, BaseException):
            processes.append(unreachable_record("engine_core", engine_failure(answer), dp_rank=dp_rank))
            continue
        processes.append(answer["engine_core"])
        processes.extend(answer["workers"])
        copies.append(answer.get("rollouts") or [])
    return processes, copies


def engine_ranks(engine_client: Any) -> list[int]:
    """The data-parallel ranks of the engine cores this API server reaches (without asking them)."""
    core = getattr(engine_client, "engine_core", None)
    engines: Sequence[Any] = getattr(core, "core_engines", None) or []
    return sorted(rank for rank in map(_engine_rank, engines) if rank is not None)


async def call_engine_cores(
    engine_client: Any, method: str, args: tuple[Any, ...], timeout: float, dp_ranks: Iterable[int] | None = None
) -> list[tuple[int | None, Any]]:
    """Call utility ``method`` on every engine core (those of ``dp_ranks`` only, if given): ``(dp_rank, answer
    or the exception)`` for each."""
    core = getattr(engine_client, "engine_core", None)
    engines: Sequence[Any] = getattr(core, "core_engines", None) or []
    call_one = getattr(core, "_call_utility_async", None)
    if dp_ranks is not None:
        # Only engine cores whose rank is known can be chosen (the caller checked the ranks exist).
        if call_one is None:
            error = RuntimeError(
                f"this vLLM's engine client ({type(engine_client).__name__}) cannot call one engine core alone"
            )
            return [(None, error)]
        chosen = set(dp_ranks)
        engines = [engine for engine in engines if _engine_rank(engine) in chosen]
        if not engines:
            return []
    if engines and call_one is not None:
        # One call per engine, so one dead or unpatched engine does not hide
        # the others (vLLM's call_utility_all_async fails as a whole).
        calls = [asyncio.wait_for(call_one(method, *args, engine=engine), timeout) for engine in engines]
        ranks: list[int | None] = [_engine_rank(engine) for engine in engines]
    elif core is not None and hasattr(core, "call_utility_async"):
        calls = [asyncio.wait_for(core.call_utility_async(method, *args), timeout)]
        ranks = [None]
    else:
        error = RuntimeError(
            f"this vLLM's engine client ({type(engine_client).__name__}) offers no way to reach the engine cores"
        )
        return [(None, error)]
    answers = await asyncio.gather(*calls, return_exceptions=True)
    return list(zip(ranks, answers, strict=True))


def _engine_rank(engine: Any) -> int | None:
    # vLLM names each engine core's socket by its data-parallel rank, as 2 little-endian bytes.
    return int.from_bytes(engine, "little") if isinstance(engine, (bytes, bytearray)) else None


def engine_failure(error: BaseException) -> str:
    """Why an engine core did not answer, for a human."""
    if isinstance(error, asyncio.TimeoutError):
        return "did not answer in time"
    text = f"{type(error).__name__}: {error}"
    if STATUS_METHOD in text:
        return (
            "the custom_patches plugin is not active in this engine core (is vllm-custom-patches installed "
            f"on its node, and does its VLLM_PLUGINS include custom_patches?): {text}"
        )
    if "vllm_custom_patches_control" in text and "has no attribute" in text:  # only where the kill switch is on
        return (
            "the kill switch is not enabled in this engine core (is VLLM_CUSTOM_PATCHES_CONTROL_TOKEN set in "
            f"its environment, to the API server's value, and is custom_patches in its VLLM_PLUGINS?): {text}"
        )
    return text


def describe_process(process: Mapping[str, Any]) -> str:
    """``engine_core dp_rank=1 pid=123 on host`` (what a human needs to find it)."""
    parts = [str(process.get("role"))]
    for rank in ("dp_rank", "tp_rank", "pp_rank"):
        if process.get(rank) is not None:
            parts.append(f"{rank}={process[rank]}")
    if process.get("pid") is not None:
        parts.append(f"pid={process['pid']}")
    if process.get("host"):
        parts.append(f"on {process['host']}")
    return " ".join(parts)


def analyse(processes: Iterable[Mapping[str, Any]], rollouts: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """``{"consistent", "inconsistencies", "errors", "processes", "rollouts"}`` for a list of process records.

    A patch applied in some processes of a role and not in others of the same
    role is an inconsistency (the API server never loads the scheduler, so
    roles are compared only with themselves); a process that could not answer
    makes the server not consistent too: nothing can be claimed about it.

    An active rollout (``_rollouts``) declares one divergence: its patch applied,
    in the engine cores and workers, in exactly those of its data-parallel
    ranks.  That is consistent; the patch missing in one of them, or applied in
    one outside them, is an inconsistency (``unexpected_in`` names the latter).
    A role where the patch is applied nowhere is left alone, as without a
    rollout (a scheduler patch is never applied in a worker).
    """
    records = [dict(p) for p in processes]
    canaries = declared(rollouts)
    by_role: dict[str, list[dict[str, Any]]] = {}
    for process in records:
        by_role.setdefault(str(process["role"]), []).append(process)
    inconsistencies = []
    for role, members in by_role.items():
        everywhere: set[str] = set()
        for process in members:
            everywhere.update(process["applied"])
        for name in sorted(everywhere):
            canary = canaries.get(name) if role in ("engine_core", "worker") else None
            if canary is None:
                missing = [p for p in members if name not in p["applied"]]
                unexpected: list[dict[str, Any]] = []
            else:
                ranks, _ = canary
                missing = [p for p in members if p.get("dp_rank") in ranks and name not in p["applied"]]
                unexpected = [p for p in members if p.get("dp_rank") not in ranks and name in p["applied"]]
            if not missing and not unexpected:
                continue
            issue: dict[str, Any] = {
                "role": role,
                "patch": name,
                "applied_in": sum(name in p["applied"] for p in members),
                "missing_in": [{**_identity(p), "why": _why_missing(p, name)} for p in missing],
            }
            if canary is not None:
                ranks, rollout_id = canary
                issue["rollout"] = rollout_id
                issue["unexpected_in"] = [
                    {
                        **_identity(p),
                        "why": f"applied outside the canary's dp ranks {sorted(ranks)} (rollout {rollout_id})",
                    }
                    for p in unexpected
                ]
            inconsistencies.append(issue)
    errors = [{**_identity(p), "error": p["error"]} for p in records if p.get("error")]
    return {
        "consistent": not inconsistencies and not errors,
        "inconsistencies": inconsistencies,
        "errors": errors,
        "processes": records,
        "rollouts": [dict(r) for r in rollouts],
    }


def _identity(process: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("role", "pid", "host", "dp_rank", "tp_rank", "pp_rank")
    return {key: process.get(key) for key in keys} | {"description": describe_process(process)}


def _why_missing(process: Mapping[str, Any], name: str) -> str:
    if process.get("error"):
        return str(process["error"])
    for patch in process.get("patches", []):
        if patch.get("name") == name:
            reason = patch.get("reason") or ""
            return f"{patch.get('state')}" + (f": {reason}" if reason else "")
    selection = process.get("selection")
    if not selection:
        return "VLLM_CUSTOM_PATCHES is not set in this process"
    return f"not selected here (VLLM_CUSTOM_PATCHES={selection!r})"
