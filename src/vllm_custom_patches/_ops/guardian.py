"""The guardian: the API server that accepted a guarded rollout rolls the canary back when it breaks a guard.

Started by the endpoint after an accepted apply with guards (:func:`watch`),
it runs in that API server's event loop until the rollout is no longer
active. Every ``interval_s`` (``VLLM_CUSTOM_PATCHES_GUARD_INTERVAL``, default
:data:`DEFAULT_INTERVAL_S`) it takes a reading:

* vLLM's metrics, in process, as vLLM's ``/metrics`` route serves them
  (``vllm_metrics.read_local``: with several API servers, their sum);
* the server's status as ``GET /custom_patches`` has it (whether the rollout
  is still active, its ranks now, every engine rank, the patch's telemetry on
  the canary ranks);

and judges each guard on the figures since the guard's *mark*: the reading of
its last judgement that could be evaluated (at first, the rollout's start).

* ``ok``: the mark moves to this reading; a breach in progress ends;
* ``broken``: the mark moves to this reading; unless one is in progress, a
  breach begins at the judgement before this one (at the rollout's start for
  the first judgement);
* ``cannot_evaluate`` (no request finished on one side, no telemetry): nothing
  happens and the mark stays, so the next judgement covers this time too; it
  is logged (at most once a minute per guard). When no judgement could be
  made for a whole window, the mark moves up to the window's start and a
  breach in progress ends: it lacks evidence for that time.

So consecutive judgements cover time without gaps, and when one guard's
judgements have all been broken for at least ``window_s`` seconds, the guardian
rolls the canary back on all its ranks (``end``: ``rollouts.end_by_guard``,
all or nothing), logs why with the figures, and stops; the rollout's state
becomes ``rolled_back_by_guard`` with those figures. A breach shorter than the
window less two intervals never does (the judgements around it are ok). A
canary broken from its start is rolled back at the first judgement at least a
window after the start: within window + one interval.

A judgement compares the canary with the baseline over the same span: a
count guard such as ``errors==0`` is broken in a span with an error, so it
rolls back when errors go on for a whole window (one or more in every
interval); with ``window_s`` at most the interval, the first error does.

If the rollback is refused (the report says not ``ok``) or fails, the guardian
logs it and starts over: another whole window of breach tries again.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .._core.log import logger
from .._env import ENV_GUARD_INTERVAL
from .figures import Reading, judge, telemetry_of
from .guards import Guard, Verdict, parse_guards
from .vllm_metrics import MetricsError, parse, read_local

__all__ = ["DEFAULT_INTERVAL_S", "Guardian", "guard_interval", "watch", "watching"]

DEFAULT_INTERVAL_S = 5.0
DEFAULT_WINDOW_S = 60.0
"""A record without a usable ``window_s`` (the rollout module gives guarded rollouts one)."""
LOG_EVERY_S = 60.0
"""At most one 'cannot evaluate' line per guard in this many seconds."""
_NEEDS_TELEMETRY = frozenset({"errors", "patch_errors"})

Clock = Callable[[], float]
ReadStatus = Callable[[], Awaitable[Mapping[str, Any]]]
End = Callable[..., Awaitable[Mapping[str, Any]]]

_watching: dict[str, Guardian] = {}
_tasks: set[asyncio.Task[None]] = set()


def guard_interval(environ: Mapping[str, str] = os.environ) -> float:
    """``VLLM_CUSTOM_PATCHES_GUARD_INTERVAL`` in seconds (default 5; an unusable value is logged and ignored)."""
    raw = environ.get(ENV_GUARD_INTERVAL, "").strip()
    if not raw:
        return DEFAULT_INTERVAL_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not 0.05 <= value <= 3600:
        logger.warning(
            "vllm-custom-patches: %s=%r is not a number of seconds between 0.05 and 3600; the guards are judged "
            "every %g s",
            ENV_GUARD_INTERVAL, raw, DEFAULT_INTERVAL_S,
        )  # fmt: skip
        return DEFAULT_INTERVAL_S
    return value


@dataclass
class _Track:
    """One guard's state: where its next judgement's data begins, and the breach in progress."""

    guard: Guard
    mark: Reading
    breach_since: float | None = None
    verdict: Verdict | None = None
    span_s: float = 0.0
    logged_at: float = -math.inf
    figures: tuple[Mapping[str, Any], Mapping[str, Any]] = field(default_factory=lambda: ({}, {}))

    def view(self) -> dict[str, Any]:
        shown: dict[str, Any] = (
            self.verdict.as_dict()
            if self.verdict
            else {"guard": self.guard.text, "verdict": "pending", "why": "not judged yet"}
        )
        shown["span_s"] = round(self.span_s, 3)
        shown["breach_since"] = self.breach_since
        return shown


def _ranks_of(status: Mapping[str, Any]) -> list[int]:
    return sorted(
        {
            p["dp_rank"]
            for p in status.get("processes", [])
            if p.get("role") == "engine_core" and isinstance(p.get("dp_rank"), int)
        }
    )


class Guardian:
    """A guarded rollout's judge; :meth:`step` takes one reading and judges every guard (see the module)."""

    def __init__(
        self,
        rollout: Mapping[str, Any],
        *,
        read_status: ReadStatus,
        read_metrics: Callable[[], str],
        end: Callable[[str, Mapping[str, Any], str], Awaitable[Mapping[str, Any]]],
        clock: Clock = time.time,
    ) -> None:
        self.id = str(rollout["id"])
        self.patch = str(rollout["patch"])
        self.guards = parse_guards(rollout.get("guards") or [])
        window = rollout.get("window_s")
        self.window_s = float(window) if isinstance(window, (int, float)) and window > 0 else DEFAULT_WINDOW_S
        self.dp_ranks: list[int] = sorted(rollout["dp_ranks"])
        self._read_status = read_status
        self._read_metrics = read_metrics
        self._end = end
        self._clock = clock
        self._needs_telemetry = any(g.figure in _NEEDS_TELEMETRY for g in self.guards)
        self._tracks: list[_Track] = []
        self._readings: list[Reading] = []
        self._all_ranks: list[int] = []
        self.judged_at: float | None = None
        self._judged_before: float | None = None
        self.start = rollout.get("at_start")
        """The rollout's reading at its start, when its record keeps one (JSON); else the guardian's first."""

    def view(self) -> dict[str, Any]:
        """What the guardian sees now: each guard's last verdict, its span and the breach in progress."""
        return {
            "rollout": self.id,
            "patch": self.patch,
            "window_s": self.window_s,
            "judged_at": self.judged_at,
            "guards": [track.view() for track in self._tracks],
        }

    async def _read(self) -> tuple[Mapping[str, Any], Reading] | None:
        """The status and a reading now; None (logged) when either cannot be read."""
        at = self._clock()
        try:
            status = await self._read_status()
            text = await asyncio.to_thread(self._read_metrics)
            metrics = parse(text, at)
        except asyncio.CancelledError:
            raise
        except MetricsError as exc:
            logger.warning("vllm-custom-patches guard of %s: vLLM's metrics cannot be read: %s", self.patch, exc)
            return None
        except Exception as exc:
            logger.warning(
                "vllm-custom-patches guard of %s: reading the server failed (%s: %s); judging again in the next interval",
                self.patch, type(exc).__name__, exc,
            )  # fmt: skip
            return None
        telemetry = (
            telemetry_of(status.get("processes", []), self.patch, self.dp_ranks) if self._needs_telemetry else None
        )
        return status, Reading(metrics, telemetry)

    def _still_active(self, status: Mapping[str, Any]) -> bool:
        record = next(
            (r for r in status.get("rollouts", []) if isinstance(r, Mapping) and r.get("id") == self.id), None
        )
        if record is None or record.get("state") != "active":
            state = "no longer known" if record is None else f"now {record.get('state')}"
            logger.info(
                "vllm-custom-patches guard of %s: the rollout %s is %s; the guard stops", self.patch, self.id, state
            )
            return False
        ranks = record.get("dp_ranks")
        if isinstance(ranks, list) and ranks and ranks != self.dp_ranks:
            self.dp_ranks = sorted(ranks)  # a rollback of some ranks shrinks the canary
        return True

    async def begin(self) -> bool:
        """The first reading (the rollout's start); False when the rollout is not active."""
        first = await self._read()
        if first is None:
            return True  # the next step tries again
        status, reading = first
        if not self._still_active(status):
            return False
        start = reading
        if self.start is not None:
            try:
                start = Reading.from_json(self.start)
            except MetricsError:
                logger.warning("vllm-custom-patches guard of %s: the rollout's start reading is unreadable", self.patch)
        self._start_with(start, status)
        if start is not reading:
            self._readings.append(reading)
        return True

    def _start_with(self, start: Reading, status: Mapping[str, Any]) -> None:
        self._readings = [start]
        self._tracks = [_Track(guard, start) for guard in self.guards]
        self._all_ranks = _ranks_of(status)

    async def step(self) -> bool:
        """One reading and a judgement of every guard; False once the guardian is done (rolled back, or ended)."""
        if not self._tracks:
            return await self.begin()
        got = await self._read()
        if got is None:
            return True
        status, reading = got
        if not self._still_active(status):
            return False
        self._all_ranks = _ranks_of(status) or self._all_ranks
        self._readings.append(reading)
        now = reading.at
        self._judged_before, self.judged_at = self.judged_at, now
        due = [track for track in self._tracks if self._judge(track, reading, now)]
        oldest = min(track.mark.at for track in self._tracks)
        self._readings = [r for r in self._readings if r.at >= oldest]
        if not due:
            return True
        return not await self._roll_back(due, now)

    def _judge(self, track: _Track, reading: Reading, now: float) -> bool:
        """Judge one guard on the data since its mark; True when its breach now covers a whole window."""
        canary, baseline, (verdict,), span = judge([track.guard], track.mark, reading, self.dp_ranks, self._all_ranks)
        previous = track.verdict.verdict if track.verdict else None
        track.verdict, track.span_s, track.figures = verdict, span, (canary, baseline)
        if verdict.verdict == "cannot_evaluate":
            if now - track.mark.at > self.window_s:
                # No judgement for a whole window: start again from the window's start, without the breach.
                track.mark = next(r for r in self._readings if r.at >= now - self.window_s)
                track.breach_since = None
            if previous != "cannot_evaluate" or now - track.logged_at >= LOG_EVERY_S:
                track.logged_at = now
                logger.info(
                    "vllm-custom-patches guard %s of %s: cannot evaluate (%s); nothing done",
                    track.guard.text, self.patch, verdict.why,
                )  # fmt: skip
            return False
        if verdict.verdict == "ok":
            if track.breach_since is not None:
                logger.info(
                    "vllm-custom-patches guard %s of %s: holds again after %.1f s (%s)",
                    track.guard.text, self.patch, now - track.breach_since, verdict.why,
                )  # fmt: skip
            track.breach_since = None
        elif track.breach_since is None:
            # From the judgement before (the start, for the first): not from a mark that waited on data.
            track.breach_since = self._judged_before if self._judged_before is not None else track.mark.at
            logger.warning(
                "vllm-custom-patches guard %s of %s: broken (%s); the canary is rolled back if it stays so for "
                "%g s",
                track.guard.text, self.patch, verdict.why, self.window_s,
            )  # fmt: skip
        track.mark = reading
        return track.breach_since is not None and now - track.breach_since >= self.window_s

    async def _roll_back(self, due: Sequence[_Track], now: float) -> bool:
        """End the rollout by the guard; True when done (the report says ``ok``)."""
        first = due[0]
        canary, baseline = first.figures
        figures = {
            "judged_at": now,
            "window_s": self.window_s,
            "broken": [{**track.view(), "broken_for_s": round(_breach_s(track, now), 3)} for track in due],
            "guards": [track.view() for track in self._tracks],
            "canary": _without_notes(canary),
            "baseline": _without_notes(baseline),
        }
        reason = "; ".join(
            f"{track.guard.text} broken for {_breach_s(track, now):.1f} s (window {self.window_s:g} s): "
            f"{track.verdict.why if track.verdict else ''}"
            for track in due
        )
        logger.warning(
            "vllm-custom-patches guard: rolling back the canary of %s on dp ranks %s (rollout %s): %s",
            self.patch, self.dp_ranks, self.id, reason,
        )  # fmt: skip
        try:
            report = await self._end(self.patch, figures, reason)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            report = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        if report.get("ok"):
            logger.warning(
                "vllm-custom-patches guard: the canary of %s is rolled back on dp ranks %s (rollout %s, "
                "rolled_back_by_guard)",
                self.patch, self.dp_ranks, self.id,
            )  # fmt: skip
            return True
        logger.error(
            "vllm-custom-patches guard: rolling back the canary of %s failed (%s); the guard starts over and tries "
            "again after another window of breach",
            self.patch, report.get("error") or report.get("outcome") or "refused",
        )  # fmt: skip
        for track in due:
            track.breach_since = None
        return False


def _breach_s(track: _Track, now: float) -> float:
    return 0.0 if track.breach_since is None else now - track.breach_since


def _without_notes(figures: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in figures.items() if k != "notes"}


def _collector(engine_client: Any) -> ReadStatus:
    from .fleet import collect

    async def collected() -> Mapping[str, Any]:
        return await collect(engine_client)

    return collected


def watching() -> dict[str, dict[str, Any]]:
    """Every rollout this API server guards now -> what its guardian sees (``Guardian.view``)."""
    return {key: guardian.view() for key, guardian in list(_watching.items())}


def watch(
    engine_client: Any,
    rollout: Mapping[str, Any],
    *,
    end: End,
    read_metrics: Callable[[], str] | None = None,
    interval_s: float | None = None,
    read_status: ReadStatus | None = None,
    clock: Clock = time.time,
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
) -> asyncio.Task[None]:
    """Guard ``rollout`` (a record with ``guards``) from this API server until it is no longer active.

    ``end(engine_client, patch, figures, reason)`` rolls the canary back (``rollouts.end_by_guard``);
    ``read_metrics`` gives vLLM's metrics text (default: in process, as ``/metrics`` serves it);
    ``read_status`` the server's status (default: collected as ``GET /custom_patches`` does);
    ``clock`` and ``sleep`` are the guardian's time, injectable for tests.
    """
    if read_status is None:
        read_status = _collector(engine_client)

    async def ended(patch: str, figures: Mapping[str, Any], reason: str) -> Mapping[str, Any]:
        return await end(engine_client, patch, figures, reason)

    guardian = Guardian(
        rollout, read_status=read_status, read_metrics=read_metrics or read_local, end=ended, clock=clock
    )
    every = guard_interval() if interval_s is None else interval_s

    async def run() -> None:
        _watching[guardian.id] = guardian
        logger.info(
            "vllm-custom-patches guard of %s (rollout %s, dp ranks %s): %s over %g s windows, judged every %g s",
            guardian.patch, guardian.id, guardian.dp_ranks, ", ".join(g.text for g in guardian.guards),
            guardian.window_s, every,
        )  # fmt: skip
        try:
            keep = await guardian.begin()
            while keep:
                await sleep(every)
                keep = await guardian.step()
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.error("vllm-custom-patches guard of %s stopped on an error", guardian.patch, exc_info=True)
        finally:
            if _watching.get(guardian.id) is guardian:
                del _watching[guardian.id]

    task = asyncio.get_running_loop().create_task(run(), name=f"vllm-custom-patches guard {guardian.id}")
    # The loop keeps only a weak reference to a task: this one must live until it is done.
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)
    return task
