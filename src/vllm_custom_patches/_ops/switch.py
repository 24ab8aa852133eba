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
The last is remembered here until a later operation on that patch is done
everywhere, and the status route shows it (:func:`note_unsettled`).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Mapping
from typing import Any

from .._core.forksafe import ForkSafeLock
from .agent import CONTROL_METHOD, control_record, unreachable_record
from .auth import sign
from .fleet import ENGINE_TIMEOUT_S, call_engine_cores, describe_process, engine_failure

__all__ = ["HTTP_STATUS", "change", "known_patches", "note_unsettled", "summary"]

HTTP_STATUS = {"done": 200, "refused": 409, "inconsistent": 500}
"""The control route's HTTP status for each outcome."""

_RANKS = ("dp_rank", "tp_rank", "pp_rank")

# patch -> what the last inconsistent operation on it left (this API server's memory).
_unsettled_lock = ForkSafeLock()  # a forked child must not find it held by a thread it lacks
_unsettled: dict[str, dict[str, Any]] = {}


def known_patches() -> list[str]:
    """Names a control request may use: every patch loaded in this process, and every entry point."""
    from .._core.manager import PatchManager
    from .._runtime.discovery import find_entry_points

    return sorted(set(PatchManager.names()) | set(find_entry_points()))


async def change(
    engine_client: Any, action: str, name: str, who: str, timeout: float = ENGINE_TIMEOUT_S
) -> dict[str, Any]:
    """Do ``action`` (``rollback`` or ``apply``) on patch ``name`` in every process; undo it everywhere on any failure."""
    op_id = uuid.uuid4().hex[:12]
    started = time.monotonic()
    records = await _everywhere(engine_client, sign(action, name, op_id, who), timeout)
    ok = all(record["ok"] for record in records)
    report: dict[str, Any] = {"ok": ok, "outcome": "done", "action": action, "patch": name, "op_id": op_id}
    if not ok:
        undone = await _everywhere(engine_client, sign("undo", name, op_id, who), timeout)
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


async def _everywhere(engine_client: Any, signed: tuple[str, ...], timeout: float) -> list[dict[str, Any]]:
    records = [control_record(signed, "api_server")]
    if engine_client is None:
        return records
    for dp_rank, answer in await call_engine_cores(engine_client, CONTROL_METHOD, signed, timeout):
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
    with _unsettled_lock:
        if report["outcome"] == "done":
            _unsettled.pop(report["patch"], None)
        elif report["outcome"] == "inconsistent":
            _unsettled[report["patch"]] = {
                "patch": report["patch"],
                "op_id": report["op_id"],
                "action": report["action"],
                "processes": [p["description"] for p in report["undo_failed"]],
            }


def note_unsettled(status: dict[str, Any]) -> dict[str, Any]:
    """Add to a status report (``_fleet.collect``) what failed undos left; the server is then not consistent.

    A patch's processes can disagree across roles (the API server rolled back,
    an engine core not), which comparing each role with itself does not show.
    """
    with _unsettled_lock:
        unsettled = [dict(entry) for entry in _unsettled.values()]
    status["unsettled"] = unsettled
    if unsettled:
        status["consistent"] = False
    return status


def summary(report: Mapping[str, Any]) -> str:
    """One line for the log: what, whether it happened, where."""
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
    return text + (f"; failed: {reasons}" if reasons else "") + (f"; NOT put back in: {stuck}" if stuck else "")
