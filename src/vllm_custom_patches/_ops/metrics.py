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
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .._core.forksafe import ForkSafeLock

__all__ = ["publish"]

_lock = ForkSafeLock()  # a forked child must not find it held by a thread it lacks
_gauges: tuple[Any, Any] | None = None

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


def publish(report: Mapping[str, Any]) -> None:
    """Set the gauges from one view of the server (``_fleet.collect``'s report)."""
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
