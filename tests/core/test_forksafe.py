"""A fork while another thread holds one of the framework's locks leaves the child a usable lock.

vLLM forks engine cores and workers; a lock that another thread of the parent
held at that moment would stay held forever in the child (that thread does
not exist there).  Each module-level lock, and the registry's, is checked:
a thread holds it, the main thread forks, and the child must get the lock.
The child reports by its exit code; its waits are bounded (a hang guard only).
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from typing import Any

import pytest

pytestmark = pytest.mark.skipif(not hasattr(os, "fork") or sys.platform != "linux", reason="os.fork on Linux")

GUARD_S = 20.0
"""Hang guard: how long the child waits for a lock that must be free at once."""


def _registry_lock() -> Any:
    from vllm_custom_patches._core.manager import PatchManager

    return PatchManager._registry.lock


def _module_lock(module: str, name: str) -> Callable[[], Any]:
    def get() -> Any:
        return getattr(__import__(f"vllm_custom_patches.{module}", fromlist=[name]), name)

    return get


LOCKS: dict[str, Callable[[], Any]] = {
    "the registry's (PatchManager)": _registry_lock,
    "_activation._waiting_lock": _module_lock("_runtime.activation", "_waiting_lock"),
    "_control._lock": _module_lock("_ops.control", "_lock"),
    "_control._replays._lock": lambda: _module_lock("_ops.control", "_replays")()._lock,
    "_switch._record._lock": lambda: _module_lock("_ops.switch", "_record")()._lock,
    "_metrics._lock": _module_lock("_ops.metrics", "_lock"),
    "plugin._lock": _module_lock("plugin", "_lock"),  # replaced by plugin.py's own handler
}


def _in_child(check: Callable[[], int]) -> int:
    """Fork; the child runs ``check`` and exits with its result (never returns into pytest); the child's exit code."""
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            code = check()
        except BaseException:
            code = 98
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.parametrize("which", sorted(LOCKS))
def test_a_lock_another_thread_holds_at_fork_is_free_in_the_child(which: str) -> None:
    lock = LOCKS[which]()
    held, done = threading.Event(), threading.Event()

    def hold() -> None:
        with lock:
            held.set()
            done.wait(GUARD_S * 3)

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    try:
        assert held.wait(GUARD_S)

        def child() -> int:
            lock = LOCKS[which]()
            if not lock.acquire(timeout=GUARD_S):
                return 1  # held forever: by a thread the child does not have
            lock.release()
            with lock:  # and it works as a lock: taken and given back again
                pass
            return 0

        assert _in_child(child) == 0, f"{which} stayed held in the forked child"
        assert not lock.acquire(blocking=False)  # the parent's is still the holder's
    finally:
        done.set()
        holder.join(GUARD_S)
    assert lock.acquire(timeout=GUARD_S)
    lock.release()


@pytest.mark.parametrize("which", ["the registry's (PatchManager)", "_control._lock"])
def test_a_lock_the_forking_thread_holds_stays_its_own_in_the_child(which: str) -> None:
    """Renewing it would open the ``with`` block the child's thread is still in to any
    thread the child starts; the child's thread releases it on the way out."""
    lock = LOCKS[which]()

    def child() -> int:
        taken: list[bool] = []
        other = threading.Thread(target=lambda: taken.append(lock.acquire(blocking=False)))
        other.start()
        other.join(GUARD_S)
        if taken != [False]:
            return 1  # another thread of the child got into the block
        lock.release()  # as the `with` block below does in the parent: no error
        taken.clear()
        other = threading.Thread(target=lambda: taken.append(lock.acquire(timeout=GUARD_S)))
        other.start()
        other.join(GUARD_S * 2)
        return 0 if taken == [True] else 2

    with lock:
        code = _in_child(child)
    assert code == 0, {
        1: "another thread entered the forking thread's block",
        2: "the lock did not work after release",
    }.get(code, code)
