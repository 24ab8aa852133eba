"""Locks that a fork cannot leave held in the child.

``os.fork()`` copies a lock as it is: one that another thread held stays held
in the child, where that thread does not exist, so the child's first
``with lock:`` blocks forever.  vLLM forks (engine cores, workers, with the
``fork`` start method) while our threads may hold a lock: the rollback
sweeper, a kill-switch call, an import hook applying a waiting patch.
CPython renews only its own locks after a fork.

The child has one thread, the one that called ``fork()``, and the handlers
run in it.  So after a fork each of these locks is

* renewed (a fresh inner lock) if another thread held it: that thread is gone
  and would never release it.  What it was changing under the lock may be half
  done; as with CPython's own locks, nothing better can be done in general;
* kept as it is if the forking thread itself holds it: that thread is still
  inside its ``with`` block in the child and releases it on the way out.
  Renewing it would let a thread the child starts in the meantime into the
  block, and the release would then hit the fresh lock.

A plain ``Lock`` does not know its owner, so :class:`ForkSafeLock` records it.
"""

from __future__ import annotations

import os
import threading
import weakref

__all__ = ["ForkSafeLock", "ForkSafeRLock"]

_LIVE: weakref.WeakSet[ForkSafeLock | ForkSafeRLock] = weakref.WeakSet()


class ForkSafeRLock:
    """A re-entrant lock renewed in a forked child if a thread other than the forking one held it."""

    def __init__(self) -> None:
        self._inner = threading.RLock()
        _LIVE.add(self)

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return self._inner.acquire(blocking, timeout)

    def release(self) -> None:
        self._inner.release()

    def __enter__(self) -> bool:
        return self._inner.acquire()

    def __exit__(self, *exc: object) -> None:
        self._inner.release()

    def _after_fork_in_child(self) -> None:
        # Succeeds when it is free or the forking thread's own (re-entrant): keep it.
        if self._inner.acquire(blocking=False):
            self._inner.release()
        else:
            self._inner = threading.RLock()


class ForkSafeLock:
    """A plain lock renewed in a forked child if a thread other than the forking one held it."""

    def __init__(self) -> None:
        self._inner = threading.Lock()
        # Written only by the holder: set just after acquiring, cleared just before releasing.
        self._owner: int | None = None
        _LIVE.add(self)

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        acquired = self._inner.acquire(blocking, timeout)
        if acquired:
            self._owner = threading.get_ident()
        return acquired

    def release(self) -> None:
        self._owner = None
        self._inner.release()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _after_fork_in_child(self) -> None:
        # A fork between another thread's acquire and its setting the owner leaves
        # the owner None or stale, never the forking thread's: renewed, as it must be.
        if self._owner == threading.get_ident():
            return
        if self._inner.acquire(blocking=False):
            self._inner.release()
        else:
            self._inner = threading.Lock()
            self._owner = None


def _after_fork_in_child() -> None:
    for lock in list(_LIVE):
        lock._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
