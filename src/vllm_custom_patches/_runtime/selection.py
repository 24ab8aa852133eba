"""Parsing ``VLLM_CUSTOM_PATCHES``, ``VLLM_CUSTOM_PATCHES_STRICT`` and ``VLLM_CUSTOM_PATCHES_TELEMETRY``.

Pure string handling: nothing here knows which patches exist, so a typo in a
*name* is caught later (by the plugin, which can list the available ones),
while a value that cannot mean anything is refused here.
"""

from __future__ import annotations

from dataclasses import dataclass

from .._core.errors import PatchConfigError
from .._core.spec import PATCH_NAME
from .._env import ENV_PATCHES, ENV_STRICT, ENV_TELEMETRY

__all__ = [
    "ENV_PATCHES", "ENV_STRICT", "ENV_TELEMETRY", "Selection", "parse_selection", "parse_strict", "parse_telemetry",
]  # fmt: skip


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


@dataclass(frozen=True)
class Selection:
    """Which patches ``VLLM_CUSTOM_PATCHES`` asks for.

    ``names`` are *explicit*: each must be applied or start-up fails (in
    strict mode), and they are applied first, in the order written.  With
    ``all``, every other known patch follows (sorted by name), except those in
    ``excluded``; those are best-effort and skipped where they cannot apply.
    """

    all: bool = False
    names: tuple[str, ...] = ()
    excluded: frozenset[str] = frozenset()

    @property
    def empty(self) -> bool:
        """True if nothing at all is selected."""
        return not self.all and not self.names

    def is_explicit(self, name: str) -> bool:
        return name in self.names

    def __str__(self) -> str:
        items = ["*"] if self.all else []
        items += self.names
        items += sorted("-" + name for name in self.excluded)
        return ",".join(items)


def parse_selection(value: str | None) -> Selection:
    """Parse a ``VLLM_CUSTOM_PATCHES`` value; raise :class:`PatchConfigError` if it cannot work.

    Items are comma-separated; whitespace around an item (and after ``-``) is
    ignored, and so are empty items, so ``"A, B,"`` equals ``"A,B"``.
    Repeating a name is harmless.  ``*`` may appear once, anywhere; ``-X``
    excludes ``X`` from ``*`` and is refused without ``*``, where it could
    only be a mistake (nothing is applied that is not listed anyway).
    """
    if value is None or not value.strip():
        return Selection()
    everything = False
    names: dict[str, None] = {}  # an ordered set
    excluded: set[str] = set()
    for raw_item in value.split(","):
        item = raw_item.strip()
        if not item:
            continue
        if item == "*":
            if everything:
                raise _config_error(value, "'*' appears more than once", "write it once")
            everything = True
            continue
        negated = item.startswith("-")
        name = item[1:].strip() if negated else item
        if not PATCH_NAME.fullmatch(name):
            raise _config_error(
                value,
                f"{item!r} is not a patch name",
                "a name starts with a letter or '_' and holds only letters, digits, '_' and '.'; "
                "write 'A,B' for those patches, '*' for all, '*,-B' for all but B",
            )
        if negated:
            excluded.add(name)
        else:
            names.setdefault(name, None)
    if excluded and not everything:
        listed = ", ".join(repr("-" + name) for name in sorted(excluded))
        raise _config_error(
            value,
            f"{listed} excludes from '*', but '*' is not in the list",
            "write '*,-NAME' to apply all but NAME, or list only the patches to apply",
        )
    both = sorted(excluded.intersection(names))
    if both:
        raise _config_error(
            value,
            f"{', '.join(map(repr, both))} is both selected and excluded",
            "keep one of the two",
        )
    return Selection(all=everything, names=tuple(names), excluded=frozenset(excluded))


def _parse_switch(name: str, value: str | None, *, default: bool, on: str, off: str) -> bool:
    """A boolean setting: 1/0, true/false, yes/no, on/off (any case); unset or empty: ``default``."""
    if value is None or not value.strip():
        return default
    word = value.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise PatchConfigError(
        f"{name}={value!r} is not a boolean. Set it to 1 ({on}) or 0 ({off}); "
        f"true/false, yes/no and on/off are accepted too."
    )


def parse_strict(value: str | None) -> bool:
    """Parse ``VLLM_CUSTOM_PATCHES_STRICT`` (unset or empty: strict)."""
    return _parse_switch(
        ENV_STRICT, value, default=True,
        on="default: a selected patch that cannot be applied stops start-up", off="log it and go on",
    )  # fmt: skip


def parse_telemetry(value: str | None) -> bool:
    """Parse ``VLLM_CUSTOM_PATCHES_TELEMETRY`` (unset or empty: off)."""
    return _parse_switch(
        ENV_TELEMETRY, value, default=False,
        on="time every patch applied: calls, own and total seconds, errors, per process",
        off="the default: no timing, nothing added to any call",
    )  # fmt: skip


def _config_error(value: str, problem: str, fix: str) -> PatchConfigError:
    return PatchConfigError(f"{ENV_PATCHES}={value!r}: {problem}; {fix}.")
