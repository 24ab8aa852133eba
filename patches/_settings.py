"""Settings of catalogue patches: read from the environment when a patch is applied.

Every catalogue patch reads its configuration from ``VLLM_*`` environment
variables (vLLM's Ray executor copies every ``VLLM_*`` variable to remote
workers, so the same settings reach every node).  They are read **once, when
the patch is applied** -- under the plugin that is each vLLM process's
start-up -- and a bad value fails the apply with a
:class:`~vllm_custom_patches.PatchConfigError` naming the variable and the
fix, so vLLM refuses to start instead of running with a half-understood
setting.  To change a setting, restart vLLM (or, in-process, roll the patch
back and apply it again).

How: a patch declares ``_x_settings = AppliedSettings(parse)``.  The framework
grafts that member onto the target like any other and, as the class statement
would, calls its ``__set_name__`` with the target; that is the moment
``parse(os.environ)`` runs.  If it raises, the apply is undone atomically.
On the patch class itself (the class statement) nothing is read.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from typing import Generic, TypeVar, overload

from vllm_custom_patches import PatchConfigError, VLLMPatch

__all__ = ["AppliedSettings", "env_positive_float", "env_text", "env_weights"]

_S = TypeVar("_S")


class AppliedSettings(Generic[_S]):
    """A class attribute whose value is ``parse(os.environ)``, computed when the patch is applied."""

    def __init__(self, parse: Callable[[Mapping[str, str]], _S]) -> None:
        self._parse = parse
        self._value: _S | None = None
        self._loaded = False

    def __set_name__(self, owner: type, name: str) -> None:
        if isinstance(owner, type) and issubclass(owner, VLLMPatch):
            return  # the patch's own class statement: nothing is applied yet
        # Grafted onto the target: the patch is being applied.  Raising here
        # makes the framework undo the whole apply.
        self._value = self._parse(os.environ)
        self._loaded = True

    @overload
    def __get__(self, instance: None, owner: type) -> _S: ...
    @overload
    def __get__(self, instance: object, owner: type | None = None) -> _S: ...
    def __get__(self, instance: object, owner: type | None = None) -> _S:
        if not self._loaded:  # read through the patch class before any apply
            self._value = self._parse(os.environ)
            self._loaded = True
        return self._value  # type: ignore[return-value]

    def __repr__(self) -> str:
        shown = repr(self._value) if self._loaded else "not read yet"
        return f"<AppliedSettings {shown}>"


def env_text(environ: Mapping[str, str], name: str) -> str | None:
    """The variable's value with surrounding blanks removed; ``None`` if unset or blank."""
    value = environ.get(name, "").strip()
    return value or None


def env_positive_float(environ: Mapping[str, str], name: str, *, unit: str) -> float | None:
    """A finite number > 0 from ``name``; ``None`` if unset or blank."""
    text = env_text(environ, name)
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise PatchConfigError(
            f"{name}={environ[name]!r} is not a positive number of {unit}; set it to e.g. {name}=30, or unset it."
        )
    return value


def env_weights(environ: Mapping[str, str], name: str) -> dict[str, float]:
    """``"a=2,b=0.5"`` -> ``{"a": 2.0, "b": 0.5}``; empty if unset.  Weights must be finite and > 0."""
    text = env_text(environ, name)
    if text is None:
        return {}
    weights: dict[str, float] = {}
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        key, sep, number = item.partition("=")
        key = key.strip()
        try:
            weight = float(number) if sep else math.nan
        except ValueError:
            weight = math.nan
        if not key or not (math.isfinite(weight) and weight > 0):
            raise PatchConfigError(
                f"{name}={environ[name]!r}: {item!r} is not TENANT=WEIGHT with a weight > 0; "
                f"write e.g. {name}='gold=3,silver=1' (unlisted tenants weigh 1)."
            )
        if key in weights:
            raise PatchConfigError(f"{name}={environ[name]!r}: tenant {key!r} is listed twice; keep one.")
        weights[key] = weight
    return weights
