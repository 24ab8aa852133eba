"""Section 1: per-call cost of a patched method that calls its original.

Every variant gets its own, freshly compiled but identical target class
(``def m(self, x): return x + 1``) and patches ``m`` so that it returns
``<original>(x) + 0``, reaching the original in the way that is idiomatic for
its tool.  The exact source of every variant is in :data:`VARIANTS` (and in
the JSON).  Each variant's call loop is compiled separately too, so the
interpreter's inline caches are never shared between variants.

ArcticInference keeps no original for you.  Its own patches (``vllm/patches.py``,
``vllm/stats.py``, ``vllm/config.py`` in the 0.3.0 sdist) capture it in the
patch-class body before applying, ``_orig_x = Target.x``, and call
``self._orig_x(...)``; ``apply_patch`` then copies that attribute onto the
target along with the method, so the variant below does exactly that.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

from . import _thirdparty
from ._common import RunOptions, SectionResult, Table, Unavailable, fmt_range, fmt_ratio
from ._timing import Subject, calibrate, interleave, make_call_loop, summarize

NAME = "percall"
TITLE = "1. Per-call cost of a patched method that calls its original"

BASELINE = "unpatched"
REFERENCE = "hand_graft"
TARGET_VS_GRAFT = 1.05
"""The goal: this project within 5% of the hand-written graft."""

TARGET_SOURCE = """
class Target_{key}:
    def m(self, x):
        return x + 1
Target = Target_{key}
"""


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    source: str
    """Runs with ``Target`` (a fresh class) in its namespace and must bind ``obj``."""
    needs: tuple[str, ...] = ()
    """Names of providers in :data:`PROVIDERS` whose results are put in the namespace."""
    note: str = ""


VARIANTS: tuple[Variant, ...] = (
    Variant("unpatched", "unpatched", "obj = Target()\n"),
    Variant(
        "hand_graft",
        "hand-written graft",
        """
Target._orig_m = Target.__dict__["m"]   # the original, a plain function, kept in an attribute
def m(self, x):
    return self._orig_m(x) + 0
Target.m = m
obj = Target()
""",
    ),
    Variant(
        "vcp",
        "vllm-custom-patches",
        """
class BenchPatch(VLLMPatch[Target]):
    name = PATCH_NAME
    def m(self, x):
        return self._original_m(x) + 0
BenchPatch.apply()
obj = Target()
""",
        needs=("vcp",),
    ),
    Variant(
        "subclass",
        "subclass + super()",
        """
class Sub(Target):
    def m(self, x):
        return super().m(x) + 0
obj = Sub()
""",
    ),
    Variant(
        "wrapt",
        "wrapt.wrap_function_wrapper",
        """
def wrapper(wrapped, instance, args, kwargs):
    return wrapped(*args, **kwargs) + 0
wrapt.wrap_function_wrapper(Target, "m", wrapper)
obj = Target()
""",
        needs=("wrapt",),
    ),
    Variant(
        "gorilla",
        "gorilla get_original_attribute",
        """
def m(self, x):
    return gorilla.get_original_attribute(self, "m")(x) + 0
gorilla.apply(gorilla.Patch(Target, "m", m, gorilla.Settings(allow_hit=True, store_hit=True)))
obj = Target()
""",
        needs=("gorilla",),
        note="the original looked up on every call, as gorilla documents",
    ),
    Variant(
        "gorilla_captured",
        "gorilla, original captured once",
        """
def m(self, x):
    return _original(self, x) + 0
gorilla.apply(gorilla.Patch(Target, "m", m, gorilla.Settings(allow_hit=True, store_hit=True)))
_original = gorilla.get_original_attribute(Target, "m")   # once, after apply; a module global
obj = Target()
""",
        needs=("gorilla",),
        note="not gorilla's documented idiom: the original fetched once and kept in a global",
    ),
    Variant(
        "arctic",
        "ArcticInference ArcticPatch",
        """
class BenchPatch(ArcticPatch[Target]):
    _orig_m = Target.m      # ArcticInference's idiom: capture the original before apply
    def m(self, x):
        return self._orig_m(x) + 0
BenchPatch.apply_patch()
obj = Target()
""",
        needs=("arctic",),
    ),
)
VARIANTS_BY_KEY = {v.key: v for v in VARIANTS}

_patch_names = itertools.count()


def _provide_vcp(options: RunOptions) -> dict[str, Any]:
    from vllm_custom_patches import VLLMPatch

    return {"VLLMPatch": VLLMPatch, "PATCH_NAME": f"bench_percall_{next(_patch_names)}"}


def _provide_wrapt(options: RunOptions) -> dict[str, Any]:
    try:
        import wrapt
    except ImportError as exc:
        raise Unavailable(f"wrapt not installed ({exc})") from None
    return {"wrapt": wrapt}


def _provide_gorilla(options: RunOptions) -> dict[str, Any]:
    return {"gorilla": _thirdparty.gorilla()}


def _provide_arctic(options: RunOptions) -> dict[str, Any]:
    return {"ArcticPatch": _thirdparty.arctic_patch(options.cache_dir, offline=options.offline)}


PROVIDERS: dict[str, Callable[[RunOptions], dict[str, Any]]] = {
    "vcp": _provide_vcp,
    "wrapt": _provide_wrapt,
    "gorilla": _provide_gorilla,
    "arctic": _provide_arctic,
}


def build(variant: Variant, options: RunOptions | None = None) -> object:
    """A fresh target class patched as ``variant`` says; returns an instance to call ``m`` on.

    Raises :class:`Unavailable` if a library it needs cannot be had, and
    ``AssertionError`` if the result does not behave (``obj.m(1) == 2``, and
    the method really is replaced, except for ``unpatched``).
    """
    options = options or RunOptions()
    namespace: dict[str, Any] = {"__name__": f"benchmarks.percall.{variant.key}"}
    for need in variant.needs:
        namespace.update(PROVIDERS[need](options))
    exec(compile(TARGET_SOURCE.format(key=variant.key), f"<target {variant.key}>", "exec"), namespace)
    target = namespace["Target"]
    original = vars(target)["m"]
    exec(compile(variant.source, f"<variant {variant.key}>", "exec"), namespace)
    obj = namespace["obj"]
    assert obj.m(1) == 2, f"{variant.key}: obj.m(1) == {obj.m(1)!r}, expected 2"
    replaced = vars(type(obj)).get("m") is not original
    assert replaced == (variant.key != BASELINE), f"{variant.key}: m replaced is {replaced}"
    return obj


@contextmanager
def patched_objects(
    variants: Sequence[Variant], options: RunOptions | None = None
) -> Iterator[tuple[dict[str, object], dict[str, str]]]:
    """Build every variant; yields (key -> object, key -> why unavailable).

    Patches made with this project are applied inside an isolated registry
    and rolled back when the block ends.
    """
    from vllm_custom_patches.testing import isolated_registry

    with ExitStack() as stack:
        stack.enter_context(isolated_registry())
        objects: dict[str, object] = {}
        unavailable: dict[str, str] = {}
        for variant in variants:
            try:
                objects[variant.key] = build(variant, options)
            except Unavailable as exc:
                unavailable[variant.key] = str(exc)
        yield objects, unavailable


@dataclass
class Settings:
    rounds: int
    sample_ns: float
    min_calls: int = 20_000
    max_calls: int = 400_000
    max_seconds: float | None = None
    warmup_rounds: int = 3


def settings_for(options: RunOptions) -> Settings:
    if options.quick:
        s = Settings(rounds=80, sample_ns=4e6, min_calls=10_000, max_calls=100_000, max_seconds=10.0, warmup_rounds=2)
    else:
        # About 8 variants x 25 ms x 250 rounds ~ 50 s, capped at 70 s on a slow day.
        s = Settings(rounds=250, sample_ns=25e6, max_seconds=70.0)
    if options.rounds is not None:
        s.rounds, s.max_seconds = options.rounds, None
    return s


def measure(
    objects: dict[str, object], settings: Settings, calls: dict[str, int] | None = None
) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Interleaved samples (ns/call) of ``obj.m(1)`` for each object; calls per sample calibrated unless given."""
    subjects = []
    for key, obj in objects.items():
        timer = make_call_loop(obj)
        n = calls[key] if calls else calibrate(timer, settings.sample_ns, settings.min_calls, settings.max_calls)
        subjects.append(Subject(key, timer, n))
    samples = interleave(
        subjects,
        settings.rounds,
        warmup_rounds=settings.warmup_rounds,
        max_seconds=settings.max_seconds,
    )
    return samples, {s.key: s.calls for s in subjects}


def run(options: RunOptions) -> SectionResult:
    started = time.perf_counter()
    settings = settings_for(options)
    with patched_objects(VARIANTS, options) as (objects, unavailable):
        samples, calls = measure(objects, settings)
    stats = summarize(samples, [BASELINE, REFERENCE])

    rows: list[list[str]] = []
    data_variants: list[dict[str, Any]] = []
    for variant in VARIANTS:
        entry: dict[str, Any] = {"key": variant.key, "label": variant.label, "source": variant.source.strip()}
        if variant.note:
            entry["note"] = variant.note
        if variant.key in unavailable:
            entry["unavailable"] = unavailable[variant.key]
            rows.append([variant.label, "unavailable", "-", "-", "-", "-"])
            data_variants.append(entry)
            continue
        st = stats[variant.key]
        ns, vs_base, vs_ref = st["ns_per_call"], st.get(f"ratio_vs_{BASELINE}"), st.get(f"ratio_vs_{REFERENCE}")
        entry.update(
            calls_per_sample=calls[variant.key],
            ns_per_call=ns.as_dict(2),
            ratio_vs_unpatched=vs_base.as_dict() if vs_base else None,
            ratio_vs_hand_graft=vs_ref.as_dict() if vs_ref else None,
        )
        data_variants.append(entry)
        rows.append(
            [
                variant.label,
                f"{ns.median:.1f}",
                fmt_ratio(vs_base.median) if vs_base else "-",
                fmt_ratio(vs_ref.median) if vs_ref else "-",
                fmt_range(vs_ref.q1, vs_ref.q3, 3) if vs_ref and variant.key != REFERENCE else "-",
                fmt_range(vs_ref.min, vs_ref.max, 3) if vs_ref and variant.key != REFERENCE else "-",
            ]
        )

    n_rounds = len(next(iter(samples.values()))) if samples else 0
    notes = [
        f"{n_rounds} rounds; each round times every variant once ({', '.join(f'{k} {v // 1000}k' for k, v in calls.items())} calls),"
        " in rotating order; ratios are per round, then median.",
        "IQR and min-max are the spread of the per-round ratio to the hand-written graft.",
    ]
    verdict: dict[str, Any] = {"goal": f"vcp / hand_graft <= {TARGET_VS_GRAFT}"}
    if "vcp" in stats and REFERENCE in stats:
        r = stats["vcp"][f"ratio_vs_{REFERENCE}"]
        ok = r.median <= TARGET_VS_GRAFT
        verdict.update(median=round(r.median, 4), met=ok)
        notes.append(
            f"goal (this project within {TARGET_VS_GRAFT - 1:.0%} of the hand-written graft): "
            f"{'met' if ok else 'NOT met'}, median {r.median:.3f} (IQR {r.q1:.3f}-{r.q3:.3f})."
        )
    notes += [f"{v.label}: {v.note}" for v in VARIANTS if v.note and v.key not in unavailable]
    notes += [f"{VARIANTS_BY_KEY[k].label}: unavailable ({why})" for k, why in unavailable.items()]
    table = Table(
        TITLE,
        ["variant", "ns/call", "x unpatched", "x hand graft", "IQR (x graft)", "min-max (x graft)"],
        rows,
        notes,
    )
    data = {
        "settings": {
            "rounds_requested": settings.rounds,
            "rounds_done": n_rounds,
            "target_sample_ms": settings.sample_ns / 1e6,
            "max_seconds": settings.max_seconds,
            "calls_unrolled_per_loop_iteration": 10,
            "call_under_test": "obj.m(1) (attribute lookup and call inside the timed loop)",
        },
        "baseline": BASELINE,
        "reference": REFERENCE,
        "goal": verdict,
        "variants": data_variants,
        "arctic_inference": _thirdparty.arctic_info() or None,
    }
    return SectionResult(NAME, TITLE, [table], data, time.perf_counter() - started)
