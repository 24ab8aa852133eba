"""Section 3: apply and rollback throughput.

1,000 patches over 100 target classes (10 methods each, every patch replaces
one method and calls its original): time applying all of them one by one,
then ``PatchManager.rollback_all()``.  The baseline is a hand-written loop
doing the same raw work -- keep the original under a second name, set the
replacement, record both, and undo it all last-first -- with no checks.
After every rollback each class's ``__dict__`` must be identical (names and
object identities) to before, checked with ``testing.snapshot_namespace``.

The patch classes are defined inside ``testing.isolated_registry()`` so the
process-wide registry is as before when the section ends.
"""

from __future__ import annotations

import gc
import time
import types
from dataclasses import dataclass
from typing import Any

from ._common import RunOptions, SectionResult, Table, fmt_range, fmt_ratio
from ._timing import Spread

NAME = "throughput"
TITLE = "3. Apply and rollback throughput (1,000 patches over 100 classes)"

N_CLASSES = 100
N_METHODS = 10
_MISSING = object()


def _method_code(j: int, template: str) -> types.CodeType:
    namespace: dict[str, Any] = {}
    exec(compile(template.format(j=j), f"<throughput m{j}>", "exec"), namespace)
    return namespace["f"].__code__  # type: ignore[no-any-return]


def make_targets() -> list[type]:
    """100 fresh classes, each with methods ``m0`` .. ``m9`` (``return x + j``)."""
    codes = [_method_code(j, "def f(self, x):\n    return x + {j}\n") for j in range(N_METHODS)]
    targets = []
    for i in range(N_CLASSES):
        body: dict[str, Any] = {"__module__": __name__}
        for j, code in enumerate(codes):
            fn = types.FunctionType(code, {}, f"m{j}")
            fn.__qualname__ = f"BenchTarget{i:03d}.m{j}"
            body[f"m{j}"] = fn
        targets.append(type(f"BenchTarget{i:03d}", (), body))
    return targets


def make_patches(targets: list[type]) -> list[type]:
    """One ``VLLMPatch`` per (class, method); must run inside ``isolated_registry()``."""
    from vllm_custom_patches import VLLMPatch

    codes = [_method_code(j, "def f(self, x):\n    return self._original_m{j}(x) + 0\n") for j in range(N_METHODS)]
    patches = []
    for i, target in enumerate(targets):
        binding = VLLMPatch[target]  # type: ignore[valid-type]
        for j, code in enumerate(codes):
            fn = types.FunctionType(code, globals(), f"m{j}")
            name = f"bench_tp_{i:03d}_m{j}"
            patches.append(type(binding)(name, (binding,), {"__module__": __name__, "name": name, f"m{j}": fn}))
    return patches


def _hand_functions(targets: list[type]) -> list[tuple[type, str, object]]:
    codes = [_method_code(j, "def f(self, x):\n    return self._orig_m{j}(x) + 0\n") for j in range(N_METHODS)]
    return [
        (target, f"m{j}", types.FunctionType(code, {}, f"m{j}")) for target in targets for j, code in enumerate(codes)
    ]


def hand_apply(work: list[tuple[type, str, object]], log: list[tuple[type, str, object]]) -> None:
    """The baseline: raw record of what each class held, keep the original, set the replacement."""
    for target, name, func in work:
        namespace = target.__dict__
        original = namespace[name]
        keep = "_orig_" + name
        log.append((target, keep, namespace.get(keep, _MISSING)))
        setattr(target, keep, original)
        log.append((target, name, original))
        setattr(target, name, func)


def hand_restore(log: list[tuple[type, str, object]]) -> None:
    for target, name, old in reversed(log):
        if old is _MISSING:
            delattr(target, name)
        else:
            setattr(target, name, old)
    log.clear()


def _check_patched(targets: list[type], attr_prefix: str) -> None:
    """Every method is replaced, forwards to its original, and that original is kept."""
    for target in targets:
        obj = target()
        for j in range(N_METHODS):
            assert obj.__class__.__dict__[f"{attr_prefix}m{j}"] is not None
            assert getattr(obj, f"m{j}")(1) == 1 + j


@dataclass
class _Round:
    vcp_apply: float
    vcp_rollback: float
    hand_apply: float
    hand_restore: float


def run(options: RunOptions) -> SectionResult:
    from vllm_custom_patches import PatchManager
    from vllm_custom_patches.testing import isolated_registry, snapshot_namespace

    started = time.perf_counter()
    rounds = options.rounds or (3 if options.quick else 15)
    clock = time.perf_counter_ns
    results: list[_Round] = []
    with isolated_registry():
        targets = make_targets()
        snapshots = [snapshot_namespace(t) for t in targets]
        t0 = clock()
        patches = make_patches(targets)
        define_ns = clock() - t0
        work = _hand_functions(targets)
        already = set(PatchManager.applied())
        n = len(patches)
        gc_was_enabled = gc.isenabled()
        gc.collect()
        gc.disable()
        try:
            for r in range(rounds + 1):  # round 0 warms up and is not reported
                order = ("vcp", "hand") if r % 2 == 0 else ("hand", "vcp")
                times: dict[str, float] = {}
                for which in order:
                    if which == "vcp":
                        t0 = clock()
                        for patch in patches:
                            patch.apply()
                        t1 = clock()
                        _check_patched(targets, "_original_")
                        t2 = clock()
                        done = PatchManager.rollback_all()
                        t3 = clock()
                        assert len(done) == n and not (set(PatchManager.applied()) - already), (
                            "rollback_all left patches"
                        )
                        times["vcp_apply"], times["vcp_rollback"] = t1 - t0, t3 - t2
                    else:
                        log: list[tuple[type, str, object]] = []
                        t0 = clock()
                        hand_apply(work, log)
                        t1 = clock()
                        _check_patched(targets, "_orig_")
                        t2 = clock()
                        hand_restore(log)
                        t3 = clock()
                        times["hand_apply"], times["hand_restore"] = t1 - t0, t3 - t2
                    for snap in snapshots:
                        snap.assert_unchanged()
                    gc.collect()
                if r:
                    results.append(_Round(**times))
        finally:
            if gc_was_enabled:
                gc.enable()

    def per_patch_us(values: list[float]) -> Spread:
        return Spread.of([v / n / 1e3 for v in values])

    stats = {
        "vcp_apply": per_patch_us([x.vcp_apply for x in results]),
        "vcp_rollback": per_patch_us([x.vcp_rollback for x in results]),
        "hand_apply": per_patch_us([x.hand_apply for x in results]),
        "hand_restore": per_patch_us([x.hand_restore for x in results]),
    }
    ratios = {
        "apply": Spread.of([x.vcp_apply / x.hand_apply for x in results]),
        "rollback": Spread.of([x.vcp_rollback / x.hand_restore for x in results]),
    }
    rows = []
    for label, key, ratio in (
        ("vllm-custom-patches: apply (one by one)", "vcp_apply", ratios["apply"]),
        ("vllm-custom-patches: rollback_all()", "vcp_rollback", ratios["rollback"]),
        ("hand-written setattr loop: apply", "hand_apply", None),
        ("hand-written setattr loop: restore", "hand_restore", None),
    ):
        s = stats[key]
        rows.append(
            [
                label,
                f"{s.median:.2f}",
                f"{1e6 / s.median:,.0f}",
                f"{s.median * n / 1e3:.1f}",
                fmt_ratio(ratio.median) if ratio else "1.00x",
                fmt_range(ratio.q1, ratio.q3) if ratio else "-",
                fmt_range(ratio.min, ratio.max) if ratio else "-",
            ]
        )
    notes = [
        f"{len(results)} rounds of apply-all then roll-back-all, project and baseline alternating first;"
        f" ratios per round, then median. Defining the {n} patch classes took {define_ns / 1e6:.0f} ms (not included).",
        f"after every rollback all {N_CLASSES} classes' __dict__ were identical to before (snapshot_namespace).",
    ]
    table = Table(
        TITLE,
        ["operation", "us/patch", "patches/s", "ms total", "x hand loop", "IQR", "min-max"],
        rows,
        notes,
    )
    data = {
        "classes": N_CLASSES,
        "methods_per_class": N_METHODS,
        "patches": n,
        "rounds": len(results),
        "define_patch_classes_ms": round(define_ns / 1e6, 2),
        "us_per_patch": {k: v.as_dict(3) for k, v in stats.items()},
        "patches_per_second": {k: round(1e6 / v.median) for k, v in stats.items()},
        "ratio_vs_hand_loop": {k: v.as_dict() for k, v in ratios.items()},
        "namespaces_identical_after_rollback": True,
    }
    return SectionResult(NAME, TITLE, [table], data, time.perf_counter() - started)
