"""Stacks: several stackable patches on one member, in an order that depends only on which are applied.

How a stack is stored.  The target's own ``__dict__`` holds what a single
patch would put there: the outermost layer's member under the member's name,
and vLLM's original (the stack's *base*) under ``_original_<name>``, so a
stack of one looks exactly like one patch.  The layers inward of the
outermost are on no class.  Each patch class has one ``spec.Originals``
table, and ``P.original`` *is* that table's ``__getitem__``: the table maps
each member the patch replaces to what the next layer inward gives, as
``getattr`` on the target would give it (a plain function, a class method
bound to the target, a property object).  So in an outer layer
``P.original("m")`` is one C-level dict lookup, no registry, no lock; it
reads the chain as it is when the call is made, because the ledger rewrites
the entries (under the registry's lock) whenever a layer joins or leaves,
innermost first, so that a call racing with the change always finds a
complete chain, old or new.  A patch that is not stackable has no entry: its
``original("m")`` misses and reads the target's ``_original_m`` at the call,
exactly as a single patch's always did (slower: a Python-level fallback).

The order depends only on the set of applied layers (:attr:`Layer.key`):
higher ``order`` outer, equal order the name that sorts first outer.  Rolling
a layer back removes it from the sorted tuple, puts the new outermost member
on the target if the outermost went, and relinks the tables: what remains is
what applying the remaining set from scratch gives.  When the last layer goes,
the member and ``_original_<name>`` are put back exactly as a single patch's
rollback would.  A layer rolled back while a thread runs its code keeps its
table entry (``inflight.LingeringLayer``) and its place, reaching the next
layer still applied inward of it, until those calls return.

With an instrument installed when a layer joins (``instrument``: telemetry),
the layer's member is the instrument's stand-in for the patch's, and a new
stack's innermost entry reaches the instrument's stand-in for the base
(``Stack.reach``); the target still holds the base itself as ``_original_<name>``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

from .graft import MISSING
from .inflight import Lingerers
from .spec import Originals, PatchSpec

__all__ = ["Layer", "Stack", "chain_line", "class_get", "link", "preview_chains", "relink"]


def class_get(raw: object, owner: type) -> object:
    """What ``getattr(owner, name)`` gives for ``raw`` found in ``owner``'s MRO: a descriptor's class-level value."""
    get = getattr(type(raw), "__get__", None)
    return raw if get is None else get(raw, None, owner)


@dataclass(frozen=True)
class Layer:
    """One applied stackable patch in one stack."""

    patch: str
    order: int
    table: Originals
    member: object
    """The patch's member, rebound to the target (``super()``), as the target holds it when outermost."""

    @property
    def key(self) -> tuple[int, str]:
        """Sorts the outermost first: higher order, then the name that sorts first."""
        return (-self.order, self.patch)

    @property
    def label(self) -> str:
        return _label(self.patch, self.order)


def _label(patch: str, order: int) -> str:
    return patch if order == 0 else f"{patch} (order {order})"


def _base_label(module: str) -> str:
    return "vLLM" if module == "vllm" or module.startswith("vllm.") else "original"


def chain_line(member_label: str, layers: Iterable[tuple[str, int]], module: str) -> str:
    """``Scheduler.schedule: admission_log (order 10) → shortest_prompt_first → vLLM``.

    ``layers`` are ``(patch name, order)`` in any order; ``module`` is the
    target's, which names the base ("vLLM" for a vLLM class).
    """
    ordered = sorted(layers, key=lambda layer: (-layer[1], layer[0]))
    return f"{member_label}: " + " \u2192 ".join([*(_label(*layer) for layer in ordered), _base_label(module)])


def preview_chains(specs: Iterable[PatchSpec], overrides: Callable[[PatchSpec], Iterable[str]]) -> dict[str, list[str]]:
    """For each stackable patch among ``specs``: the stacks it would be a layer of if all of them were applied.

    ``overrides(spec)`` names the members that replace one of the target's
    (only the caller can tell, from an imported or a statically read vLLM).
    Conflicts are not judged here; the chains are what the order rule gives.
    """
    stackable = [spec for spec in specs if spec.stackable]
    members: dict[tuple[str, str], list[PatchSpec]] = {}
    for spec in stackable:
        for member in overrides(spec):
            members.setdefault((spec.target_label, member), []).append(spec)
    out: dict[str, list[str]] = {spec.name: [] for spec in stackable}
    for (target, member), layers in sorted(members.items()):
        module, _, qualname = target.partition(":")
        line = chain_line(f"{qualname}.{member}", [(spec.name, spec.order) for spec in layers], module)
        for spec in layers:
            out[spec.name].append(line)
    return out


@dataclass(frozen=True)
class Stack:
    """The applied layers of one member of one class, outermost first, and what the class held before."""

    target: type
    name: str
    base: object
    """vLLM's original, raw (the innermost layer's next); the target holds it as ``_original_<name>``."""
    holder: type
    """The class whose own ``__dict__`` holds ``base`` (the target, or a base class it inherits it from)."""
    old: object
    """What the target's own ``__dict__`` held under ``name`` before the stack (``MISSING``: nothing)."""
    layers: tuple[Layer, ...]
    top_held: object = None
    """What the target's ``__dict__`` holds under ``name`` now (a metaclass may store something else)."""
    original_held: object = None
    """What it holds under ``_original_<name>``."""
    reach: object = MISSING
    """What the innermost layer calls as vLLM's original: an instrument's stand-in for ``base``
    (``instrument``), or ``MISSING`` for ``base`` itself."""

    def joined(self, layer: Layer) -> Stack:
        return replace(self, layers=tuple(sorted((*self.layers, layer), key=lambda each: each.key)))

    def without(self, patch: str) -> Stack:
        return replace(self, layers=tuple(layer for layer in self.layers if layer.patch != patch))

    def layer(self, patch: str) -> Layer:
        return next(layer for layer in self.layers if layer.patch == patch)

    def inner_of(self, key: tuple[int, str]) -> object:
        """The raw member the layer at ``key`` calls next: the first applied layer inward of it, or the base."""
        return next((layer.member for layer in self.layers if layer.key > key), self.reached_base)

    @property
    def reached_base(self) -> object:
        """What the innermost layer calls as the base: ``base``, or the stand-in an instrument gave for it."""
        return self.base if self.reach is MISSING else self.reach

    @property
    def member_label(self) -> str:
        return f"{self.target.__qualname__}.{self.name}"

    def describe(self) -> str:
        """``Scheduler.schedule: admission_log (order 10) → shortest_prompt_first → vLLM``."""
        layers = [(layer.patch, layer.order) for layer in self.layers]
        return chain_line(self.member_label, layers, getattr(self.holder, "__module__", "") or "")


def relink(stacks: dict[tuple[type, str], Stack], lingerers: Lingerers, target: type, name: str) -> None:
    """Point every layer of ``target.name`` (applied or lingering) at its next layer inward, innermost first.

    Innermost first: a layer that just joined gets its entry before the one
    outward of it is pointed at it, so a concurrent call always finds a whole
    chain.  Lingering layers (rolled back, still running) keep their place and
    skip to the next applied layer inward of it; with no stack left they reach
    the base they had.
    """
    stack = stacks.get((target, name))
    if stack is not None:
        for layer in reversed(stack.layers):
            link(layer.table, stack, layer.key)
    for entry in lingerers.layers_of(target, name):
        if entry.key is None:
            continue  # a patch that was not stackable: it keeps the original it had
        # Concrete, never through the target: the stack (and its _original_x) may go while it runs.
        inner: Any = stack.inner_of(entry.key) if stack is not None else entry.base
        entry.table.link(name, class_get(inner, target))


def link(table: Originals, stack: Stack, key: tuple[int, str]) -> None:
    """Point the applied layer at ``key`` at its next layer: a table entry, vLLM's original for the innermost.

    Always an entry, so every layer's ``original()`` is one C-level lookup.
    The innermost layer's entry is the stack's base, not a read of the
    target's ``_original_<name>``: replacing that attribute under a stack is
    an outside change (join and rollback refuse it), and a test that stands in
    for vLLM's original replaces the member before applying the patch.
    """
    table.link(stack.name, class_get(stack.inner_of(key), stack.target))
