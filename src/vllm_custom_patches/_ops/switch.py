"""The kill switch across a running server: one patch rolled back (or applied) in every process, or in none.

Runs in the API server, for the endpoint's control routes.  The change is
made in this process, then in every engine core and, through each engine
core, in its workers (``_agent``, ``_control``), each step signed with the
control token (``_auth``).  If any process fails (a conflict, an outside
change to the class, a process that does not answer), every process is asked
to undo the operation, so the server is left as it was, and the answer lists
every process's result and reason.

Three outcomes (``report["outcome"]``): ``done`` everywhere; ``refused``, and
every process was put back; ``inconsistent``: refused, and some process could
not be put back (its undo failed, or it answered neither the change nor the
undo), so the patch may be in effect in some processes and not in others.
The last is remembered (``_unsettled``: shared by the server's API servers)
until a later operation on that patch is done everywhere, and the status
route of every API server shows it (:func:`note_unsettled`).

With ``dp_ranks`` the change is made only in the engine cores of those
data-parallel ranks and, through them, their workers (a canary), all or
nothing across them in the same way; the API server itself is left as it is
(it is no rank).  :func:`control` is what the endpoint runs: it keeps the
rollout records (``_rollouts``) in step with the changes, and refuses what
would make a divergence nobody declared.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from . import rollouts as _rollouts
from .agent import CONTROL_METHOD, ROLLOUTS_METHOD, control_record, unreachable_record
from .auth import sign, sign_with_payload
from .fleet import ENGINE_TIMEOUT_S, call_engine_cores, describe_process, engine_failure
from .unsettled import Unsettled

__all__ = [
    "HTTP_STATUS", "change", "control", "end_by_guard", "known_patches", "note_unsettled", "one_at_a_time",
    "rollouts_now", "share_unsettled", "summary",
]  # fmt: skip

HTTP_STATUS = {"done": 200, "refused": 409, "inconsistent": 500}
"""The control route's HTTP status for each outcome."""

_RANKS = ("dp_rank", "tp_rank", "pp_rank")

# patch -> what the last inconsistent operation on it left: this process's memory until the
# endpoint shares it with the server's other API servers (share_unsettled).
_record = Unsettled()


def share_unsettled(epoch_path: Path | None) -> None:
    """Keep what inconsistent outcomes left beside the server's change epoch, for every API server to show."""
    global _record
    _record = Unsettled.beside(epoch_path)


def known_patches() -> list[str]:
    """Names a control request may use: every patch loaded in this process, and every entry point."""
    from .._core.manager import PatchManager
    from .._runtime.discovery import find_entry_points

    return sorted(set(PatchManager.names()) | set(find_entry_points()))


async def change(
    engine_client: Any,
    action: str,
    name: str,
    who: str,
    timeout: float = ENGINE_TIMEOUT_S,
    dp_ranks: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Do ``action`` (``rollback`` or ``apply``) on patch ``name`` in every process (in the engine cores and
    workers of ``dp_ranks`` only, if given); undo it in all of them on any failure."""
    op_id = uuid.uuid4().hex[:12]
    started = time.monotonic()
    records = await _everywhere(engine_client, sign(action, name, op_id, who), timeout, dp_ranks)
    ok = bool(records) and all(record["ok"] for record in records)
    report: dict[str, Any] = {"ok": ok, "outcome": "done", "action": action, "patch": name, "op_id": op_id}
    if dp_ranks is not None:
        report["dp_ranks"] = sorted(dp_ranks)
    if not ok:
        undone = await _everywhere(engine_client, sign("undo", name, op_id, who), timeout, dp_ranks)
        records, unsettled = _settle(records, undone)
        report["outcome"] = "inconsistent" if unsettled else "refused"
        report["undo_failed"] = [
            {**{key: r.get(key) for key in ("role", *_RANKS, "pid", "host")}, "description": describe_process(r),
             "error": r.get("undo_error")}
            for r in unsettled
        ]  # fmt: skip
    report["elapsed_s"] = round(time.monotonic() - started, 4)
    report["processes"] = records
    _remember(report)
    return report


async def _everywhere(
    engine_client: Any, signed: tuple[str, ...], timeout: float, dp_ranks: Sequence[int] | None = None
) -> list[dict[str, Any]]:
    # The API server is no data-parallel rank: a change on chosen ranks leaves it alone.
    records = [control_record(signed, "api_server")] if dp_ranks is None else []
    if engine_client is None:
        return records
    for dp_rank, answer in await call_engine_cores(engine_client, CONTROL_METHOD, signed, timeout, dp_ranks):
        if isinstance(answer, BaseException):
            record = _failed(unreachable_record("engine_core", engine_failure(answer), dp_rank=dp_rank))
            # An error answer (the method missing or failing, the engine dead) means the call ran
            # nowhere: the engine core's step never raises.  No answer in time means it may yet run.
            record["ran"] = None if isinstance(answer, asyncio.TimeoutError) else False
            records.append(record)
        else:
            records.extend(answer)
    return records


def _failed(record: dict[str, Any]) -> dict[str, Any]:
    return {**record, "ok": False, "changed": False, "relevant": True, "state": "unknown"}


def _same_process(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    # By role and ranks: a process that did not answer has no pid or host, and a
    # rank not known on one side (an engine core's, before it answered) matches any.
    return a["role"] == b["role"] and all(a.get(k) is None or b.get(k) is None or a.get(k) == b.get(k) for k in _RANKS)


def _covers(silent: Mapping[str, Any], record: Mapping[str, Any]) -> bool:
    """An engine core that did not answer stands for its workers too: they were not reached."""
    return record["role"] in ("engine_core", "worker") and (
        silent.get("dp_rank") is None or record.get("dp_rank") is None or silent["dp_rank"] == record["dp_rank"]
    )


def _settle(
    records: list[dict[str, Any]], undone: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Match each process's answer to the change with its answer to the undo.

    Returns every process's record (``reverted``, ``undo_error``, the state
    after the undo) and those not known to be as before the operation: ones
    that changed and were not put back, and ones that answered neither.
    """
    silent = [r for r in undone if r["role"] == "engine_core" and r.get("pid") is None]
    answers = [r for r in undone if not (r["role"] == "engine_core" and r.get("pid") is None)]
    unsettled: list[dict[str, Any]] = []
    for record in records:
        index = next((i for i, after in enumerate(answers) if _same_process(record, after)), None)
        after = answers.pop(index) if index is not None else next((s for s in silent if _covers(s, record)), None)
        record["reverted"] = bool(after and after.get("undone"))
        if after is not None and after.get("state"):
            record["state"] = after["state"]
        if after is not None and not after["ok"]:
            record["undo_error"] = after.get("error")
        # It said it changed nothing, or its call failed before running (``ran`` false, see
        # _everywhere; null: it did not answer in time, and may yet have run).
        answered = record.get("pid") is not None or record.get("ran") is False
        if answered and not record.get("changed"):
            continue  # nothing to put back
        if after is None:
            record["undo_error"] = "no answer to the undo"
        if after is None or not after["ok"]:
            unsettled.append(record)
    for after in answers:
        # Answered the undo only: its answer to the change was lost with its engine core's.
        record = {**after, "ok": False, "changed": None, "error": "no answer to the change",
                  "reverted": bool(after.get("undone"))}  # fmt: skip
        if not after["ok"]:
            record["undo_error"] = after.get("error")
            unsettled.append(record)
        records.append(record)
    return records, unsettled


def _remember(report: Mapping[str, Any]) -> None:
    if report["outcome"] == "done":
        _record.settle(report["patch"])
    elif report["outcome"] == "inconsistent":
        _record.note(report["patch"], {
            "patch": report["patch"],
            "op_id": report["op_id"],
            "action": report["action"],
            "processes": [p["description"] for p in report["undo_failed"]],
        })  # fmt: skip


def note_unsettled(status: dict[str, Any]) -> dict[str, Any]:
    """Add to a status report (``_fleet.collect``) what failed undos left; the server is then not consistent.

    A patch's processes can disagree across roles (the API server rolled back,
    an engine core not), which comparing each role with itself does not show.
    """
    unsettled = _record.entries()
    status["unsettled"] = unsettled
    if unsettled:
        status["consistent"] = False
    return status


def summary(report: Mapping[str, Any]) -> str:
    """One line for the log: what, whether it happened, where."""
    if report.get("error") and not report["processes"]:
        return f"{report['action']} of patch {report['patch']!r}: REFUSED, nothing changed: {report['error']}"
    changed = [r for r in report["processes"] if r.get("changed")]
    failed = [r for r in report["processes"] if not r["ok"]]
    verdict = {
        "done": "done",
        "refused": "REFUSED, undone everywhere",
        "inconsistent": "INCONSISTENT, NOT undone everywhere",
    }
    text = (
        f"{report['action']} of patch {report['patch']!r} (op {report['op_id']}): "
        f"{verdict[report['outcome']]} in {report['elapsed_s'] * 1000:.0f} ms; "
        f"changed in {len(changed)} of {len(report['processes'])} processes"
    )
    reasons = "; ".join(f"{describe_process(r)}: {r.get('error')}" for r in failed)
    stuck = ", ".join(f"{p['description']} ({p['error']})" for p in report.get("undo_failed", []))
    text += (f"; failed: {reasons}" if reasons else "") + (f"; NOT put back in: {stuck}" if stuck else "")
    if report.get("error"):
        text += f"; {report['error']}"
    rollout = report.get("rollout")
    if rollout:
        text += f"; {_rollouts.describe(rollout)}: {rollout['state']}"
    return text


# -- canaries: a patch on chosen data-parallel ranks, and its rollout record ----------------------

_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = weakref.WeakKeyDictionary()


def one_at_a_time() -> asyncio.Lock:
    """The lock that makes this API server's changes one at a time (control routes and guards alike).

    One per event loop: an asyncio lock belongs to the loop that first waits on it.
    """
    loop = asyncio.get_running_loop()
    lock = _locks.get(loop)
    if lock is None:
        lock = _locks[loop] = asyncio.Lock()
    return lock


async def rollouts_now(engine_client: Any, timeout: float = ENGINE_TIMEOUT_S) -> list[dict[str, Any]]:
    """Every rollout of the server's life, from the engine cores' copies (one that does not answer is skipped).

    An engine core whose copy lacks a revision the others have (it did not answer when it was written)
    is given it now, before it can matter there (a stale active copy would refuse the patch's next canary).
    """
    if engine_client is None:
        return []
    answers = await call_engine_cores(engine_client, ROLLOUTS_METHOD, (), timeout)
    copies = {rank: answer.get("rollouts") or [] for rank, answer in answers if isinstance(answer, dict)}
    latest = _rollouts.merge(copies.values())
    for rank, copy in copies.items():
        have = {r.get("id"): r.get("revision") for r in copy if isinstance(r, Mapping)}
        for record in latest:
            if rank is not None and have.get(record["id"]) != record["revision"]:
                await _store(engine_client, _rollouts.PUT, record, timeout, [rank])
    return latest


async def _store(
    engine_client: Any, step: str, record: Mapping[str, Any], timeout: float, dp_ranks: Sequence[int] | None = None
) -> list[dict[str, Any]]:
    """Give every engine core (or those of ``dp_ranks``) ``record`` (a signed ``step``); the answers of those
    that answered."""
    signed = sign_with_payload(step, str(record["patch"]), uuid.uuid4().hex[:12], str(record["requester"]),
                               json.dumps(record, separators=(",", ":")))  # fmt: skip
    answers = await call_engine_cores(engine_client, ROLLOUTS_METHOD, signed, timeout, dp_ranks)
    failed = [
        f"dp_rank={rank}: {engine_failure(answer) if isinstance(answer, BaseException) else answer.get('error')}"
        for rank, answer in answers
        if isinstance(answer, BaseException) or not (answer.get("ok") or answer.get("conflict"))
    ]
    if failed:  # the others' copies still tell every API server; this says which engine core lacks it
        from .._core.log import logger

        logger.warning(
            "vllm-custom-patches: %s (revision %s, %s) not kept by engine core(s) %s",
            _rollouts.describe(record), record["revision"], record["state"], "; ".join(failed),
        )  # fmt: skip
    return [answer for _, answer in answers if isinstance(answer, dict)]


def _refused(action: str, name: str, error: str, **extra: Any) -> dict[str, Any]:
    """A control report for a request refused before anything was changed (HTTP 409)."""
    return {"ok": False, "outcome": "refused", "action": action, "patch": name, "op_id": None, "elapsed_s": 0.0,
            "processes": [], "error": error, **extra}  # fmt: skip


async def control(
    engine_client: Any,
    action: str,
    name: str,
    requester: str,
    *,
    reason: str = "",
    dp_ranks: Sequence[int] | None = None,
    guards: Sequence[str] = (),
    window_s: float | None = None,
    start_reading: Callable[[], Awaitable[Mapping[str, Any] | None]] | None = None,
    timeout: float = ENGINE_TIMEOUT_S,
) -> dict[str, Any]:
    """What a control route does: ``apply``, ``rollback`` or ``promote`` of ``name``, and its rollout record.

    * ``apply`` with ``dp_ranks``: a canary, a new active rollout (refused while ``name`` has one);
      without: the kill switch's apply everywhere (refused while ``name`` has an active rollout:
      promote it);
    * ``rollback`` without ``dp_ranks``: everywhere, and it ends an active rollout ``rolled_back``;
      with ``dp_ranks``: only during an active rollout of ``name``, on some of its ranks (the canary
      shrinks to the others; it ends ``rolled_back`` when none is left);
    * ``promote``: apply everywhere, and the active rollout ends ``promoted``.

    The caller checked the request's fields (ranks that exist, parsed guards).  The record changes only
    when the change was done everywhere it was asked.  ``start_reading``, if given, is awaited just
    before a canary is applied: the record keeps what it gives as ``at_start``.
    """
    who = requester + (f" ({reason})" if reason else "")
    if action == "rollback" and dp_ranks is None:
        # The kill switch first, at once: reading the records must not delay it.
        report = await change(engine_client, "rollback", name, who, timeout)
        active = _rollouts.active_rollout(await rollouts_now(engine_client, timeout), name)
        if active is not None and report["outcome"] == "done":
            report["rollout"] = await _end(engine_client, active, _rollouts.ROLLED_BACK, who, reason, timeout)
        return report
    active = _rollouts.active_rollout(await rollouts_now(engine_client, timeout), name)
    if action == "promote":
        if active is None:
            return _refused(action, name, f"patch {name!r} has no active rollout to promote; to apply it on every "
                            "rank, send apply without dp_ranks")  # fmt: skip
        report = await change(engine_client, "apply", name, who, timeout)
        report["action"] = "promote"
        if report["outcome"] == "done":
            report["rollout"] = await _end(engine_client, active, _rollouts.PROMOTED, who, reason, timeout)
        return report
    if action == "rollback":
        assert dp_ranks is not None
        if active is None:
            return _refused(action, name, f"rollback with dp_ranks shrinks an active canary, and patch {name!r} has "
                            "none; to roll it back on every rank, send rollback without dp_ranks")  # fmt: skip
        outside = sorted(set(dp_ranks) - set(active["dp_ranks"]))
        if outside:
            return _refused(action, name, f"dp rank(s) {outside} are not in the canary ({_rollouts.describe(active)}): "
                            "roll back only some of its ranks, or send rollback without dp_ranks to end it "
                            "everywhere", conflict=active)  # fmt: skip
        report = await change(engine_client, "rollback", name, who, timeout, dp_ranks)
        if report["outcome"] == "done":
            left = [rank for rank in active["dp_ranks"] if rank not in dp_ranks]
            record = (_rollouts.revised(active, dp_ranks=left) if left
                      else _rollouts.ended(active, _rollouts.ROLLED_BACK, who, reason=reason))  # fmt: skip
            await _store(engine_client, _rollouts.PUT, record, timeout)
            report["rollout"] = record
        return report
    if active is not None:
        what = ("promote it (promote NAME) or roll it back (rollback NAME) before starting another canary"
                if dp_ranks is not None else "to apply it on every rank, promote it (promote NAME)")  # fmt: skip
        return _refused(action, name, f"patch {name!r} has an active canary ({_rollouts.describe(active)}, since "
                        f"{_clock(active['since'])}, requested by {active['requester']}): {what}",
                        conflict=active)  # fmt: skip
    if dp_ranks is None:
        return await change(engine_client, "apply", name, who, timeout)
    at_start = await start_reading() if start_reading is not None else None
    return await _canary(engine_client, name, requester, who, reason, dp_ranks, guards, window_s, at_start, timeout)


async def _canary(
    engine_client: Any,
    name: str,
    requester: str,
    who: str,
    reason: str,
    dp_ranks: Sequence[int],
    guards: Sequence[str],
    window_s: float | None,
    at_start: Mapping[str, Any] | None,
    timeout: float,
) -> dict[str, Any]:
    record = _rollouts.new_record(
        name, dp_ranks, requester, reason=reason, guards=guards, window_s=window_s, at_start=at_start
    )
    # Declared before the change (an engine core refuses it if another API server began one meanwhile).
    answers = await _store(engine_client, _rollouts.BEGIN, record, timeout)
    conflict = next((answer["conflict"] for answer in answers if answer.get("conflict")), None)
    if conflict is not None:
        await _store(engine_client, _rollouts.PUT, _rollouts.ended(record, _rollouts.DISCARDED, who), timeout)
        return _refused("apply", name, f"patch {name!r} has an active canary ({_rollouts.describe(conflict)}, "
                        f"requested by {conflict.get('requester')}): promote it or roll it back before starting "
                        "another canary", conflict=conflict)  # fmt: skip
    report = await change(engine_client, "apply", name, who, timeout, dp_ranks)
    if report["outcome"] == "done" and not any(p.get("changed") for p in report["processes"]):
        # Nothing diverges: the patch was applied there already, or its target lives in no engine core or worker.
        report.update(ok=False, outcome="refused", error=(
            f"nothing changed on dp ranks {sorted(dp_ranks)}: patch {name!r} is applied there already, or it "
            "changes no engine core or worker (a patch of the API server cannot be canaried by rank); no rollout "
            "started"))  # fmt: skip
    if report["outcome"] != "done":
        await _store(engine_client, _rollouts.PUT, _rollouts.ended(record, _rollouts.DISCARDED, who), timeout)
        report["rollout"] = None
        return report
    report["rollout"] = record
    return report


async def _end(
    engine_client: Any, active: Mapping[str, Any], state: str, who: str, reason: str, timeout: float, **extra: Any
) -> dict[str, Any]:
    record = _rollouts.ended(active, state, who, reason=reason, **extra)
    await _store(engine_client, _rollouts.PUT, record, timeout)
    return record


async def end_by_guard(
    engine_client: Any,
    name: str,
    figures: Mapping[str, Any],
    reason: str,
    *,
    rollout_id: str | None = None,
    timeout: float = ENGINE_TIMEOUT_S,
) -> dict[str, Any]:
    """A guard's verdict: roll the active canary of ``name`` back on its ranks, all or nothing, and record it.

    When done everywhere it was asked, the rollout ends ``rolled_back_by_guard`` with ``figures`` and
    ``reason`` (its ``end_reason``); otherwise it stays active and the report (the kill switch's) says why.
    Refused, changing nothing, when ``name`` has no active rollout (or not the one ``rollout_id`` names).
    The caller holds :func:`one_at_a_time`, advances the change epoch and logs (the endpoint's guard hook).
    """
    active = _rollouts.active_rollout(await rollouts_now(engine_client, timeout), name)
    if active is None or (rollout_id is not None and active["id"] != rollout_id):
        what = (
            f"rollout {rollout_id} of patch {name!r} is not active"
            if rollout_id
            else f"patch {name!r} has no active rollout"
        )
        return _refused("rollback", name, f"{what}: nothing for the guard to roll back")
    who = f"guard of rollout {active['id']}"
    report = await change(engine_client, "rollback", name, f"{who} ({reason})", timeout, active["dp_ranks"])
    if report["outcome"] == "done":
        report["rollout"] = await _end(engine_client, active, _rollouts.ROLLED_BACK_BY_GUARD, who, reason, timeout,
                                       figures=figures)  # fmt: skip
    return report


def _clock(unix: Any) -> str:
    """A record's time for a message: UTC, to the second."""
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(unix)))
    except (TypeError, ValueError, OverflowError):
        return str(unix)
