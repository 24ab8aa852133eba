"""``schedule_log``: record which waiting requests each scheduler step admits, without changing anything.

An observer that composes: it is ``stackable=True`` with ``order=10``, so it
wraps whatever admission policy is applied on ``Scheduler.schedule`` (the
catalogue's ``shortest_prompt_first`` or ``fair_share``, this package's
``lifo_admission``) from the outside, sees the order that policy produced, and
calls it through ``ScheduleLog.original("schedule")``, the next layer inward.

Enable: ``VLLM_CUSTOM_PATCHES=schedule_log`` (with a policy, in any order:
``schedule_log,shortest_prompt_first``); the package declares its entry point,
so ``*`` selects it too (it only observes).  Each step that admits requests
appends one JSON line ``{"pid": ..., "admitted": ["<request id>", ...]}`` to
the file ``VLLM_PATCHES_EXAMPLE_SCHEDULE_LOG`` names (opened for appending,
one ``write`` per line, so processes can share it); without the setting the
ids are kept in :data:`ADMITTED` only.
"""

from __future__ import annotations

import json
import os
import sys
from collections import deque
from typing import TYPE_CHECKING

from vllm_custom_patches import TypedAs, VLLMPatch, vllm_versions

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

__all__ = ["ADMITTED", "ENV_LOG", "ScheduleLog"]

ENV_LOG = "VLLM_PATCHES_EXAMPLE_SCHEDULE_LOG"
ADMITTED: deque[str] = deque(maxlen=10_000)
"""The ids of the requests admitted in this process, oldest first (the last 10,000)."""


@vllm_versions(">=0.32,<0.35")
class ScheduleLog(VLLMPatch[Scheduler], TypedAs[Scheduler], stackable=True, order=10):
    """Record the ids of the requests each scheduler step admits (an observer: changes nothing).

    Why: to see what an admission policy does on a live server, or to test it,
    without touching it.  What it changes: nothing; ``Scheduler.schedule``
    returns what the next layer inward returned.  Checked against vLLM 0.32.0
    (run) and 0.33.0, 0.34.0 (read).  Remove it by deselecting it.
    """

    name = "schedule_log"

    @override
    def schedule(self, throttle_prefills: bool = False) -> SchedulerOutput:
        output: SchedulerOutput = ScheduleLog.original("schedule")(self, throttle_prefills)
        admitted = [request.req_id for request in output.scheduled_new_reqs]
        if admitted:
            ADMITTED.extend(admitted)
            path = os.environ.get(ENV_LOG)
            if path:
                with open(path, "a", encoding="utf-8") as log:
                    log.write(json.dumps({"pid": os.getpid(), "admitted": admitted}) + "\n")
        return output
