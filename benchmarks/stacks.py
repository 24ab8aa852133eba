"""Section: stacks of stackable patches (issue 19) against hand-written nested grafts of the same depth.

Per call: a fresh target class (``def m(self, x): return x + 1``) gets ``D``
layers (D = 2 and 4), each returning ``<next layer>(x) + 0``:

* **hand-written nested grafts**, the reference: layer ``k`` keeps what
  ``Target.m`` was in ``Target._orig_m_k`` and calls ``self._orig_m_k(x)``
  (the hand-written graft of ``percall``, ``D`` times over);
* **hand-written, closures**: layer ``k`` captures what ``Target.m`` was in a
  closure and calls it, ``orig(self, x)``: the cheapest hand-written form,
  whose chain can never change again;
* **hand-written, next looked up per call**: layer ``k`` calls
  ``NEXT[k](self, x)``, a module-level dict: what resolving the chain at call
  time costs when written by hand;
* **vllm-custom-patches stack**: ``D`` patches ``stackable=True`` (distinct
  orders), each calling ``P.original("m")(self, x)``, which is resolved at
  every call (a layer rolled back or added later changes what it reaches).

``original()`` alone, in an outer and in the innermost layer (table entries)
and in a patch that is not stackable (which reads the target's
``_original_m`` at each call, as before stacks): ``P.original("m")`` against
the registry lookup it was
before (a Python class method: ``REGISTRY.applied.get(name)`` then
``getattr(target, "_original_m")``) and against one Python frame (calling a
trivial function), so that "costs more than a frame" can be read off.

Apply/rollback: the middle layer (second of four) of a 4-stack rolled back and
applied again, against a single patch of one member on a class of its own
(rolled back and applied the same way), interleaved.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from typing import Any

from ._common import RunOptions, SectionResult, Table, fmt_range, fmt_ratio
from ._timing import Spread, Subject, calibrate, interleave, make_call_loop, per_round_ratios, summarize

NAME = "stacks"
TITLE = "Stacks: per call against hand-written nested grafts; original(); apply/rollback of a middle layer"
DEPTHS = (2, 4)
GOAL = 1.05

TARGET_SOURCE = """
class Target_{key}:
    def m(self, x):
        return x + 1
Target = Target_{key}
"""
HAND = """
for k in range(DEPTH):
    setattr(Target, f"_orig_m_{k}", Target.__dict__["m"])
    exec(f"def m(self, x):\\n    return self._orig_m_{k}(x) + 0", globals())
    Target.m = m
obj = Target()
"""
CLOSURE = """
def layer(orig):
    def m(self, x):
        return orig(self, x) + 0
    return m
for k in range(DEPTH):
    Target.m = layer(Target.__dict__["m"])
obj = Target()
"""
LOOKUP = """
NEXT = {}
for k in range(DEPTH):
    NEXT[k] = Target.__dict__["m"]
    exec(f"def m(self, x):\\n    return NEXT[{k}](self, x) + 0", globals())
    Target.m = m
obj = Target()
"""
PLAIN = """
class Plain(VLLMPatch[Target]):
    name = PREFIX + "plain"
    def m(self, x):
        return Plain.original("m")(self, x) + 0
Plain.apply()
obj = Target()
"""
STACK = """
for k in range(DEPTH):
    exec(
        f"class Layer{k}(VLLMPatch[Target], stackable=True, order={k}):\\n"
        f"    name = PREFIX + '{k}'\\n"
        f"    def m(self, x):\\n"
        f"        return Layer{k}.original('m')(self, x) + 0\\n"
        f"Layer{k}.apply()",
        globals(),
    )
obj = Target()
"""
_names = itertools.count()


def _build(key: str, source: str, depth: int) -> object:
    from vllm_custom_patches import VLLMPatch

    namespace: dict[str, Any] = {"__name__": f"benchmarks.stacks.{key}", "DEPTH": depth, "VLLMPatch": VLLMPatch}
    namespace["PREFIX"] = f"bench_stack_{next(_names)}_"
    exec(compile(TARGET_SOURCE.format(key=key), f"<target {key}>", "exec"), namespace)
    exec(compile(source, f"<variant {key}>", "exec"), namespace)
    obj = namespace["obj"]
    assert obj.m(1) == 2, f"{key}: obj.m(1) == {obj.m(1)!r}"
    return obj


class _LegacyOriginal:
    """``original()`` as it was before stacks: a class method looking the patch up in the registry per call."""

    def __init__(self, patch: Any) -> None:
        from vllm_custom_patches._core.registry import REGISTRY

        registry, name = REGISTRY, patch.name

        class Legacy:
            @classmethod
            def original(cls, member: str) -> Any:
                record = registry.applied.get(name)
                return getattr(record.target, "_original_" + member)

        self.cls = Legacy


class _Frame:
    @staticmethod
    def original(member: str) -> str:
        return member


def _ratio_row(label: str, samples: dict[str, list[float]], key: str, ref: str) -> list[str]:
    ratio = Spread.of(per_round_ratios(samples, key, ref))
    ns = Spread.of(samples[key]).median
    return [
        label,
        f"{ns:.1f}",
        fmt_ratio(ratio.median),
        fmt_range(ratio.q1, ratio.q3, 3),
        fmt_range(ratio.min, ratio.max, 3),
    ]


def _op_timer(patch: Any, manager: Any, which: str) -> Callable[[int], int]:
    """ns spent in ``calls`` rollbacks (``which="rollback"``) or applies of ``patch``; the other op untimed."""
    clock = time.perf_counter_ns

    def timer(calls: int) -> int:
        spent = 0
        for _ in range(calls):
            if which == "rollback":
                t0 = clock()
                manager.rollback(patch)
                spent += clock() - t0
                manager.apply(patch)
            else:
                manager.rollback(patch)
                t0 = clock()
                manager.apply(patch)
                spent += clock() - t0
        return spent

    return timer


def run(options: RunOptions) -> SectionResult:
    from vllm_custom_patches import PatchManager, VLLMPatch
    from vllm_custom_patches.testing import isolated_registry

    started = time.perf_counter()
    rounds = options.rounds or (40 if options.quick else 200)
    max_seconds = None if options.rounds else (15.0 if options.quick else 90.0)
    tables: list[Table] = []
    data: dict[str, Any] = {"goal": f"stack / hand-written nested grafts <= {GOAL}", "depths": {}}
    with isolated_registry():
        # -- per call ------------------------------------------------------------------------
        objects: dict[str, object] = {}
        for depth in DEPTHS:
            for kind, source in (("hand", HAND), ("closure", CLOSURE), ("lookup", LOOKUP), ("stack", STACK)):
                objects[f"{kind}{depth}"] = _build(f"{kind}{depth}", source, depth)
        objects["unpatched"] = _build("unpatched", "obj = Target()\n", 0)
        subjects = [
            Subject(key, make_call_loop(obj), calibrate(make_call_loop(obj), 20e6, 20_000, 400_000))
            for key, obj in objects.items()
        ]
        # original() alone: the same stack's outermost layer, the legacy lookup, one frame.
        outer = PatchManager.get(next(n for n in PatchManager.applied() if n.endswith("_3")))
        innermost = PatchManager.get(next(n for n in PatchManager.applied() if n.endswith("_0")))
        single_obj = _build("plain", PLAIN, 1)
        single = PatchManager.get(next(n for n in PatchManager.applied() if n.endswith("_plain")))
        assert single_obj.m(1) == 2
        # The same table lookup on a plain class: what a patch class's metaclass costs (CPython 3.11
        # does not specialise an attribute load on a class whose metaclass is not type).
        plain = type("PlainClass", (), {"original": outer.original})
        lookups = {
            "original": outer,
            "innermost": innermost,
            "single": single,
            "plain": plain,
            "legacy": _LegacyOriginal(innermost).cls,
            "frame": _Frame,
        }
        for key, obj in lookups.items():
            timer = make_call_loop(obj, "original", "m")
            subjects.append(Subject(key, timer, calibrate(timer, 20e6, 20_000, 400_000)))
        samples = interleave(subjects, rounds, warmup_rounds=3, max_seconds=max_seconds)
        stats = summarize(samples, [])
        rows = []
        for depth in DEPTHS:
            hand, closure, lookup, stack = f"hand{depth}", f"closure{depth}", f"lookup{depth}", f"stack{depth}"
            rows.append(_ratio_row(f"{depth} layers: hand-written nested grafts", samples, hand, hand))
            rows.append(_ratio_row(f"{depth} layers: hand-written, closures", samples, closure, hand))
            rows.append(_ratio_row(f"{depth} layers: hand-written, next looked up per call", samples, lookup, hand))
            rows.append(_ratio_row(f"{depth} layers: vllm-custom-patches stack", samples, stack, hand))
            vs_hand = Spread.of(per_round_ratios(samples, stack, hand))
            vs_closure = Spread.of(per_round_ratios(samples, stack, closure))
            vs_lookup = Spread.of(per_round_ratios(samples, stack, lookup))
            data["depths"][depth] = {
                "ns_per_call": {k: stats[k]["ns_per_call"].as_dict(2) for k in (hand, closure, lookup, stack)},
                "stack_vs_hand": vs_hand.as_dict(),
                "stack_vs_closures": vs_closure.as_dict(),
                "stack_vs_lookup_per_call": vs_lookup.as_dict(),
                "goal_met": vs_hand.median <= GOAL,
            }
        rows.append(_ratio_row("unpatched", samples, "unpatched", "hand2"))
        n_rounds = len(samples["unpatched"])
        original_rows = [_ratio_row(label, samples, key, "frame") for key, label in (
            ("original", "P.original('m'), an outer layer (the table's entry)"),
            ("innermost", "P.original('m'), the innermost layer (its entry: vLLM's original)"),
            ("single", "P.original('m'), a patch that is not stackable (reads the target's _original_m)"),
            ("plain", "the same lookup on a class without metaclass"),
            ("legacy", "registry lookup per call (before stacks)"),
            ("frame", "one Python call (a frame)"),
        )]  # fmt: skip
        data["original"] = {
            key: {
                "ns_per_call": stats[key]["ns_per_call"].as_dict(2),
                "vs_frame": Spread.of(per_round_ratios(samples, key, "frame")).as_dict(),
            }
            for key in lookups
        }
        tables.append(
            Table(
                "Per call of obj.m(1) through D layers (x: per-round ratio to the hand-written nested grafts of the same depth)",
                ["variant", "ns/call", "x hand (median)", "IQR", "min-max"],
                rows,
                [
                    f"{n_rounds} rounds, every variant once per round in rotating order; goal: stack within "
                    f"{GOAL - 1:.0%} of the hand-written nested grafts.",
                    "The hand-written layers reach their original through an attribute (self._orig_m_k) or a closure, "
                    "fixed when written; each stack layer calls P.original('m'), resolved at every call.",
                ],
            )
        )
        tables.append(
            Table(
                "original() alone (x: per-round ratio to one Python call)",
                ["lookup", "ns/call", "x frame (median)", "IQR", "min-max"],
                original_rows,
            )
        )

        # -- apply / rollback of a middle layer ------------------------------------------------
        stack4 = type(objects["stack4"])
        middle = next(
            n for n in PatchManager.applied() if n.endswith("_2") and PatchManager.get(n)._vcp_spec.target is stack4
        )
        namespace: dict[str, Any] = {}
        exec(compile(TARGET_SOURCE.format(key="single"), "<target single>", "exec"), namespace)
        single_target = namespace["Target"]

        class Single(VLLMPatch[single_target]):  # type: ignore[valid-type,misc]
            name = f"bench_stack_single_{next(_names)}"

            def m(self, x: int) -> int:
                return Single.original("m")(self, x) + 0  # type: ignore[no-any-return]

        PatchManager.apply(Single)
        ops = {
            "middle_rollback": _op_timer(middle, PatchManager, "rollback"),
            "middle_apply": _op_timer(middle, PatchManager, "apply"),
            "single_rollback": _op_timer(Single, PatchManager, "rollback"),
            "single_apply": _op_timer(Single, PatchManager, "apply"),
        }
        op_rounds = options.rounds or (8 if options.quick else 30)
        op_samples = interleave(
            [Subject(key, timer, 50 if options.quick else 200) for key, timer in ops.items()],
            op_rounds,
            warmup_rounds=1,
        )
        assert stack4().m(1) == 2
        op_rows = []
        data["apply_rollback"] = {}
        for op in ("rollback", "apply"):
            mid, one = f"middle_{op}", f"single_{op}"
            ratio = Spread.of(per_round_ratios(op_samples, mid, one))
            us = Spread.of(op_samples[mid]).median / 1000
            us_single = Spread.of(op_samples[one]).median / 1000
            op_rows.append([f"{op} the middle layer of a 4-stack", f"{us:.1f}", f"{us_single:.1f}",
                            fmt_ratio(ratio.median), fmt_range(ratio.q1, ratio.q3, 2)])  # fmt: skip
            data["apply_rollback"][op] = {"middle_us": round(us, 2), "single_us": round(us_single, 2),
                                          "ratio": ratio.as_dict()}  # fmt: skip
        tables.append(
            Table(
                "Apply / rollback of the middle layer of a 4-stack, against one patch on a class of its own",
                ["operation", "us (median)", "single patch us", "x single", "IQR"],
                op_rows,
                [f"{len(op_samples['middle_apply'])} rounds of 50-200 operations each, interleaved"],
            )
        )
        PatchManager.rollback_all()
    return SectionResult(NAME, TITLE, tables, data, time.perf_counter() - started)
