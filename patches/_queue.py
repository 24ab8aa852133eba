"""Helpers shared by the catalogue's scheduling-policy patches."""

from __future__ import annotations

from collections import deque
from typing import Any

from vllm_custom_patches import PatchConfigError

__all__ = ["reorder_in_place", "require_admission_order"]


def require_admission_order(scheduler: Any, patch: str) -> None:
    """Raise :class:`PatchConfigError` unless ``patch``'s order of ``scheduler.waiting`` is the admission order.

    The policies sort ``scheduler.waiting`` before each step and let vLLM admit
    from its head.  That holds only when, besides ``kv_holding_waiting``
    (requests that already hold KV blocks, always drained first), vLLM admits
    from that one FCFS deque and keeps its order.  Refused here:

    * another scheduling policy: ``waiting`` is then not an FCFS deque;
    * vLLM 0.34's cache-aware admission (``--cache-aware-admission-window``
      N > 0): ``_reorder_waiting_by_cached_prefix`` re-sorts the first N
      waiting requests at each step, after the policy sorted them;
    * vLLM 0.34's second waiting queue, ``async_kv_waiting``, used with a KV
      connector and ``--max-num-inflight-kv-loads``: ``_next_waiting_queue``
      takes from it or from ``waiting`` by arrival time, so its requests pass
      the policy's order.

    Called where configuration is judged -- a scheduler's ``__init__`` at
    start-up, and the patch's ``check_live`` on the schedulers that exist when
    it is applied live -- never per scheduler step.  The attributes of 0.34
    are read with a default: vLLM 0.32 and 0.33 have neither setting, and
    there nothing bypasses the policy.
    """
    if not isinstance(scheduler.waiting, deque):
        policy = getattr(getattr(scheduler, "policy", None), "value", "?")
        raise PatchConfigError(
            f"patch {patch!r} reorders vLLM's first-come-first-served waiting queue, but this "
            f"scheduler uses scheduling policy {policy!r} ({type(scheduler.waiting).__name__}). "
            f"Start vLLM with --scheduling-policy fcfs (the default) to use {patch!r}, or do not "
            f"select it (VLLM_CUSTOM_PATCHES) or apply it on this server."
        )
    # vLLM 0.34 sets cache_aware_window to the window only where it acts (FCFS
    # with prefix caching), 0 otherwise; older vLLMs lack it: nothing re-sorts.
    window = getattr(scheduler, "cache_aware_window", 0)
    if window:
        raise PatchConfigError(
            f"patch {patch!r} orders vLLM's waiting queue, but this scheduler runs with "
            f"--cache-aware-admission-window {window} (cache_aware_admission_window), so vLLM "
            f"re-sorts the first {window} waiting requests by cached prefix at every step, after "
            f"{patch!r} sorted them. Start vLLM with --cache-aware-admission-window 0 (the "
            f"default) to use {patch!r}, or do not select it (VLLM_CUSTOM_PATCHES) or apply it "
            f"on this server."
        )
    # vLLM 0.34 queues a request in async_kv_waiting only when a KV connector
    # is configured and max_num_inflight_kv_loads is set (_enqueue_waiting_request);
    # older vLLMs have no such queue.
    limit = getattr(getattr(scheduler, "scheduler_config", None), "max_num_inflight_kv_loads", None)
    if (
        getattr(scheduler, "async_kv_waiting", None) is not None
        and getattr(scheduler, "connector", None) is not None
        and limit
    ):
        raise PatchConfigError(
            f"patch {patch!r} orders vLLM's waiting queue, but this scheduler has a KV connector "
            f"and --max-num-inflight-kv-loads {limit} (max_num_inflight_kv_loads), so requests "
            f"whose KV the connector may load asynchronously wait in a second queue "
            f"(async_kv_waiting) that vLLM merges with the waiting queue by arrival time, past "
            f"{patch!r}'s order. Start vLLM without --max-num-inflight-kv-loads to use "
            f"{patch!r}, or do not select it (VLLM_CUSTOM_PATCHES) or apply it on this server."
        )


def reorder_in_place(queue: Any, ordered: list[Any]) -> None:
    """Put ``ordered`` (a permutation of ``queue``) into the same deque object.

    The scheduler keeps references to its queue, so the object must stay the
    same; only its contents move.
    """
    if any(a is not b for a, b in zip(queue, ordered, strict=True)):
        queue.clear()
        queue.extend(ordered)
