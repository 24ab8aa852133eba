"""The server's patch status on vLLM's ``/metrics`` (prometheus_client, which vLLM ships).

``vllm_custom_patches_applied{patch, role, host, dp_rank, tp_rank, pp_rank}``
is 1 where a patch is applied and 0 where it is known (selected there, or
applied elsewhere in the same role) but not applied; ``vllm_custom_patches_consistent``
is the endpoint's ``consistent``.  The values are the last view the endpoint
collected (on each request of the route, and every few seconds in the
background): prometheus collects synchronously, where the engine cores cannot
be asked.

Plain gauges, so that they also reach ``/metrics`` when vLLM runs several API
servers (``vllm serve --data-parallel-size N`` starts N by default) and uses
prometheus_client's multiprocess mode: there each API server publishes its
view and the most recent one wins.  In that mode the series of a process that
is gone stay until the server restarts.

With telemetry on (``VLLM_CUSTOM_PATCHES_TELEMETRY=1``, ``_runtime.telemetry``)
three counters follow each process's figures, per patch and member, with the
applied gauge's labels plus ``member``: ``vllm_custom_patches_calls_total``,
``vllm_custom_patches_seconds_total`` (``scope="own"`` or ``"total"``) and
``vllm_custom_patches_errors_total``.  A view carries each process's
cumulative figures; a counter cannot be set, so each is increased by what the
process's figure grew since the last view, and by the whole figure when the
process is new (another pid under the same labels: restarted) or its figure
went down: the series only ever grows.  plain counters, not a collector of our
own, because in multiprocess mode vLLM's ``/metrics`` reads only what
prometheus_client's own metrics wrote to its directory, and sums counters
over the API servers; so each API server publishes its own process's
counters, and only the first (client index 0) those of the engine cores and
workers, which every API server sees alike.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from .._core.forksafe import ForkSafeLock

__all__ = ["publish", "publishes_engines"]

_lock = ForkSafeLock()  # a forked child must not find it held by a thread it lacks
_gauges: tuple[Any, Any] | None = None
_counters: tuple[Any, Any, Any] | None = None
_published: dict[tuple[str, ...], tuple[object, float, float, float, float]] = {}
"""Per series (labels): the pid and the figures (calls, own_s, total_s, errors) the counters were last brought to."""

_RANK_LABELS = ("dp_rank", "tp_rank", "pp_rank")


def _get_gauges() -> tuple[Any, Any]:
    global _gauges
    if _gauges is None:
        from prometheus_client import Gauge

        applied = Gauge(
            "vllm_custom_patches_applied",
            "1 if the patch is applied in the process, 0 if it is known there or applied in "
            "other processes of its role but not in this one",
            # No pid: series must survive a restart of the server (and
            # prometheus_client's multiprocess mode owns a label of that name).
            labelnames=["patch", "role", "host", *_RANK_LABELS],
            multiprocess_mode="mostrecent",
        )
        consistent = Gauge(
            "vllm_custom_patches_consistent",
            "1 if every process of each role has the same patches applied and every process answered",
            multiprocess_mode="mostrecent",
        )
        _gauges = applied, consistent
    return _gauges


def _get_counters() -> tuple[Any, Any, Any]:
    global _counters
    if _counters is None:
        from prometheus_client import Counter

        labels = ["patch", "member", "role", "host", *_RANK_LABELS]
        calls = Counter(
            "vllm_custom_patches_calls",
            "Calls of a patch's member in the process (VLLM_CUSTOM_PATCHES_TELEMETRY=1)",
            labelnames=labels,
        )
        seconds = Counter(
            "vllm_custom_patches_seconds",
            "Seconds spent in a patch's member: scope=own in its own code (not in the original or the "
            "inner layers it calls), scope=total from entering it to leaving it",
            labelnames=[*labels, "scope"],
        )
        errors = Counter(
            "vllm_custom_patches_errors",
            "Exceptions raised by a patch's own code that left the member (not those passing through it)",
            labelnames=labels,
        )
        _counters = calls, seconds, errors
    return _counters


def publishes_engines(engine_client: Any) -> bool:
    """Whether this API server publishes the engine cores' and workers' counters: the first one does (see above)."""
    index = getattr(getattr(engine_client, "engine_core", None), "client_index", 0)
    return not isinstance(index, int) or index == 0


def publish(report: Mapping[str, Any], engine_client: Any = None) -> None:
    """Set the gauges from one view of the server (``_fleet.collect``'s report), and the telemetry counters.

    ``engine_client`` (vLLM's, of this API server) tells whether this API
    server is the one that publishes the counters of the engine cores and
    workers (:func:`publishes_engines`).
    """
    processes = report["processes"]
    in_role: dict[str, set[str]] = {}
    for process in processes:
        in_role.setdefault(process["role"], set()).update(process["applied"])
    with _lock:
        applied, consistent = _get_gauges()
        applied.clear()  # a series for a process or patch that is gone must not linger
        for process in processes:
            known = {patch["name"] for patch in process["patches"]} | in_role[process["role"]]
            labels = {
                "role": process["role"],
                "host": str(process.get("host") or ""),
                **{rank: "" if process.get(rank) is None else str(process[rank]) for rank in _RANK_LABELS},
            }
            for name in sorted(known):
                applied.labels(patch=name, **labels).set(1.0 if name in process["applied"] else 0.0)
        consistent.set(1.0 if report["consistent"] else 0.0)
        engines = publishes_engines(engine_client)
        for process in processes:
            if process.get("telemetry") is None:
                continue
            mine = process["role"] == "api_server" and process.get("pid") == os.getpid()
            if mine or (engines and process["role"] != "api_server"):
                _count(process)


def _count(process: Mapping[str, Any]) -> None:
    """Bring the counters of one process's telemetry rows up to its figures (see the module's docstring)."""
    calls, seconds, errors = _get_counters()
    labels = {
        "role": str(process["role"]),
        "host": str(process.get("host") or ""),
        **{rank: "" if process.get(rank) is None else str(process[rank]) for rank in _RANK_LABELS},
    }
    for row in process["telemetry"]:
        try:
            series = {"patch": str(row["patch"]), "member": str(row["member"]), **labels}
            now = (float(row["calls"]), float(row["own_s"]), float(row["total_s"]), float(row["errors"]))
        except (KeyError, TypeError, ValueError):  # not a row this version writes: no figure beats a wrong one
            continue
        key = tuple(series.values())
        last = _published.get(key)
        before = last[1:] if last is not None and last[0] == process.get("pid") else (0.0, 0.0, 0.0, 0.0)
        grown = [value - old if value >= old else value for value, old in zip(now, before, strict=True)]
        # Every series is made (at 0) as soon as the member is timed, not at its first call or error.
        children = (calls.labels(**series), seconds.labels(**series, scope="own"),
                    seconds.labels(**series, scope="total"), errors.labels(**series))  # fmt: skip
        for child, amount in zip(children, grown, strict=True):
            if amount > 0:
                child.inc(amount)
        _published[key] = (process.get("pid"), *now)


def _reset_for_tests() -> None:
    """Forget the counters' series and what they were brought to."""
    with _lock:
        if _counters is not None:
            for counter in _counters:
                counter.clear()
        _published.clear()
