"""The figures a canary is judged on: vLLM's own metrics of each side, and the patch's telemetry.

The canary is a rollout's ``dp_ranks``; the baseline is every other
data-parallel rank of the server. Each side's figures come from
:meth:`vllm_metrics.Window.figures` (latency quantiles, rates, counts) over
the same window. The canary's also carry the patch's telemetry
(``_runtime.telemetry``: calls, own and total seconds, errors), summed over
the engine cores and workers of its ranks, and the two error counts the
guards read (see ``_ops.guards``): ``patch_errors`` (the telemetry's errors)
and ``errors`` (``failed_requests + patch_errors``, or ``failed_requests``
alone, with a note, when the telemetry is off).

Telemetry counters only grow for the life of a process (a rolled-back patch
keeps its counts), so a window's telemetry is the difference of two readings,
as vLLM's counters are.

A :class:`Reading` is what is read at one instant: vLLM's metrics and the
patch's telemetry on the canary ranks. Its JSON form is what a rollout
record keeps of its start (``at_start``), so that ``compare`` can judge the
whole life of the rollout from any API server.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .guards import Guard, Verdict, evaluate
from .vllm_metrics import MetricsError, Snapshot, Window

__all__ = ["TELEMETRY_FIELDS", "Reading", "judge", "sides", "telemetry_of"]

TELEMETRY_FIELDS = ("calls", "own_s", "total_s", "errors")
_RANKED_ROLES = ("engine_core", "worker")
TELEMETRY_OFF = "the patch's telemetry is off on the canary ranks (VLLM_CUSTOM_PATCHES_TELEMETRY=1 turns it on)"


def telemetry_of(processes: Iterable[Mapping[str, Any]], patch: str, ranks: Iterable[int]) -> dict[str, float] | None:
    """The patch's telemetry summed over the engine cores and workers of ``ranks``; None where none reports it.

    A process reports it when telemetry is on there and the patch was applied
    there while it was (``telemetry`` rows of the status record).
    """
    wanted = set(ranks)
    total = dict.fromkeys(TELEMETRY_FIELDS, 0.0)
    seen = False
    for process in processes:
        if process.get("role") not in _RANKED_ROLES or process.get("dp_rank") not in wanted:
            continue
        rows = process.get("telemetry")
        if not isinstance(rows, list):
            continue
        for row in rows:
            if not isinstance(row, Mapping) or row.get("patch") != patch:
                continue
            seen = True
            for name in TELEMETRY_FIELDS:
                value = row.get(name)
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    total[name] += float(value)
    return total if seen else None


def _telemetry_since(now: Mapping[str, float] | None, before: Mapping[str, float] | None) -> dict[str, float] | None:
    if now is None:
        return None
    if before is None or any(now.get(k, 0.0) < before.get(k, 0.0) for k in TELEMETRY_FIELDS):
        return dict(now)  # nothing before, or a process restarted since (its counters began again)
    return {k: now.get(k, 0.0) - before.get(k, 0.0) for k in TELEMETRY_FIELDS}


@dataclass(frozen=True)
class Reading:
    """vLLM's metrics and the patch's telemetry on the canary ranks, read at ``metrics.at``."""

    metrics: Snapshot
    telemetry: Mapping[str, float] | None = None

    @property
    def at(self) -> float:
        return self.metrics.at

    def to_json(self) -> dict[str, Any]:
        return {"metrics": self.metrics.to_json(), "telemetry": dict(self.telemetry) if self.telemetry else None}

    @classmethod
    def from_json(cls, data: object) -> Reading:
        if not isinstance(data, Mapping):
            raise MetricsError("a reading of an unexpected shape")
        telemetry = data.get("telemetry")
        if telemetry is not None and not (
            isinstance(telemetry, Mapping) and all(isinstance(telemetry.get(k), (int, float)) for k in TELEMETRY_FIELDS)
        ):
            raise MetricsError("a reading whose telemetry has an unexpected shape")
        return cls(
            Snapshot.from_json(data.get("metrics")),
            {k: float(telemetry[k]) for k in TELEMETRY_FIELDS} if telemetry is not None else None,
        )


def sides(
    window: Window,
    canary_ranks: Sequence[int],
    telemetry: Mapping[str, float] | None,
    all_ranks: Iterable[int] = (),
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The canary's figures and the baseline's (every rank of ``window`` or ``all_ranks`` not in the canary)."""
    canary_set = set(canary_ranks)
    baseline_ranks = sorted((set(window.ranks()) | set(all_ranks)) - canary_set)
    canary = window.figures(canary_set)
    baseline = window.figures(baseline_ranks)
    if not baseline_ranks:
        baseline["notes"] = {name: "no data-parallel rank outside the canary" for name in baseline if name != "notes"}
    notes: dict[str, str] = canary["notes"]
    canary["telemetry"] = dict(telemetry) if telemetry is not None else None
    if telemetry is None:
        canary["patch_errors"] = None
        notes["patch_errors"] = TELEMETRY_OFF
        canary["errors"] = canary["failed_requests"]
        notes["errors"] = "failed requests only: " + TELEMETRY_OFF
    else:
        canary["patch_errors"] = telemetry["errors"]
        canary["errors"] = canary["failed_requests"] + telemetry["errors"]
    return canary, baseline


def judge(
    guards: Sequence[Guard],
    before: Reading | None,
    now: Reading,
    canary_ranks: Sequence[int],
    all_ranks: Iterable[int] = (),
) -> tuple[dict[str, Any], dict[str, Any], list[Verdict], float]:
    """Both sides' figures between two readings (since the engines started when ``before`` is None), each
    guard's verdict, and the window's length in seconds (NaN without ``before``)."""
    window = now.metrics.since(before.metrics if before is not None else None)
    telemetry = _telemetry_since(now.telemetry, before.telemetry if before is not None else None)
    canary, baseline = sides(window, canary_ranks, telemetry, all_ranks)
    return canary, baseline, evaluate(guards, canary, baseline), window.duration_s
