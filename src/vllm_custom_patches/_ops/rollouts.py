"""Rollouts: a patch on chosen data-parallel ranks (a canary), and the record every API server of the server reads.

Interface (what the endpoint, ``_fleet``, ``_switch`` and the guards use):

* a rollout record is a JSON-ready dict: ``id`` (12 hex digits), ``patch``, ``dp_ranks`` (the canary's
  ranks now: a rollback of some of them shrinks it), ``since`` and ``ended`` (Unix seconds; ``ended``
  None while active), ``requester`` (the client's address), ``reason``, ``guards`` (their canonical
  texts, ``_guards``), ``window_s`` (None without guards), ``state`` (one of :data:`STATES`),
  ``ended_by``, ``end_reason``, ``figures`` (what the guard saw when it rolled the canary back, else
  None), ``at_start`` (vLLM's metrics and the patch's telemetry read by the accepting API server just
  before the canary was applied, ``_figures.Reading`` as JSON, or None: what ``compare`` and the
  guards measure the rollout's life from) and ``revision`` (raised by each change of the record);
* :func:`active_rollout` finds a patch's active rollout in a list of records; :func:`declared` is what
  ``_fleet.analyse`` accepts as an intended divergence (each active rollout's patch on its ranks only);
* :func:`check_dp_ranks` and :func:`check_window` check a control request's fields (``ValueError``
  with a one-line message naming the fix);
* the changes are made in the API server by ``_switch``: ``control`` (apply, rollback, promote, with or
  without ``dp_ranks``), ``end_by_guard(engine_client, name, figures, reason)`` (how a guard rolls a
  canary back: all or nothing across its ranks, state ``rolled_back_by_guard`` with the figures) and
  ``rollouts_now(engine_client)`` (every rollout, read from the engine cores).

Where the record lives: ``vllm serve --data-parallel-size N`` starts several API servers on one port,
each its own process, and a client reaches any of them; every API server reaches every engine core.
So each engine core keeps a copy of every rollout (:func:`keep`, run by the engine core's
``vllm_custom_patches_rollouts`` utility method, ``_agent``), written by a step the API server signed
with the control token (``_auth.sign_with_payload``, as the kill switch's steps are), and the status
collection reads the copies back: :func:`merge` keeps the latest revision of each.  An engine core
refuses to begin a rollout of a patch that already has an active one there, so two API servers cannot
start two canaries of one patch at once.  Records stay for the life of the server: every active one,
and the latest :data:`MAX_KEPT` ended ones (without their start reading).

The API server itself is not a data-parallel rank: a canary changes the engine cores and workers of
its ranks only, never an API server (a patch of the API server's own classes would serve every rank's
requests at once; promote applies it there too).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .._core.forksafe import ForkSafeLock
from .._core.log import logger
from .auth import Replays, verify

__all__ = [
    "ACTIVE", "BEGIN", "DEFAULT_WINDOW_S", "DISCARDED", "MAX_KEPT", "PROMOTED", "PUT", "ROLLED_BACK",
    "ROLLED_BACK_BY_GUARD", "STATES", "active_rollout", "check_dp_ranks", "check_window", "declared", "describe",
    "ended", "keep", "kept", "merge", "new_record", "revised",
]  # fmt: skip

ACTIVE = "active"
PROMOTED = "promoted"
ROLLED_BACK = "rolled_back"
ROLLED_BACK_BY_GUARD = "rolled_back_by_guard"
STATES = (ACTIVE, PROMOTED, ROLLED_BACK, ROLLED_BACK_BY_GUARD)
"""What the status route shows; a rollout is active until promoted or rolled back (by a person or a guard)."""
DISCARDED = "discarded"
"""A rollout whose canary was refused: kept in the engine cores (so a late copy cannot revive it), never shown."""

BEGIN = "rollout-begin"
PUT = "rollout-put"
"""The two signed steps an engine core runs: begin a rollout (refused if its patch has an active one), store a revision."""

DEFAULT_WINDOW_S = 60.0
"""How long a guard must be broken before it rolls the canary back, when the request gives guards and no window."""
MAX_WINDOW_S = 86400.0
MAX_KEPT = 100
"""How many ended rollouts each engine core keeps (every active one is kept): each status collection
carries the records from every engine core."""


def new_record(
    patch: str,
    dp_ranks: Sequence[int],
    requester: str,
    *,
    reason: str = "",
    guards: Sequence[str] = (),
    window_s: float | None = None,
    at_start: Mapping[str, Any] | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    """A new active rollout of ``patch`` on ``dp_ranks``; ``at_start``: the metrics read as it began (``_figures``)."""
    return {
        "id": uuid.uuid4().hex[:12],
        "patch": patch,
        "dp_ranks": sorted(dp_ranks),
        "since": round(time.time() if now is None else now, 3),
        "requester": requester,
        "reason": reason,
        "guards": list(guards),
        "window_s": (window_s if window_s is not None else DEFAULT_WINDOW_S) if guards else None,
        "state": ACTIVE,
        "ended": None,
        "ended_by": None,
        "end_reason": "",
        "figures": None,
        "at_start": dict(at_start) if at_start is not None else None,
        "revision": 1,
    }


def revised(record: Mapping[str, Any], **changes: Any) -> dict[str, Any]:
    """``record`` with ``changes``, as its next revision."""
    return {**record, **changes, "revision": int(record["revision"]) + 1}


def ended(
    record: Mapping[str, Any],
    state: str,
    by: str,
    *,
    reason: str = "",
    figures: Mapping[str, Any] | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    """``record`` ended in ``state`` (promoted, rolled back) by ``by``; its start reading, which only an active
    rollout's comparisons need, is dropped (each status collection carries every record)."""
    if state not in STATES[1:] and state != DISCARDED:
        raise ValueError(f"a rollout ends promoted or rolled back, not {state!r}")
    return revised(
        record,
        state=state,
        ended=round(time.time() if now is None else now, 3),
        ended_by=by,
        end_reason=reason,
        figures=dict(figures) if figures is not None else record.get("figures"),
        at_start=None,
    )


def active_rollout(rollouts: Iterable[Mapping[str, Any]], patch: str) -> dict[str, Any] | None:
    """The active rollout of ``patch`` among ``rollouts``, or None."""
    return next((dict(r) for r in rollouts if r.get("patch") == patch and r.get("state") == ACTIVE), None)


def declared(rollouts: Iterable[Mapping[str, Any]]) -> dict[str, tuple[frozenset[int], str]]:
    """Each patch with an active rollout -> (its canary's ranks, the rollout's id): a divergence declared on purpose."""
    return {
        str(r["patch"]): (frozenset(int(rank) for rank in r["dp_ranks"]), str(r["id"]))
        for r in rollouts
        if r.get("state") == ACTIVE
    }


def describe(record: Mapping[str, Any]) -> str:
    """``rollout 3f2a... of shortest_prompt_first on dp ranks [1]`` (for messages)."""
    return f"rollout {record.get('id')} of {record.get('patch')} on dp ranks {list(record.get('dp_ranks') or [])}"


def merge(copies: Iterable[Iterable[Any]]) -> list[dict[str, Any]]:
    """One list from the engine cores' copies: the latest revision of each rollout, oldest rollout first.

    An engine core that missed a revision (it did not answer then) does not hide it: another's copy
    is newer.  Discarded rollouts are left out; so is anything that is not a record.
    """
    latest: dict[str, dict[str, Any]] = {}
    for copy in copies:
        for record in copy:
            if not _is_record(record):
                continue
            known = latest.get(record["id"])
            if known is None or known["revision"] < record["revision"]:
                latest[record["id"]] = dict(record)
    shown = [r for r in latest.values() if r["state"] != DISCARDED]
    return sorted(shown, key=lambda r: (r.get("since") or 0, r["id"]))


def _is_record(record: Any) -> bool:
    return (
        isinstance(record, Mapping)
        and isinstance(record.get("id"), str)
        and isinstance(record.get("patch"), str)
        and isinstance(record.get("revision"), int)
        and record.get("state") in (*STATES, DISCARDED)
        and isinstance(record.get("dp_ranks"), list)
        and all(isinstance(rank, int) and not isinstance(rank, bool) for rank in record["dp_ranks"])
    )


# -- a control request's fields --------------------------------------------------------------


def check_dp_ranks(value: Any) -> list[int]:
    """``dp_ranks`` of a control request: a non-empty list of distinct non-negative integers; ``ValueError`` if not."""
    example = 'e.g. {"dp_ranks": [1]} or [1, 3]'
    if not isinstance(value, list) or not value:
        what = "an empty list" if isinstance(value, list) else type(value).__name__
        raise ValueError(f"'dp_ranks' must be a non-empty list of data-parallel ranks, {example}; got {what}")
    bad = [rank for rank in value if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0]
    if bad:
        raise ValueError(f"'dp_ranks' must hold non-negative integers, {example}; got {json.dumps(bad[0])[:40]}")
    repeated = sorted({rank for rank in value if value.count(rank) > 1})
    if repeated:
        raise ValueError(f"'dp_ranks' names rank(s) {repeated} more than once; name each rank once")
    return sorted(value)


def check_window(value: Any) -> float:
    """``window_s`` of a control request: seconds, above 0 and at most a day; ``ValueError`` if not."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_WINDOW_S:
        raise ValueError(
            f"'window_s' must be a number of seconds above 0 and at most {MAX_WINDOW_S:.0f}, e.g. 60; "
            f"got {json.dumps(value)[:40]}"
        )
    return float(value)


# -- an engine core's copy -----------------------------------------------------------------

_lock = ForkSafeLock()  # a forked child must not find it held by a thread it lacks
_kept: dict[str, dict[str, Any]] = {}
_replays = Replays()


def kept() -> list[dict[str, Any]]:
    """This process's copy of every rollout (an engine core's; empty elsewhere)."""
    with _lock:
        return [dict(record) for record in _kept.values()]


def keep(args: tuple[Any, ...], scope: str) -> dict[str, Any]:
    """Run one signed step (:data:`BEGIN` or :data:`PUT` of a record) if it is authentic; never raises.

    Answers ``ok``, ``error``, ``conflict`` (the active rollout that refused a begin) and ``rollouts``
    (this copy, after the step).
    """
    problem = verify(args, scope, _replays, with_payload=True)
    if problem is not None:
        logger.warning(
            "vllm-custom-patches [pid %d]: rollout record refused, nothing changed: %s; arguments %s",
            os.getpid(), problem, ascii(tuple(args[:4]))[:300],
        )  # fmt: skip
        return {"ok": False, "error": f"refused: {problem}", "conflict": None, "rollouts": kept()}
    action, payload = str(args[0]), str(args[6])
    try:
        record = json.loads(payload)
    except ValueError:
        record = None
    if action not in (BEGIN, PUT) or not _is_record(record):
        return {"ok": False, "error": f"not a rollout step: {action!r}", "conflict": None, "rollouts": kept()}
    with _lock:
        if action == BEGIN:
            other = active_rollout(_kept.values(), record["patch"])
            if other is not None and other["id"] != record["id"]:
                return {"ok": False, "error": f"{describe(other)} is active", "conflict": other,
                        "rollouts": [dict(r) for r in _kept.values()]}  # fmt: skip
        known = _kept.get(record["id"])
        if known is None or known["revision"] < record["revision"]:
            _kept[record["id"]] = record
            _trim()
        return {"ok": True, "error": None, "conflict": None, "rollouts": [dict(r) for r in _kept.values()]}


def _trim() -> None:
    # Oldest by when they ended (not by when this copy got them: a late copy must not push out newer ones).
    finished = sorted(
        (key for key, record in _kept.items() if record["state"] != ACTIVE),
        key=lambda key: (_kept[key].get("ended") or 0, _kept[key].get("since") or 0),
    )
    for key in finished[: max(0, len(finished) - MAX_KEPT)]:
        del _kept[key]
