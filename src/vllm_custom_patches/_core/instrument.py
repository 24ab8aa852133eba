"""An optional hook on what apply grafts: instrumentation, such as per-patch telemetry, without the core knowing it.

The core measures nothing itself.  A wing may install one :class:`Instrument`
(:func:`install`).  While one is installed, every apply asks it, under the
registry's lock, for two things:

* :meth:`Instrument.member`: what to put on the target (or into a stack, as
  the layer's member) instead of each member of the patch, as the core would
  put it there (already rebound so that ``super()`` works);
* :meth:`Instrument.original`: what the patch is to reach as the original of
  a member it replaces (the target's ``_original_<name>`` of a patch that is
  not stackable; the innermost layer's ``original()`` entry in a stack), given
  the original as the target's class dictionary holds it.

Either may return its argument unchanged.  A stand-in must be of exactly the
same type as what it stands for (a function for a function, a
``staticmethod`` for a ``staticmethod``, a ``property`` for a ``property``),
so that it is called the same way; the core checks that and grafts the
argument itself where it is not (with a warning), so an instrument can never
change a member's kind.

With nothing installed (the default) the instrument is never consulted and
apply grafts exactly what it always did.  Installing or removing one changes
only the patches applied afterwards: what is applied keeps what it was
applied with until it is rolled back.  Rollback is exact either way: it puts
back what the target held before the apply, whatever stood in for the
patch's members meanwhile.
"""

from __future__ import annotations

from typing import Protocol

from .log import logger

__all__ = ["Instrument", "install", "installed", "instrumented_member", "instrumented_original"]


class Instrument(Protocol):
    """What an instrument gives apply (see the module's docstring for the contract)."""

    def member(self, patch: str, target: type, name: str, value: object) -> object:
        """What to graft as patch ``patch``'s member ``name`` of ``target`` instead of ``value`` (or ``value``)."""
        ...

    def original(self, target: type, name: str, value: object) -> object:
        """What the patch reaches as the original of ``target.name`` instead of ``value`` (or ``value``)."""
        ...


_installed: Instrument | None = None


def install(instrument: Instrument | None) -> Instrument | None:
    """Install ``instrument`` for the applies that follow (``None``: none); returns the one installed before."""
    global _installed
    previous, _installed = _installed, instrument
    return previous


def installed() -> Instrument | None:
    """The installed instrument, or ``None``."""
    return _installed


def instrumented_member(instrument: Instrument | None, patch: str, target: type, name: str, value: object) -> object:
    """What apply grafts for ``value``: the instrument's stand-in if it is of the same type, else ``value``."""
    if instrument is None:
        return value
    return _checked(instrument.member(patch, target, name, value), value, f"patch {patch!r}'s {name!r}")


def instrumented_original(instrument: Instrument | None, target: type, name: str, value: object) -> object:
    """What a patch reaches as the original ``value`` of ``target.name``: the instrument's stand-in, or ``value``."""
    if instrument is None:
        return value
    return _checked(instrument.original(target, name, value), value, f"the original of {target.__qualname__}.{name}")


def _checked(new: object, value: object, what: str) -> object:
    if new is value or type(new) is type(value):
        return new
    logger.warning(
        "vllm-custom-patches: the installed instrument gave a %s for %s, which is a %s; a stand-in must be "
        "of the same type (it would change how the member is called), so %s is grafted as it is",
        type(new).__name__,
        what,
        type(value).__name__,
        what,
    )
    return value
