"""Interleaved, repeated timing; ratios are taken per round, then summarised.

Absolute times on a shared machine drift by tens of percent within a minute,
so nothing here trusts them: in every round each subject is timed once, in an
order that rotates from round to round, and a subject's ratio to the baseline
is computed from the two samples of the *same* round.  The median of those
per-round ratios, with its interquartile range and min-max, is what the
benchmarks report.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import Any

UNROLL = 10
"""Calls per loop iteration: keeps the ``for`` loop's own cost small next to the calls."""

Timer = Callable[[int], int]
"""``timer(calls)`` makes ``calls`` calls (a multiple of :data:`UNROLL`) and returns the ns they took."""


def make_call_loop(obj: object, method: str = "m", arg: object = 1) -> Timer:
    """A timer calling ``obj.<method>(arg)``, compiled afresh for every ``obj``.

    Each timer gets its own code object, so the interpreter's per-instruction
    inline caches (the attribute and call specialisations of Python 3.11+) are
    never shared between the variants being compared.  The attribute lookup
    is inside the loop on purpose: binding a method per call is part of what
    a wrapper costs (``wrapt`` builds a bound wrapper there).
    """
    if not method.isidentifier():
        raise ValueError(f"not a method name: {method!r}")
    call = f"        _obj.{method}({arg!r})\n"
    source = (
        "def loop(calls, _obj=_obj, _repeat=_repeat, _clock=_clock):\n"
        "    t0 = _clock()\n"
        f"    for _ in _repeat(None, calls // {UNROLL}):\n"
        f"{call * UNROLL}"
        "    return _clock() - t0\n"
    )
    namespace: dict[str, Any] = {"_obj": obj, "_repeat": repeat, "_clock": time.perf_counter_ns}
    exec(compile(source, f"<call loop for {type(obj).__qualname__}>", "exec"), namespace)
    loop: Timer = namespace["loop"]
    return loop


def calibrate(timer: Timer, target_ns: float, min_calls: int, max_calls: int) -> int:
    """Calls per sample so that one sample takes about ``target_ns`` (clamped, multiple of UNROLL)."""
    probe = 2_000
    timer(probe)  # warm up: lets the interpreter specialise the loop and the callee
    per_call = min(timer(probe) for _ in range(5)) / probe
    calls = int(target_ns / max(per_call, 0.5))
    calls = max(min_calls, min(max_calls, calls))
    return max(UNROLL, calls // UNROLL * UNROLL)


@dataclass
class Subject:
    """One thing being timed."""

    key: str
    timer: Timer
    calls: int
    """Calls per sample."""


def interleave(
    subjects: Sequence[Subject],
    rounds: int,
    *,
    warmup_rounds: int = 2,
    max_seconds: float | None = None,
    min_rounds: int = 5,
) -> dict[str, list[float]]:
    """ns per call of each subject, one sample per round, timed in rotating order.

    Round ``r`` starts with subject ``r mod k``, so no subject is always first
    (or always right after a slow one).  The garbage collector is off while
    timing, as in :mod:`timeit`.  With ``max_seconds`` the run stops early
    (after at least ``min_rounds``) once that much time has passed.
    """
    samples: dict[str, list[float]] = {s.key: [] for s in subjects}
    k = len(subjects)
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    start = time.perf_counter()
    try:
        for r in range(-warmup_rounds, rounds):
            first = r % k
            for subject in [*subjects[first:], *subjects[:first]]:
                elapsed = subject.timer(subject.calls)
                if r >= 0:
                    samples[subject.key].append(elapsed / subject.calls)
            if max_seconds is not None and r + 1 >= min_rounds and time.perf_counter() - start > max_seconds:
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    return samples


def per_round_ratios(samples: Mapping[str, Sequence[float]], key: str, baseline: str) -> list[float]:
    """``samples[key][i] / samples[baseline][i]`` for every round ``i``."""
    return [a / b for a, b in zip(samples[key], samples[baseline], strict=True)]


@dataclass(frozen=True)
class Spread:
    """Median, quartiles and extremes of a list of numbers."""

    median: float
    q1: float
    q3: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        if not values:
            raise ValueError("no values")
        ordered = sorted(values)
        if len(ordered) >= 2:
            q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
        else:
            q1 = q3 = ordered[0]
        return cls(statistics.median(ordered), q1, q3, ordered[0], ordered[-1], len(ordered))

    def as_dict(self, digits: int = 4) -> dict[str, float | int]:
        return {
            "median": round(self.median, digits),
            "q1": round(self.q1, digits),
            "q3": round(self.q3, digits),
            "min": round(self.min, digits),
            "max": round(self.max, digits),
            "n": self.n,
        }


def summarize(samples: Mapping[str, Sequence[float]], baselines: Sequence[str]) -> dict[str, dict[str, Any]]:
    """For each subject: its ns/call spread and its per-round ratio spread to each baseline."""
    out: dict[str, dict[str, Any]] = {}
    for key, values in samples.items():
        entry: dict[str, Any] = {"ns_per_call": Spread.of(values)}
        for baseline in baselines:
            if baseline in samples:
                entry[f"ratio_vs_{baseline}"] = Spread.of(per_round_ratios(samples, key, baseline))
        out[key] = entry
    return out
