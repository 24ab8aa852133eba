"""Rollback while other threads are inside a patched method.

Apply puts each ``_original_x`` in before its graft, so a thread never finds a
graft without its original.  Rollback mirrors that: it puts the target's own
members back first (new calls reach the originals at once) and removes each
``_original_x`` only when no thread is still running the patch's code, since
such a call may yet reach ``self._original_x``.  Until then the original
*lingers* on the target, and a daemon thread removes it as soon as those
calls have returned; the target's namespace is then exactly as before.

A patch's ``original()`` table (``spec.Originals``) lingers the same way: a
rolled-back patch keeps its entries (a layer of a stack keeps its place, and
reaches the next layer still applied inward of it) until no thread runs its
code.

What cannot be seen: a patched generator or coroutine suspended between two
steps is on no thread's stack, so it does not hold its original back.
"""

from __future__ import annotations

import sys
import threading
import time
import types
from collections.abc import Iterable
from dataclasses import dataclass

from .forksafe import ForkSafeRLock
from .graft import MISSING, Change, code_objects, functions_of, restore
from .log import logger
from .spec import Originals

__all__ = ["Lingerers", "Lingering", "LingeringLayer", "codes_of", "threads_running"]

_POLL_S = (0.001, 0.05)
"""The sweeper's first and longest pause between two looks at the threads."""


def codes_of(members: Iterable[object]) -> frozenset[types.CodeType]:
    """Every code object of the members' functions, nested ones included."""
    return frozenset(
        code for member in members for func in functions_of(member) for code in code_objects(func.__code__)
    )


def threads_running(codes: frozenset[types.CodeType]) -> int:
    """How many threads (this one included) have a frame running one of ``codes``."""
    if not codes:
        return 0
    busy = 0
    for frame in sys._current_frames().values():
        walk: types.FrameType | None = frame
        while walk is not None:
            if walk.f_code in codes:
                busy += 1
                break
            walk = walk.f_back
    return busy


@dataclass(frozen=True)
class Lingering:
    """An ``_original_x`` kept on its target after rollback, while calls may still use it."""

    patch: str
    target: type
    name: str
    value: object
    codes: frozenset[types.CodeType]


@dataclass(frozen=True)
class LingeringLayer:
    """A rolled-back patch's ``original(member)`` entry, kept while calls may still use it."""

    patch: str
    table: Originals
    """The patch class's ``original()`` table; the sweep removes ``member`` from it."""
    target: type
    member: str
    key: tuple[int, str] | None
    """Its place in the member's stack (see ``stacks.Layer.key``); ``None`` for a patch that is not stackable."""
    base: object
    """What its ``original(member)`` gives when no applied layer is inward of it."""
    codes: frozenset[types.CodeType]


class Lingerers:
    """The lingering originals of one registry; every method needs the registry's lock held."""

    def __init__(self, lock: ForkSafeRLock) -> None:
        self._lock = lock
        self.entries: dict[tuple[type, str], Lingering] = {}
        self.layers: dict[tuple[type, str, str], LingeringLayer] = {}  # (target, member, patch) -> entry
        self._sweeper: threading.Thread | None = None

    def add(self, entry: Lingering) -> None:
        self.entries[(entry.target, entry.name)] = entry
        self._ensure_sweeper()

    def add_layer(self, entry: LingeringLayer) -> None:
        self.layers[(entry.target, entry.member, entry.patch)] = entry
        self._ensure_sweeper()

    def layers_of(self, target: type, member: str) -> list[LingeringLayer]:
        """The lingering ``original()`` entries of ``target.member``."""
        return [entry for (klass, name, _), entry in self.layers.items() if klass is target and name == member]

    def adopt_layer(self, target: type, member: str, patch: str) -> None:
        """Hand a lingering entry over to an apply of the same patch: its table entry is the apply's now."""
        self.layers.pop((target, member, patch), None)

    def _ensure_sweeper(self) -> None:
        if self._sweeper is None or not self._sweeper.is_alive():
            self._sweeper = threading.Thread(target=self._sweep_until_done, name="vcp-rollback-sweeper", daemon=True)
            self._sweeper.start()

    def lingering(self, target: type, name: str) -> Lingering | None:
        """The entry for ``target.name`` if the target still holds that lingering original."""
        entry = self.entries.get((target, name))
        if entry is None or vars(target).get(name, MISSING) is not entry.value:
            return None
        return entry

    def adopt(self, target: type, name: str) -> None:
        """Hand a lingering ``target.name`` over to an apply that sets it again: the sweeper forgets it."""
        self.entries.pop((target, name), None)

    def sweep(self) -> None:
        """Remove every lingering original no thread can still reach."""
        for key, entry in list(self.entries.items()):
            if vars(entry.target).get(entry.name, MISSING) is not entry.value:
                del self.entries[key]  # taken over by a later apply, or removed by hand
            elif threads_running(entry.codes) == 0:
                del self.entries[key]
                try:
                    restore(entry.target, Change(entry.name, MISSING, entry.value))
                except Exception as exc:  # a class refusing even type's own delete; nothing else to try
                    logger.warning("could not remove %s.%s: %r", entry.target.__qualname__, entry.name, exc)
                    continue
                logger.debug("removed lingering %s.%s of patch %r", entry.target.__qualname__, entry.name, entry.patch)
        for layer_key, layer in list(self.layers.items()):
            if threads_running(layer.codes) == 0:
                del self.layers[layer_key]
                layer.table.forget(layer.member)

    def _sweep_until_done(self) -> None:
        pause = _POLL_S[0]
        while True:
            time.sleep(pause)
            with self._lock:
                self.sweep()
                if not self.entries and not self.layers:
                    self._sweeper = None
                    return
            pause = min(pause * 2, _POLL_S[1])

    def after_fork_in_child(self) -> None:
        # Threads do not survive a fork; the child needs its own sweeper.
        self._sweeper = None
        if self.entries or self.layers:
            self._ensure_sweeper()
