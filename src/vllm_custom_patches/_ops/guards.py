"""The guardrails of a canary rollout: ``ttft_p99<=1.2x``, ``errors==0``, ``itl_p50<=0.05``.

A guard is ``FIGURE OPERATOR THRESHOLD`` (spaces allowed between the parts):

* FIGURE, one of :data:`FIGURES`: a latency quantile of vLLM's own histograms on
  the canary ranks, in seconds (``ttft`` time to first token, ``itl``
  inter-token latency, ``e2e`` end-to-end request latency, ``queue`` time
  waiting to be scheduled; each ``_p50``, ``_p90`` or ``_p99``), a rate per
  second (``request_rate`` finished requests, ``token_rate`` generated tokens),
  or a count (see below);
* OPERATOR, one of ``<= < >= > ==`` (``==`` only for counts: a latency read
  from histogram buckets is never exact);
* THRESHOLD, absolute (``0.5``, ``500ms`` or ``0.5s`` for latencies; per second
  for rates; a count for counts) or relative, ``1.2x``: that multiple of the
  same figure on the baseline ranks (every data-parallel rank not in the
  rollout), over the same window.

The counts, over the window, on the canary ranks only:

* ``failed_requests``: requests that finished with vLLM's finish reason
  ``error`` (``vllm:request_success{finished_reason="error"}``); a client's
  abort is not a failure;
* ``patch_errors``: exceptions that left the patch's own code in the canary
  ranks' processes (the patch's telemetry, ``VLLM_CUSTOM_PATCHES_TELEMETRY=1``;
  without it this figure is unknown and a guard on it cannot be evaluated);
* ``errors``: ``failed_requests + patch_errors``; when telemetry is off it is
  ``failed_requests`` alone, and each verdict says so in its ``why``.

``patch_errors`` and ``errors`` have no relative form: the patch does not run
on the baseline ranks.

Each evaluation gives every guard a verdict: ``ok``, ``broken``, or
``cannot_evaluate`` when a figure it needs is unknown (no request finished on
one side in the window, no inter-token samples, telemetry off). A guard that
cannot be evaluated never counts as broken: the guardian does nothing and says
so.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "COUNTS", "FIGURES", "LATENCIES", "MAX_GUARDS", "OPERATORS", "RATES", "VERDICTS", "Guard", "GuardError",
    "Verdict", "evaluate", "parse_guard", "parse_guards",
]  # fmt: skip

QUANTILES = ("p50", "p90", "p99")
LATENCIES = tuple(f"{kind}_{q}" for kind in ("ttft", "itl", "e2e", "queue") for q in QUANTILES)
"""Latency figures, seconds."""
RATES = ("request_rate", "token_rate")
"""Per second over the window."""
COUNTS = ("errors", "failed_requests", "patch_errors")
"""Counts over the window, canary ranks only."""
FIGURES = (*LATENCIES, *RATES, *COUNTS)
NO_BASELINE = frozenset({"errors", "patch_errors"})
"""Figures of the patch itself, which does not run on the baseline ranks."""

OPERATORS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le,
    ">=": operator.ge,
    "==": operator.eq,
    "<": operator.lt,
    ">": operator.gt,
}
VERDICTS = ("ok", "broken", "cannot_evaluate")
MAX_GUARDS = 16
MAX_LENGTH = 100

_EXAMPLE = "e.g. ttft_p99<=1.2x (1.2 times the baseline ranks') or ttft_p99<=0.5 (seconds)"
_OPERATOR = re.compile(r"<=|>=|==|!=|=<|=>|<|>|=")


class GuardError(ValueError):
    """A guard that cannot be parsed; the message names the problem and the fix, on one line."""


@dataclass(frozen=True)
class Guard:
    """One parsed guard; ``text`` is its canonical spelling (``ttft_p99<=1.2x``)."""

    figure: str
    op: str
    threshold: float
    relative: bool

    @property
    def text(self) -> str:
        return f"{self.figure}{self.op}{self.threshold:g}{'x' if self.relative else ''}"

    def __str__(self) -> str:
        return self.text

    def limit(self, baseline: float | None) -> float | None:
        """The value the canary's figure is compared with (None: the baseline's is unknown)."""
        if not self.relative:
            return self.threshold
        return None if baseline is None else self.threshold * baseline

    def holds(self, value: float, limit: float) -> bool:
        return OPERATORS[self.op](value, limit)


def _show(text: str) -> str:
    shown = ascii(text) if not text.isprintable() else repr(text)
    return shown if len(shown) <= 60 else shown[:57] + "..."


def parse_guard(text: object) -> Guard:
    """One guard from its text, or a :class:`GuardError`."""
    if not isinstance(text, str):
        raise GuardError(f"a guard must be a string such as 'ttft_p99<=1.2x', not {type(text).__name__}")
    if len(text) > MAX_LENGTH:
        raise GuardError(f"guard {_show(text)} is longer than {MAX_LENGTH} characters; {_EXAMPLE}")
    if not text.isprintable():
        raise GuardError(
            f"guard {_show(text)} contains control characters; write FIGURE OPERATOR THRESHOLD, {_EXAMPLE}"
        )
    found = _OPERATOR.search(text)
    if found is None:
        raise GuardError(
            f"guard {_show(text)} has no operator; write FIGURE OPERATOR THRESHOLD with one of "
            f"{' '.join(OPERATORS)}, {_EXAMPLE}"
        )
    name, op, value = text[: found.start()].strip(), found.group(), text[found.end() :].strip()
    if not name:
        raise GuardError(
            f"guard {_show(text)} does not start with a figure; write FIGURE OPERATOR THRESHOLD, {_EXAMPLE}"
        )
    figure = name.lower()
    if figure not in FIGURES:
        raise GuardError(f"guard {_show(text)}: unknown figure {name!r}; known: {', '.join(FIGURES)}")
    if op not in OPERATORS:
        raise GuardError(f"guard {_show(text)}: operator {op!r} is not known; use one of {' '.join(OPERATORS)}")
    if op == "==" and figure not in COUNTS:
        raise GuardError(
            f"guard {_show(text)}: '==' only compares counts ({', '.join(COUNTS)}); "
            f"use <= or >= for {figure}, e.g. {figure}<=1.2x"
        )
    relative = value.lower().endswith("x")
    if relative and figure in NO_BASELINE:
        raise GuardError(
            f"guard {_show(text)}: {figure} has no baseline (the patch runs only on the canary ranks); "
            f"give an absolute count, e.g. {figure}==0"
        )
    unit = 1.0
    number = value[:-1].rstrip() if relative else value
    if not relative and figure in LATENCIES:
        lowered = number.lower()
        if lowered.endswith("ms"):
            number, unit = number[:-2].rstrip(), 0.001
        elif lowered.endswith("s"):
            number = number[:-1].rstrip()
    try:
        threshold = float(number)
    except ValueError:
        threshold = math.nan
    if not number or not math.isfinite(threshold) or "_" in number:
        hint = (
            "seconds (0.5, 500ms) or a multiple of the baseline ranks' (1.2x)"
            if figure in LATENCIES
            else "a multiple of the baseline ranks' (0.8x) or a number per second"
            if figure in RATES
            else "a count, e.g. 0"
        )
        raise GuardError(f"guard {_show(text)}: threshold {value!r} is not a number; give {hint}")
    if threshold < 0 or (relative and threshold == 0):
        raise GuardError(
            f"guard {_show(text)}: the threshold must be {'above' if relative else 'at least'} 0; {_EXAMPLE}"
        )
    return Guard(figure, op, threshold * unit, relative)


def parse_guards(texts: Sequence[str]) -> list[Guard]:
    """Every guard of a rollout, in order, or a :class:`GuardError` for the first bad one (or a repeat)."""
    if isinstance(texts, (str, bytes)) or not isinstance(texts, Sequence):
        raise GuardError(
            f"guards must be a list of strings such as ['ttft_p99<=1.2x', 'errors==0'], not {type(texts).__name__}"
        )
    if len(texts) > MAX_GUARDS:
        raise GuardError(f"{len(texts)} guards given; at most {MAX_GUARDS}")
    guards: list[Guard] = []
    for text in texts:
        guard = parse_guard(text)
        if guard in guards:
            raise GuardError(f"guard {guard.text!r} is given twice; give each once")
        guards.append(guard)
    return guards


@dataclass(frozen=True)
class Verdict:
    """One guard, judged on one window's figures."""

    guard: str
    verdict: str
    """ok, broken or cannot_evaluate."""
    canary: float | None
    baseline: float | None
    limit: float | None
    """What the canary's figure was compared with (the threshold, or threshold x baseline)."""
    why: str
    """One line for the log, the CLI and the rollout record."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "guard": self.guard,
            "verdict": self.verdict,
            "canary": self.canary,
            "baseline": self.baseline,
            "limit": self.limit,
            "why": self.why,
        }


def _figure(figures: Mapping[str, Any], name: str) -> float | None:
    value = figures.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _unknown(figures: Mapping[str, Any], name: str, side: str) -> str:
    notes = figures.get("notes")
    note = notes.get(name) if isinstance(notes, Mapping) else None
    return f"{name} is unknown on the {side} ranks" + (f" ({note})" if note else "")


def evaluate(guards: Sequence[Guard], canary: Mapping[str, Any], baseline: Mapping[str, Any]) -> list[Verdict]:
    """Each guard's verdict on one window's figures of the canary and the baseline ranks.

    A figures mapping holds :data:`FIGURES` as numbers (None or absent: unknown)
    and may hold ``notes``, figure -> why it is unknown or partial, which the
    verdict's ``why`` repeats.
    """
    verdicts = []
    for guard in guards:
        value = _figure(canary, guard.figure)
        base = _figure(baseline, guard.figure) if guard.figure not in NO_BASELINE else None
        limit = guard.limit(base)
        if value is None:
            verdicts.append(
                Verdict(guard.text, "cannot_evaluate", None, base, limit, _unknown(canary, guard.figure, "canary"))
            )
            continue
        if guard.relative and (base is None or (base == 0 and guard.figure not in COUNTS)):
            why = (
                _unknown(baseline, guard.figure, "baseline")
                if base is None
                else f"{guard.figure} is 0 on the baseline ranks; a multiple of it compares nothing"
            )
            verdicts.append(Verdict(guard.text, "cannot_evaluate", value, base, None, why))
            continue
        assert limit is not None
        held = guard.holds(value, limit)
        against = f"{limit:.6g}" + (f" ({guard.threshold:g} x baseline {base:.6g})" if guard.relative else "")
        why = f"canary {guard.figure} {value:.6g} {'meets' if held else 'breaks'} {guard.op} {against}"
        notes = canary.get("notes")
        if isinstance(notes, Mapping) and notes.get(guard.figure):
            why += f" ({notes[guard.figure]})"
        verdicts.append(Verdict(guard.text, "ok" if held else "broken", value, base, limit, why))
    return verdicts
