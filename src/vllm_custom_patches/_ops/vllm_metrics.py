"""vLLM's own request metrics, per data-parallel engine, from its Prometheus text (``/metrics``).

What vLLM 0.32 publishes (``vllm/v1/metrics/loggers.py``, ``PrometheusStatLogger``):
every series carries the labels ``model_name`` (the served model name) and
``engine``, the engine's index, which is its data-parallel rank (the API
server's stat loggers are made for ``engine_ranks_managed``). The ones read
here:

=======================================  ==========  ==============================================
series                                   kind        figure
=======================================  ==========  ==============================================
``vllm:time_to_first_token_seconds``     histogram   ``ttft_*``
``vllm:inter_token_latency_seconds``     histogram   ``itl_*`` (0.32's name; older releases had
                                                     ``vllm:time_per_output_token_seconds``)
``vllm:e2e_request_latency_seconds``     histogram   ``e2e_*``
``vllm:request_queue_time_seconds``      histogram   ``queue_*`` (time in WAITING)
``vllm:request_success_total``           counter     ``requests``, ``request_rate`` (every
                                                     ``finished_reason``); ``failed_requests``
                                                     (``finished_reason="error"``)
``vllm:generation_tokens_total``         counter     ``token_rate``
=======================================  ==========  ==============================================

These are recorded in the API server as outputs arrive. With several API
servers (``vllm serve --data-parallel-size N`` starts N) vLLM turns on
prometheus_client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``) and
``/metrics`` sums every API server's counters and histograms, still per
``engine``: any API server's ``/metrics`` is the whole server's, and so is
:func:`read_local` in any of them.

A :class:`Snapshot` is the cumulative state at one instant; the difference of
two (:meth:`Snapshot.since`) is a :class:`Window`; the figures of a set of
ranks over a window (:meth:`Window.figures`) are quantiles of the summed
histograms and rates of the summed counters. A counter that went down between
the two snapshots (an engine's metrics re-created, e.g. by elastic scaling)
counts from zero, as Prometheus' ``rate`` does.

Quantiles are estimated from cumulative buckets as Prometheus'
``histogram_quantile`` does: find the bucket holding the rank, interpolate
linearly inside it (from 0 in the first bucket); a rank in the ``+Inf`` bucket
reads as the largest finite bound. So a quantile is only as fine as the
buckets (vLLM 0.32's defaults, ``vllm/v1/metrics/buckets.py``, unless
``--custom-histogram-buckets`` changes them):

* time to first token: 1, 5, 10, 20, 40, 60, 80, 100, 250, 500, 750 ms, 1, 2.5, 5, 7.5, 10 s, ...
* inter-token latency: 10, 25, 50, 75, 100, 150, 200, 300, 400, 500, 750 ms, 1, 2.5 s, ...
* end-to-end and queue time: 0.3, 0.5, 0.8, 1, 1.5, 2, 2.5, 5, 10, 15, 20, 30 s, ...

Two sides whose observations all fall in one bucket read the same: every
queue time under 0.3 s gives ``queue_p99`` = 0.297 s on both. A guard can only
tell apart what lands in different buckets; a TTFT guard sees a slowdown of
tens of milliseconds, an end-to-end guard rarely one under a second.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "COUNTERS", "HISTOGRAMS", "Histogram", "MetricsError", "Snapshot", "Window", "parse", "quantile", "read_local",
]  # fmt: skip

HISTOGRAMS: dict[str, str] = {
    "ttft": "vllm:time_to_first_token_seconds",
    "itl": "vllm:inter_token_latency_seconds",
    "e2e": "vllm:e2e_request_latency_seconds",
    "queue": "vllm:request_queue_time_seconds",
}
"""Figure prefix -> vLLM's histogram (seconds)."""
REQUESTS = "vllm:request_success_total"
TOKENS = "vllm:generation_tokens_total"
COUNTERS = ("requests", "failed_requests", "generation_tokens")
QUANTILES = {"p50": 0.5, "p90": 0.9, "p99": 0.99}
ENGINE_LABEL = "engine"
FAILED_REASON = "error"
"""vLLM's ``FinishReason.ERROR``: a request-level internal error, answered 500."""

_SAMPLES = tuple(
    [f"{name}_{part}" for name in HISTOGRAMS.values() for part in ("bucket", "count", "sum")] + [REQUESTS, TOKENS]
)
_BY_SAMPLE = {f"{name}_{part}": (key, part) for key, name in HISTOGRAMS.items() for part in ("bucket", "count", "sum")}


class MetricsError(ValueError):
    """The text is not Prometheus' exposition format, or not vLLM's metrics; one line."""


@dataclass(frozen=True)
class Histogram:
    """Cumulative buckets, ``(upper bound, count)`` in ascending order, the last one ``+Inf``."""

    buckets: tuple[tuple[float, float], ...]
    sum: float = 0.0

    @property
    def count(self) -> float:
        return self.buckets[-1][1] if self.buckets else 0.0

    def plus(self, other: Histogram) -> Histogram:
        if not self.buckets:
            return other
        if not other.buckets:
            return self
        if [b for b, _ in self.buckets] != [b for b, _ in other.buckets]:
            raise MetricsError("two engines' histograms have different buckets; they cannot be summed")
        return Histogram(
            tuple((b, n + m) for (b, n), (_, m) in zip(self.buckets, other.buckets, strict=True)), self.sum + other.sum
        )

    def minus(self, earlier: Histogram) -> Histogram:
        """What was observed since ``earlier``; all of self if it was reset since (a bucket went down)."""
        if not earlier.buckets or [b for b, _ in self.buckets] != [b for b, _ in earlier.buckets]:
            return self
        if any(n < m for (_, n), (_, m) in zip(self.buckets, earlier.buckets, strict=True)):
            return self
        return Histogram(
            tuple((b, n - m) for (b, n), (_, m) in zip(self.buckets, earlier.buckets, strict=True)),
            self.sum - earlier.sum,
        )


def quantile(q: float, histogram: Histogram) -> float | None:
    """The ``q`` quantile (0 < q < 1) as Prometheus' ``histogram_quantile``; None with no observation."""
    buckets = histogram.buckets
    total = histogram.count
    if not buckets or total <= 0 or not 0 < q < 1:
        return None
    rank = q * total
    # The first bucket reaching the rank; the +Inf one (the total) always does.
    index = next(i for i, (_, cumulative) in enumerate(buckets) if cumulative >= rank)
    bound, cumulative = buckets[index]
    if math.isinf(bound):
        # Beyond the largest finite bound: that bound is all a histogram can say.
        return buckets[-2][0] if len(buckets) > 1 else None
    start, below = (0.0, 0.0) if index == 0 else buckets[index - 1]
    if index == 0 and bound <= 0:
        return bound
    return start + (bound - start) * (rank - below) / (cumulative - below)


@dataclass(frozen=True)
class EngineState:
    """One engine's cumulative figures."""

    histograms: Mapping[str, Histogram] = field(default_factory=dict)
    counters: Mapping[str, float] = field(default_factory=dict)

    def plus(self, other: EngineState) -> EngineState:
        keys = set(self.histograms) | set(other.histograms)
        empty = Histogram(())
        return EngineState(
            {k: self.histograms.get(k, empty).plus(other.histograms.get(k, empty)) for k in keys},
            {
                k: self.counters.get(k, 0.0) + other.counters.get(k, 0.0)
                for k in set(self.counters) | set(other.counters)
            },
        )


@dataclass(frozen=True)
class Snapshot:
    """Every engine's cumulative state at ``at`` (seconds on the reader's clock)."""

    at: float
    engines: Mapping[int, EngineState]

    def since(self, earlier: Snapshot | None) -> Window:
        """What happened between ``earlier`` and this snapshot (everything so far when ``earlier`` is None)."""
        if earlier is None:
            return Window(math.nan, dict(self.engines))
        engines = {}
        empty = EngineState()
        for rank, now in self.engines.items():
            before = earlier.engines.get(rank, empty)
            reset = any(now.counters.get(k, 0.0) < v for k, v in before.counters.items())
            engines[rank] = EngineState(
                {k: h.minus(before.histograms.get(k, Histogram(()))) for k, h in now.histograms.items()},
                dict(now.counters) if reset else {k: v - before.counters.get(k, 0.0) for k, v in now.counters.items()},
            )
        return Window(self.at - earlier.at, engines)

    def to_json(self) -> dict[str, Any]:
        """A compact, JSON-safe form (for a rollout record); :meth:`from_json` reads it back."""
        return {
            "at": self.at,
            "engines": {
                str(rank): {
                    "histograms": {
                        k: {
                            "bounds": [_bound(b) for b, _ in h.buckets],
                            "counts": [n for _, n in h.buckets],
                            "sum": h.sum,
                        }
                        for k, h in sorted(state.histograms.items())
                    },
                    "counters": dict(sorted(state.counters.items())),
                }
                for rank, state in sorted(self.engines.items())
            },
        }

    @classmethod
    def from_json(cls, data: object) -> Snapshot:
        try:
            assert isinstance(data, dict)
            engines = {}
            for rank, state in data["engines"].items():
                histograms = {}
                for key, h in state["histograms"].items():
                    bounds = [float(b) for b in h["bounds"]]
                    counts = [float(n) for n in h["counts"]]
                    assert len(bounds) == len(counts)
                    histograms[str(key)] = Histogram(tuple(zip(bounds, counts, strict=True)), float(h["sum"]))
                counters = {str(k): float(v) for k, v in state["counters"].items()}
                engines[int(rank)] = EngineState(histograms, counters)
            return cls(float(data["at"]), engines)
        except (AssertionError, AttributeError, KeyError, TypeError, ValueError):
            raise MetricsError("a metrics snapshot of an unexpected shape") from None


def _bound(value: float) -> float | str:
    return "+Inf" if math.isinf(value) else value


@dataclass(frozen=True)
class Window:
    """What each engine observed over ``duration_s`` seconds (NaN: since the engines started)."""

    duration_s: float
    engines: Mapping[int, EngineState]

    def ranks(self) -> list[int]:
        return sorted(self.engines)

    def total(self, ranks: Iterable[int]) -> EngineState:
        state = EngineState()
        for rank in ranks:
            if rank in self.engines:
                state = state.plus(self.engines[rank])
        return state

    def figures(self, ranks: Iterable[int]) -> dict[str, Any]:
        """The figures of these ranks together: latency quantiles, rates, counts, and ``notes`` on the unknown ones."""
        wanted = sorted(set(ranks))
        state = self.total(wanted)
        figures: dict[str, Any] = {"dp_ranks": wanted}
        notes: dict[str, str] = {}
        missing = [rank for rank in wanted if rank not in self.engines]
        requests = state.counters.get("requests", 0.0)
        for key in HISTOGRAMS:
            histogram = state.histograms.get(key, Histogram(()))
            for name, q in QUANTILES.items():
                figures[f"{key}_{name}"] = quantile(q, histogram)
                if figures[f"{key}_{name}"] is None:
                    notes[f"{key}_{name}"] = _why_empty(key, requests, missing)
        figures["requests"] = requests
        figures["failed_requests"] = state.counters.get("failed_requests", 0.0)
        figures["generation_tokens"] = state.counters.get("generation_tokens", 0.0)
        duration = self.duration_s
        for name, counter in (("request_rate", "requests"), ("token_rate", "generation_tokens")):
            if duration > 0:
                figures[name] = state.counters.get(counter, 0.0) / duration
            else:
                figures[name] = None
                notes[name] = (
                    "no time window (a single reading)"
                    if math.isnan(duration)
                    else f"a window of {duration:g} s (do the clocks of the two readings agree?)"
                )
        if missing:
            for name in ("requests", "failed_requests", "generation_tokens"):
                notes[name] = f"vLLM publishes no metrics for rank(s) {', '.join(map(str, missing))}"
        figures["notes"] = notes
        return figures


def _why_empty(key: str, requests: float, missing: list[int]) -> str:
    if missing:
        return f"vLLM publishes no metrics for rank(s) {', '.join(map(str, missing))}"
    if key == "itl" and requests > 0:
        return "no inter-token samples in the window (requests of one output token)"
    return "no request finished in the window"


def parse(text: str, at: float) -> Snapshot:
    """The engines' state in vLLM's ``/metrics`` text, read at ``at``.

    Only vLLM's series named above are read (other lines are skipped before
    parsing, which keeps this cheap on a large page); series without an
    ``engine`` label that is an integer are ignored; several model names of
    one engine are summed.
    """
    from prometheus_client.parser import text_string_to_metric_families

    lines = [line for line in text.splitlines() if line.startswith(_SAMPLES)]
    buckets: dict[tuple[int, str], dict[float, float]] = {}
    sums: dict[tuple[int, str], float] = {}
    counters: dict[int, dict[str, float]] = {}
    try:
        samples = [
            sample for family in text_string_to_metric_families("\n".join(lines) + "\n") for sample in family.samples
        ]
    except Exception as exc:  # the parser raises ValueError and others on malformed lines
        raise MetricsError(f"the metrics text is not Prometheus' exposition format ({_first_line(exc)})") from None
    for sample in samples:
        try:
            rank = int(sample.labels.get(ENGINE_LABEL, ""))
        except ValueError:
            continue
        value = float(sample.value)
        if sample.name in _BY_SAMPLE:
            key, part = _BY_SAMPLE[sample.name]
            if part == "bucket":
                try:
                    bound = float(sample.labels["le"])
                except (KeyError, ValueError):
                    raise MetricsError(f"a {sample.name} sample without a valid 'le' label") from None
                cell = buckets.setdefault((rank, key), {})
                cell[bound] = cell.get(bound, 0.0) + value
            elif part == "sum":
                sums[(rank, key)] = sums.get((rank, key), 0.0) + value
            counters.setdefault(rank, {})
        elif sample.name == REQUESTS:
            mine = counters.setdefault(rank, {})
            mine["requests"] = mine.get("requests", 0.0) + value
            if sample.labels.get("finished_reason") == FAILED_REASON:
                mine["failed_requests"] = mine.get("failed_requests", 0.0) + value
        elif sample.name == TOKENS:
            mine = counters.setdefault(rank, {})
            mine["generation_tokens"] = mine.get("generation_tokens", 0.0) + value
    engines: dict[int, EngineState] = {}
    for rank in sorted(counters.keys() | {rank for rank, _ in buckets}):
        histograms = {
            key: Histogram(tuple(sorted(buckets[(r, key)].items())), sums.get((r, key), 0.0))
            for (r, key) in buckets
            if r == rank
        }
        for key, histogram in histograms.items():
            if not histogram.buckets or not math.isinf(histogram.buckets[-1][0]):
                raise MetricsError(f"{HISTOGRAMS[key]} of engine {rank} has no +Inf bucket")
        own = counters.get(rank, {})
        engines[rank] = EngineState(histograms, {name: own.get(name, 0.0) for name in COUNTERS})
    return Snapshot(at, engines)


def _first_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]


def read_local() -> str:
    """This API server's ``/metrics`` text as vLLM serves it, without HTTP.

    vLLM's route serves ``vllm.v1.metrics.prometheus.get_prometheus_registry()``:
    the process's registry, or, with several API servers (multiprocess mode),
    a collector over every API server's files: the whole server's figures.
    """
    from prometheus_client import generate_latest
    from vllm.v1.metrics.prometheus import get_prometheus_registry

    text: bytes = generate_latest(get_prometheus_registry())
    return text.decode()


def reader(read: Callable[[], str], clock: Callable[[], float]) -> Callable[[], Snapshot]:
    """A function taking a :class:`Snapshot` from ``read`` at ``clock()``."""

    def take() -> Snapshot:
        at = clock()
        return parse(read(), at)

    return take
