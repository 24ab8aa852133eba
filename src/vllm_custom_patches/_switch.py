"""The kill switch across a running server: one patch rolled back (or applied) in every process, or in none.

Runs in the API server, for the endpoint's control routes.  The change is
made in this process, then in every engine core and, through each engine
core, in its workers (``_agent``, ``_control``).  If any process fails (a
conflict, an outside change to the class, a process that does not answer),
every process is asked to undo the operation, so the server is left as it
was, and the answer lists every process's result and reason.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from typing import Any

from ._agent import CONTROL_METHOD, control_record, unreachable_record
from ._fleet import ENGINE_TIMEOUT_S, call_engine_cores, engine_failure

__all__ = ["change", "known_patches", "summary"]


def known_patches() -> list[str]:
    """Names a control request may use: every patch loaded in this process, and every entry point."""
    from ._discovery import find_entry_points
    from ._manager import PatchManager

    return sorted(set(PatchManager.names()) | set(find_entry_points()))


async def change(engine_client: Any, action: str, name: str, who: str, timeout: float = ENGINE_TIMEOUT_S) -> dict[str, Any]:
    """Do ``action`` (``rollback`` or ``apply``) on patch ``name`` in every process; undo it everywhere on any failure."""
    op_id = uuid.uuid4().hex[:12]
    started = time.monotonic()
    records = await _everywhere(engine_client, action, name, op_id, who, timeout)
    ok = all(record["ok"] for record in records)
    report: dict[str, Any] = {"ok": ok, "action": action, "patch": name, "op_id": op_id}
    if not ok:
        undone = await _everywhere(engine_client, "undo", name, op_id, who, timeout)
        by_process = {_key(record): record for record in undone}
        for record in records:
            after = by_process.get(_key(record))
            record["reverted"] = bool(after and after.get("undone"))
            if after is not None and after.get("state"):
                record["state"] = after["state"]
            if after is not None and not after["ok"]:
                record["undo_error"] = after["error"]
        report["undo_failed"] = [_key(r) for r in undone if not r["ok"]]
    report["elapsed_s"] = round(time.monotonic() - started, 4)
    report["processes"] = records
    return report


async def _everywhere(engine_client: Any, action: str, name: str, op_id: str, who: str, timeout: float) -> list[dict[str, Any]]:
    records = [control_record(action, name, op_id, who, "api_server")]
    if engine_client is None:
        return records
    for dp_rank, answer in await call_engine_cores(engine_client, CONTROL_METHOD, (action, name, op_id, who), timeout):
        if isinstance(answer, BaseException):
            records.append(_failed(unreachable_record("engine_core", engine_failure(answer), dp_rank=dp_rank)))
        else:
            records.extend(answer)
    return records


def _failed(record: dict[str, Any]) -> dict[str, Any]:
    return {**record, "ok": False, "changed": False, "relevant": True, "state": "unknown"}


def _key(record: dict[str, Any]) -> tuple[Any, ...]:
    return (record["role"], record.get("host"), record.get("pid"), record.get("dp_rank"), record.get("tp_rank"))


def summary(report: dict[str, Any]) -> str:
    """One line for the log: what, whether it happened, where."""
    changed = [r for r in report["processes"] if r.get("changed")]
    failed: Iterable[dict[str, Any]] = [r for r in report["processes"] if not r["ok"]]
    text = (
        f"{report['action']} of patch {report['patch']!r} (op {report['op_id']}): "
        f"{'done' if report['ok'] else 'REFUSED, undone everywhere'} in {report['elapsed_s'] * 1000:.0f} ms; "
        f"changed in {len(changed)} of {len(report['processes'])} processes"
    )
    reasons = "; ".join(f"{r['role']} pid {r.get('pid')}: {r.get('error')}" for r in failed)
    return text + (f"; failed: {reasons}" if reasons else "")
