"""Helpers shared by the catalogue's scheduling-policy patches."""

from __future__ import annotations

from collections import deque
from typing import Any

from vllm_custom_patches import PatchConfigError

__all__ = ["reorder_in_place", "require_fcfs_queue"]


def require_fcfs_queue(scheduler: Any, patch: str) -> None:
    """Raise :class:`PatchConfigError` unless ``scheduler.waiting`` is vLLM's FCFS deque.

    Called where configuration is judged -- a scheduler's ``__init__`` at
    start-up, and the patch's ``check_live`` on the schedulers that exist when
    it is applied live -- never per scheduler step.
    """
    if not isinstance(scheduler.waiting, deque):
        policy = getattr(getattr(scheduler, "policy", None), "value", "?")
        raise PatchConfigError(
            f"patch {patch!r} reorders vLLM's first-come-first-served waiting queue, but this "
            f"scheduler uses scheduling policy {policy!r} ({type(scheduler.waiting).__name__}). "
            f"Start vLLM with --scheduling-policy fcfs (the default) to use {patch!r}, or do not "
            f"select it (VLLM_CUSTOM_PATCHES) or apply it on this server."
        )


def reorder_in_place(queue: Any, ordered: list[Any]) -> None:
    """Put ``ordered`` (a permutation of ``queue``) into the same deque object.

    The scheduler keeps references to its queue, so the object must stay the
    same; only its contents move.
    """
    if any(a is not b for a, b in zip(queue, ordered, strict=True)):
        queue.clear()
        queue.extend(ordered)
