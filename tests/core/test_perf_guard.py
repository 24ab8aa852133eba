"""Regression guard for the per-call cost of a patched method (benchmark section 1, in brief).

A method grafted by this project is a plain function in the target's class
dict, and its original is another one reached as ``self._original_m``: per call
it must cost the same as the hand-written graft (``Target.m = f`` with the
original in an attribute).  This test fails if it gets more than ``BOUND``
times slower than that, so a change that slows every patched call down (a
wrapper around each graft, a per-call lookup) cannot land unnoticed.

Nothing absolute is asserted: the three variants are timed interleaved, in the
same process and the same rounds, and compared by ratio.  Against noise on
shared machines the ratio is taken from best-of-rounds times (and the median
of per-round ratios, whichever is lower), and a failing measurement is
repeated before the test fails.  The second test proves the guard can fail.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import percall  # noqa: E402
from benchmarks._timing import per_round_ratios  # noqa: E402

BOUND = 1.3
"""Generous: the benchmark's goal is 1.05 and the two measure ~1.00 apart; one extra Python call per graft measures ~1.4."""
ROUNDS = 25
CALLS = 60_000
ATTEMPTS = 3

UNPATCHED = percall.VARIANTS_BY_KEY["unpatched"]
HAND_GRAFT = percall.VARIANTS_BY_KEY["hand_graft"]
THIS_PROJECT = percall.VARIANTS_BY_KEY["vcp"]

# What a slow change to the framework would look like: every graft goes through
# one generic forwarding layer (as a tracing or error-wrapping decorator would add).
SLOW = percall.Variant(
    "slow_wrapped",
    "vllm-custom-patches with a generic wrapper around the graft",
    """
import functools
def _generic_layer(func):
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        return func(*args, **kwargs)
    return wrapper
class BenchPatch(VLLMPatch[Target]):
    name = PATCH_NAME
    @_generic_layer
    def m(self, x):
        return self._original_m(x) + 0
BenchPatch.apply()
obj = Target()
""",
    needs=("vcp",),
)


def _ratios_once(candidate: percall.Variant) -> tuple[float, float]:
    """(candidate / hand graft, hand graft / unpatched), each the lower of best-of-rounds and median per-round."""
    variants = [UNPATCHED, HAND_GRAFT, candidate]
    settings = percall.Settings(rounds=ROUNDS, sample_ns=0, warmup_rounds=2)
    with percall.patched_objects(variants) as (objects, unavailable):
        assert not unavailable, unavailable
        samples, _ = percall.measure(objects, settings, calls={v.key: CALLS for v in variants})

    def ratio(key: str, baseline: str) -> float:
        best = min(samples[key]) / min(samples[baseline])
        return min(best, statistics.median(per_round_ratios(samples, key, baseline)))

    return ratio(candidate.key, HAND_GRAFT.key), ratio(HAND_GRAFT.key, UNPATCHED.key)


def guard(candidate: percall.Variant) -> list[tuple[float, float]]:
    """Measure until the candidate is within BOUND, at most ATTEMPTS times; all measurements."""
    measured = []
    for _ in range(ATTEMPTS):
        measured.append(_ratios_once(candidate))
        if measured[-1][0] <= BOUND:
            break
    return measured


def test_patched_call_costs_about_the_same_as_a_hand_written_graft() -> None:
    measured = guard(THIS_PROJECT)
    ratio, graft_vs_unpatched = measured[-1]
    assert ratio <= BOUND, (
        f"a method patched by vllm-custom-patches costs {ratio:.2f}x the hand-written graft per call "
        f"(bound {BOUND}x; all attempts: {[round(r, 2) for r, _ in measured]}). "
        f"Run `python benchmarks/run.py --only percall` for the full picture."
    )
    # The measurement resolves one extra Python frame (the graft's), or it proves nothing.
    assert graft_vs_unpatched > 1.15, f"hand graft / unpatched = {graft_vs_unpatched:.2f}: timing is too coarse"


def test_guard_fails_for_a_slower_graft() -> None:
    measured = guard(SLOW)
    assert all(ratio > BOUND for ratio, _ in measured) and len(measured) == ATTEMPTS, (
        f"the guard did not catch a graft wrapped in one generic *args/**kwargs layer: "
        f"ratios {[round(r, 2) for r, _ in measured]} vs bound {BOUND}"
    )
