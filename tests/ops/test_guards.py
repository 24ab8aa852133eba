"""The guard language of a canary rollout (issue 20 item 4): grammar, its one-line errors, verdicts."""

from __future__ import annotations

import pytest

from vllm_custom_patches._ops.guards import (
    FIGURES,
    MAX_GUARDS,
    Guard,
    GuardError,
    evaluate,
    parse_guard,
    parse_guards,
)


@pytest.mark.parametrize(
    ("text", "figure", "op", "threshold", "relative", "canonical"),
    [
        ("ttft_p99<=1.2x", "ttft_p99", "<=", 1.2, True, "ttft_p99<=1.2x"),
        ("  ttft_p99 <= 1.2 X ", "ttft_p99", "<=", 1.2, True, "ttft_p99<=1.2x"),
        ("ttft_p99<=0.5", "ttft_p99", "<=", 0.5, False, "ttft_p99<=0.5"),
        ("TTFT_P99<=500ms", "ttft_p99", "<=", 0.5, False, "ttft_p99<=0.5"),
        ("e2e_p50<2s", "e2e_p50", "<", 2.0, False, "e2e_p50<2"),
        ("itl_p50<=1.1x", "itl_p50", "<=", 1.1, True, "itl_p50<=1.1x"),
        ("queue_p90<=0", "queue_p90", "<=", 0.0, False, "queue_p90<=0"),
        ("request_rate>=0.8x", "request_rate", ">=", 0.8, True, "request_rate>=0.8x"),
        ("token_rate>10", "token_rate", ">", 10.0, False, "token_rate>10"),
        ("errors==0", "errors", "==", 0.0, False, "errors==0"),
        ("failed_requests<=2x", "failed_requests", "<=", 2.0, True, "failed_requests<=2x"),
        ("patch_errors <= 3", "patch_errors", "<=", 3.0, False, "patch_errors<=3"),
    ],
)
def test_a_guard_parses_to_its_parts_and_canonical_text(
    text: str, figure: str, op: str, threshold: float, relative: bool, canonical: str
) -> None:
    guard = parse_guard(text)
    assert (guard.figure, guard.op, guard.relative) == (figure, op, relative)
    assert guard.threshold == pytest.approx(threshold)
    assert guard.text == str(guard) == canonical
    assert parse_guard(guard.text) == guard  # the canonical text reads back as the same guard


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("", "no operator"),
        ("ttft_p99", "no operator"),
        ("ttft_p99 1.2x", "no operator"),
        ("<=1.2x", "does not start with a figure"),
        ("ttfb_p99<=1.2x", "unknown figure 'ttfb_p99'; known: ttft_p50"),
        ("ttft_p95<=1.2x", "unknown figure 'ttft_p95'"),
        ("ttft_p99=1", "operator '=' is not known; use one of <= >= == < >"),
        ("ttft_p99!=1", "operator '!=' is not known"),
        ("ttft_p99=<1", "operator '=<' is not known"),
        ("ttft_p99<=", "threshold '' is not a number; give seconds (0.5, 500ms)"),
        ("ttft_p99<=fast", "threshold 'fast' is not a number"),
        ("ttft_p99<=1_0", "threshold '1_0' is not a number"),
        ("ttft_p99<=nan", "threshold 'nan' is not a number"),
        ("ttft_p99<=inf", "threshold 'inf' is not a number"),
        ("ttft_p99<=1e999", "is not a number"),
        ("request_rate>=5ms", "threshold '5ms' is not a number; give a multiple of the baseline"),
        ("errors==0s", "threshold '0s' is not a number; give a count, e.g. 0"),
        ("ttft_p99<=-1", "the threshold must be at least 0"),
        ("ttft_p99<=0x", "the threshold must be above 0"),
        ("ttft_p99==0.5", "'==' only compares counts (errors, failed_requests, patch_errors); use <= or >="),
        ("errors<=1x", "errors has no baseline (the patch runs only on the canary ranks); give an absolute count"),
        ("patch_errors==0x", "patch_errors has no baseline"),
        ("ttft_p99<=1\n", "contains control characters"),
        ("ttft_p99<=" + "1" * 200, "longer than 100 characters"),
    ],
)
def test_a_bad_guard_is_one_line_naming_the_problem_and_the_fix(text: str, names: str) -> None:
    with pytest.raises(GuardError) as caught:
        parse_guard(text)
    message = str(caught.value)
    assert names in message
    assert "\n" not in message and len(message) < 400
    assert isinstance(caught.value, ValueError)  # callers may treat it as any bad value


def test_unknown_figure_lists_every_known_figure() -> None:
    with pytest.raises(GuardError) as caught:
        parse_guard("latency<=1")
    assert all(figure in str(caught.value) for figure in FIGURES)


@pytest.mark.parametrize(
    ("value", "names"),
    [
        ("ttft_p99<=1.2x", "a list of strings"),
        (None, "a list of strings"),
        ({"ttft_p99<=1.2x": 1}, "a list of strings"),
        ([1], "a guard must be a string"),
        (["ttft_p99<=1.2x", "ttft_p99 <= 1.2x"], "guard 'ttft_p99<=1.2x' is given twice"),
        (["errors==0"] * (MAX_GUARDS + 1), f"at most {MAX_GUARDS}"),
    ],
)
def test_parse_guards_refuses_what_is_not_a_list_of_distinct_guards(value: object, names: str) -> None:
    with pytest.raises(GuardError, match=names.replace("(", r"\(").replace(")", r"\)")):
        parse_guards(value)  # type: ignore[arg-type]


def test_parse_guards_keeps_the_order_and_accepts_none() -> None:
    guards = parse_guards(["errors==0", "ttft_p99<=1.2x", "ttft_p99>=0.001"])
    assert [g.text for g in guards] == ["errors==0", "ttft_p99<=1.2x", "ttft_p99>=0.001"]
    assert parse_guards([]) == []
    assert parse_guards(("ttft_p50<=1",)) == [Guard("ttft_p50", "<=", 1.0, False)]


def _verdicts(texts: list[str], canary: dict[str, object], baseline: dict[str, object]) -> list[tuple[str, str]]:
    return [(v.guard, v.verdict) for v in evaluate(parse_guards(texts), canary, baseline)]


def test_a_relative_guard_compares_with_that_multiple_of_the_baseline() -> None:
    (verdict,) = evaluate(parse_guards(["ttft_p99<=1.2x"]), {"ttft_p99": 0.3}, {"ttft_p99": 0.2})
    assert verdict.verdict == "broken"
    assert (verdict.canary, verdict.baseline) == (0.3, 0.2)
    assert verdict.limit == pytest.approx(0.24)
    assert "breaks <= 0.24 (1.2 x baseline 0.2)" in verdict.why
    assert _verdicts(["ttft_p99<=1.2x"], {"ttft_p99": 0.24}, {"ttft_p99": 0.2}) == [("ttft_p99<=1.2x", "ok")]
    assert _verdicts(["request_rate>=0.8x"], {"request_rate": 0.7}, {"request_rate": 1.0}) == [
        ("request_rate>=0.8x", "broken")
    ]


def test_an_absolute_guard_ignores_the_baseline() -> None:
    assert _verdicts(["ttft_p99<=0.5"], {"ttft_p99": 0.4}, {}) == [("ttft_p99<=0.5", "ok")]
    assert _verdicts(["ttft_p99<0.4"], {"ttft_p99": 0.4}, {"ttft_p99": 9.0}) == [("ttft_p99<0.4", "broken")]
    assert _verdicts(["errors==0"], {"errors": 1}, {"errors": 0}) == [("errors==0", "broken")]
    assert _verdicts(["errors==0"], {"errors": 0}, {}) == [("errors==0", "ok")]


def test_an_unknown_figure_on_either_side_cannot_be_evaluated_and_says_why() -> None:
    canary = {"ttft_p99": None, "itl_p50": 0.02, "notes": {"ttft_p99": "no request finished in the window"}}
    baseline = {"itl_p50": None, "notes": {"itl_p50": "no request finished in the window"}}
    ttft, itl, itl_absolute = evaluate(
        parse_guards(["ttft_p99<=1.2x", "itl_p50<=1.1x", "itl_p50<=0.05"]), canary, baseline
    )
    assert ttft.verdict == "cannot_evaluate"
    assert ttft.why == "ttft_p99 is unknown on the canary ranks (no request finished in the window)"
    assert itl.verdict == "cannot_evaluate"
    assert itl.why == "itl_p50 is unknown on the baseline ranks (no request finished in the window)"
    assert itl.limit is None
    assert itl_absolute.verdict == "ok"  # an absolute guard needs only the canary's figure
    # Absent, NaN and non-numbers are unknown too, never a breach.
    for value in (None, float("nan"), "0.1", True):
        assert _verdicts(["e2e_p99<=1"], {"e2e_p99": value}, {}) == [("e2e_p99<=1", "cannot_evaluate")]


def test_a_multiple_of_a_zero_baseline_latency_or_rate_compares_nothing() -> None:
    (verdict,) = evaluate(parse_guards(["request_rate>=0.5x"]), {"request_rate": 1.0}, {"request_rate": 0.0})
    assert verdict.verdict == "cannot_evaluate"
    assert "0 on the baseline ranks" in verdict.why
    # A count's zero baseline is a real figure: twice no failures is no failures.
    assert _verdicts(["failed_requests<=2x"], {"failed_requests": 1}, {"failed_requests": 0}) == [
        ("failed_requests<=2x", "broken")
    ]


def test_a_figure_without_a_baseline_never_reads_the_baseline() -> None:
    (verdict,) = evaluate(parse_guards(["patch_errors==0"]), {"patch_errors": 0}, {"patch_errors": 5})
    assert (verdict.verdict, verdict.baseline) == ("ok", None)


def test_a_note_on_a_known_figure_is_repeated_in_the_verdict() -> None:
    canary = {"errors": 0, "notes": {"errors": "failed requests only: the patch's telemetry is off"}}
    (verdict,) = evaluate(parse_guards(["errors==0"]), canary, {})
    assert verdict.verdict == "ok"
    assert verdict.why.endswith("(failed requests only: the patch's telemetry is off)")
    assert verdict.as_dict() == {
        "guard": "errors==0",
        "verdict": "ok",
        "canary": 0.0,
        "baseline": None,
        "limit": 0.0,
        "why": verdict.why,
    }
