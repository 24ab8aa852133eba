"""Section: what per-patch telemetry (``VLLM_CUSTOM_PATCHES_TELEMETRY=1``) adds to a call, side by side with it off.

Each variant gets a fresh target class (``def m(self, x): return x + 1``) and
its own compiled call loop:

* **one patch**, not stackable, calling ``self._original_m(x) + 0`` (the
  ``percall`` patch), applied with telemetry off, and the same on a class of
  its own applied with telemetry on;
* **a 2-layer stack**: two ``stackable=True`` patches, each calling
  ``P.original("m")(self, x) + 0``, off and on;
* **unpatched**, for scale.

Telemetry on times each layer and the original it reaches: every call of
``obj.m(1)`` passes through one timing stand-in per layer and one timing shim
around the original.  Reported per variant: ns per call, and per round the
difference on - off (ns added per call; goal: at most 500 ns for one patch)
and the ratio on / off.  Telemetry is switched on only around the applies of
the "on" variants, so the "off" ones are exactly what apply grafts without it
(the same objects; ``tests/core/test_instrument.py`` proves that).
"""

from __future__ import annotations

import itertools
import time
from typing import Any

from ._common import RunOptions, SectionResult, Table, fmt_range, fmt_ratio
from ._timing import Spread, Subject, calibrate, interleave, make_call_loop

NAME = "telemetry"
TITLE = "Telemetry: per call with VLLM_CUSTOM_PATCHES_TELEMETRY off and on, side by side"
GOAL_NS = 500.0
"""Added per call of one patch, telemetry on against off."""

TARGET_SOURCE = """
class Target_{key}:
    def m(self, x):
        return x + 1
Target = Target_{key}
"""
SINGLE = """
class Single(VLLMPatch[Target]):
    name = PREFIX + "single"
    def m(self, x):
        return self._original_m(x) + 0
Single.apply()
obj = Target()
"""
STACK = """
for k in range(2):
    exec(
        f"class Layer{k}(VLLMPatch[Target], stackable=True, order={k}):\\n"
        f"    name = PREFIX + 'layer{k}'\\n"
        f"    def m(self, x):\\n"
        f"        return Layer{k}.original('m')(self, x) + 0\\n"
        f"Layer{k}.apply()",
        globals(),
    )
obj = Target()
"""
VARIANTS = {"single": SINGLE, "stack2": STACK, "unpatched": "obj = Target()\n"}
_names = itertools.count()


def _build(key: str, source: str) -> Any:
    from vllm_custom_patches import VLLMPatch

    namespace: dict[str, Any] = {"__name__": f"benchmarks.telemetry.{key}", "VLLMPatch": VLLMPatch}
    namespace["PREFIX"] = f"bench_telemetry_{next(_names)}_"
    exec(compile(TARGET_SOURCE.format(key=key), f"<target {key}>", "exec"), namespace)
    exec(compile(source, f"<variant {key}>", "exec"), namespace)
    obj = namespace["obj"]
    assert obj.m(1) == 2, f"{key}: obj.m(1) == {obj.m(1)!r}"
    return obj


def run(options: RunOptions) -> SectionResult:
    from vllm_custom_patches._runtime import telemetry
    from vllm_custom_patches.testing import isolated_registry

    started = time.perf_counter()
    rounds = options.rounds or (40 if options.quick else 200)
    max_seconds = None if options.rounds else (15.0 if options.quick else 60.0)
    data: dict[str, Any] = {"goal": f"one patch: at most {GOAL_NS:.0f} ns added per call", "variants": {}}
    was_on = telemetry.enabled()
    with isolated_registry():
        objects: dict[str, Any] = {}
        for key in ("single", "stack2"):
            objects[f"{key}_off"] = _build(f"{key}_off", VARIANTS[key])
            telemetry.enable()
            try:
                objects[f"{key}_on"] = _build(f"{key}_on", VARIANTS[key])
            finally:
                if not was_on:
                    telemetry.disable()
        objects["unpatched"] = _build("unpatched", VARIANTS["unpatched"])
        timed = [row for row in telemetry.rows() if row["patch"].startswith("bench_telemetry_")]
        assert len(timed) == 3 and all(row["calls"] >= 1 for row in timed), f"the 'on' variants are not timed: {timed}"
        subjects = [
            Subject(key, make_call_loop(obj), calibrate(make_call_loop(obj), 20e6, 20_000, 400_000))
            for key, obj in objects.items()
        ]
        samples = interleave(subjects, rounds, warmup_rounds=3, max_seconds=max_seconds)
    n_rounds = len(samples["unpatched"])
    rows = []
    for key, label in (("single", "one patch"), ("stack2", "2-layer stack")):
        off, on = samples[f"{key}_off"], samples[f"{key}_on"]
        added = Spread.of([b - a for a, b in zip(off, on, strict=True)])
        ratio = Spread.of([b / a for a, b in zip(off, on, strict=True)])
        layers = 1 if key == "single" else 2
        rows.append([
            label, f"{Spread.of(off).median:.1f}", f"{Spread.of(on).median:.1f}", f"{added.median:.0f}",
            fmt_range(added.q1, added.q3, 0), f"{added.median / layers:.0f}", fmt_ratio(ratio.median),
        ])  # fmt: skip
        data["variants"][key] = {
            "layers": layers,
            "off_ns_per_call": Spread.of(off).as_dict(2),
            "on_ns_per_call": Spread.of(on).as_dict(2),
            "added_ns_per_call": added.as_dict(1),
            "added_ns_per_layer": round(added.median / layers, 1),
            "on_vs_off": ratio.as_dict(),
        }
    data["unpatched_ns_per_call"] = Spread.of(samples["unpatched"]).as_dict(2)
    data["goal_met"] = data["variants"]["single"]["added_ns_per_call"]["median"] <= GOAL_NS
    table = Table(
        "Per call of obj.m(1), telemetry off and on (added: per-round difference on - off)",
        ["variant", "off ns/call", "on ns/call", "added ns", "IQR", "added per layer", "x off"],
        rows,
        [
            f"{n_rounds} rounds, every variant once per round in rotating order; unpatched: "
            f"{Spread.of(samples['unpatched']).median:.1f} ns/call; goal: one patch adds at most {GOAL_NS:.0f} ns "
            f"({'met' if data['goal_met'] else 'NOT met'}).",
            "On, each call passes one timing stand-in per layer and one shim around the original: two clock reads "
            "each (time.perf_counter_ns) and a few per-thread counter updates.",
        ],
    )
    return SectionResult(NAME, TITLE, [table], data, time.perf_counter() - started)
