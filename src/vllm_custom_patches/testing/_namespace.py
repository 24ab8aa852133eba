"""In-process helpers: apply patches for a block, snapshot a class's namespace, isolate the registry."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .._core.graft import MISSING
from .._core.manager import PatchManager, PatchRef

__all__ = ["NamespaceSnapshot", "applied", "isolated_registry", "snapshot_namespace"]


@dataclass(frozen=True)
class NamespaceSnapshot:
    """A class's own ``__dict__`` at one moment: names, object identities, and each object's state.

    The state is a shallow copy of each member's own ``__dict__`` (what a
    descriptor's ``__set_name__`` or a decorator would change), so a member
    that is still the same object but was mutated counts as changed too.
    """

    cls: type
    entries: dict[str, object]
    states: dict[str, dict[str, object] | None] = field(default_factory=dict)

    def changes(self) -> list[str]:
        """What differs now, one readable line per name; empty if nothing does."""
        now = dict(vars(self.cls))
        lines = []
        for name in sorted(self.entries.keys() | now.keys()):
            old, new = self.entries.get(name, MISSING), now.get(name, MISSING)
            if old is new:
                before, after = self.states.get(name), _state(new)
                if before is not None and after is not None and not _same_state(before, after):
                    keys = sorted(
                        k
                        for k in before.keys() | after.keys()
                        if not _same(before.get(k, MISSING), after.get(k, MISSING))
                    )
                    details = ", ".join(f"{k}: {before.get(k, MISSING)!r} -> {after.get(k, MISSING)!r}" for k in keys)
                    lines.append(f"* {name} is the same object but was mutated ({details})")
                continue
            if old is MISSING:
                lines.append(f"+ {name} = {new!r}")
            elif new is MISSING:
                lines.append(f"- {name} (was {old!r})")
            else:
                lines.append(f"~ {name}: {old!r} -> {new!r}")
        return lines

    def assert_unchanged(self) -> None:
        """Fail with the list of differences unless the namespace is exactly as snapshotted."""
        diff = self.changes()
        if diff:
            raise AssertionError(f"{self.cls.__qualname__}.__dict__ changed:\n  " + "\n  ".join(diff))


def snapshot_namespace(cls: type) -> NamespaceSnapshot:
    """Record ``vars(cls)`` (keys, object identities and each object's own state) to compare with later."""
    entries = dict(vars(cls))
    return NamespaceSnapshot(cls, entries, {name: _state(value) for name, value in entries.items()})


def _state(obj: object) -> dict[str, object] | None:
    if isinstance(obj, type):  # a nested class: its namespace is a snapshot of its own
        return None
    try:
        return dict(vars(obj))
    except TypeError:  # no __dict__: nothing a descriptor hook could have stored
        return None


def _same(a: object, b: object) -> bool:
    if a is b:
        return True
    try:
        return bool(a == b)
    except Exception:
        return False


def _same_state(before: dict[str, object], after: dict[str, object]) -> bool:
    return before.keys() == after.keys() and all(_same(before[k], after[k]) for k in before)


@contextlib.contextmanager
def applied(*patches: PatchRef) -> Iterator[None]:
    """Apply the patches in order for the duration of the block, then roll them back, last first.

    Patches that were already applied when the block started stay applied.
    """
    done: list[PatchRef] = []
    try:
        for patch in patches:
            if PatchManager.apply(patch):
                done.append(patch)
        yield
    finally:
        for patch in reversed(done):
            PatchManager.rollback(patch)


@contextlib.contextmanager
def isolated_registry() -> Iterator[None]:
    """Give the block its own view of the patch registry.

    On exit every patch applied inside the block is rolled back (last first),
    patches that were applied on entry and rolled back inside are applied
    again, and patch classes defined inside the block are forgotten, so names
    can be reused by the next test.
    """
    reg = PatchManager._registry
    with reg.lock:
        patches: dict[str, Any] = dict(reg.patches)
        applied_before = list(reg.applied)
        outcomes = dict(reg.outcomes)
    try:
        yield
    finally:
        with reg.lock:
            for name in reversed(list(reg.applied)):
                if name not in applied_before:
                    PatchManager.rollback(name)
            reg.patches.clear()
            reg.patches.update(patches)
            for name in applied_before:
                if name not in reg.applied:
                    PatchManager.apply(name)
            reg.outcomes.clear()
            reg.outcomes.update(outcomes)
