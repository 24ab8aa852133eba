"""What runs inside the child process of the real-engine benchmark (``benchmarks/engine.py``).

Run as ``python -P benchmarks/_engine_child.py SPEC_JSON`` with the environment
the parent sets up (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, the tiny model's
``ENGINE_ENV``, temporary ``VLLM_CACHE_ROOT`` / ``VLLM_RPC_BASE_PATH``, no
``VLLM_CUSTOM_PATCHES``).  It builds ONE in-process vLLM engine on the tiny
model (``vllm_custom_patches.testing``; dummy weights, token-id prompts)
and then runs phases on it, each the same fixed batch of requests through
``llm.generate``:

* warm-up phases first (not reported), both variants;
* then pairs of one **unpatched** and one **patched** phase, in ABBA order
  (pair ``i`` runs unpatched first when ``i`` is even, patched first when it is
  odd), so a slow drift of the machine does not favour either variant.  Between
  phases of different variants the pass-through patch is applied with
  ``PatchManager.apply`` or rolled back with ``PatchManager.rollback``, on the
  live engine.

The patch is the smallest real one: ``Scheduler.schedule`` and
``Scheduler.update_from_output`` (both called once per engine step) replaced
by methods that only call ``self._original_...``.  Each phase records its wall
time, the number of engine steps (``llm.llm_engine.step`` calls, counted by a
wrapper installed for every phase alike) and the generated token ids, which
must be the same in every phase.

Prints one line ``ENGINE-JSON {...}`` at the end (vLLM logs to stdout too).
Everything that starts the engine is under the ``__main__`` guard.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import sys
import tempfile
import time
from typing import Any

MARKER = "ENGINE-JSON "
SCHEDULER = "vllm.v1.core.sched.scheduler:Scheduler"
PATCH_NAME = "bench_engine_pass_through"


def prompt_ids(index: int, length: int) -> list[int]:
    """A deterministic prompt of ``length`` token ids, different for each ``index``."""
    return [10 + (index * 37 + k * 13) % 980 for k in range(length)]


def define_patch() -> type:
    from vllm_custom_patches import VLLMPatch

    class PassThrough(VLLMPatch[SCHEDULER]):  # type: ignore[misc]
        """Pass-through on the two scheduler methods every engine step calls once."""

        name = PATCH_NAME

        def schedule(self, *args: Any, **kwargs: Any) -> Any:
            return self._original_schedule(*args, **kwargs)

        def update_from_output(self, *args: Any, **kwargs: Any) -> Any:
            return self._original_update_from_output(*args, **kwargs)

    return PassThrough


def main(spec: dict[str, Any]) -> dict[str, Any]:
    clock, cpu_clock = time.perf_counter, time.process_time
    result: dict[str, Any] = {"pid": os.getpid(), "spec": spec}
    t0 = clock()
    import vllm

    from vllm_custom_patches import PatchManager
    from vllm_custom_patches.testing import ENGINE_KWARGS, write_tiny_model

    result["import_vllm_s"] = clock() - t0
    result["vllm_version"] = getattr(vllm, "__version__", None)
    patch = define_patch()

    with tempfile.TemporaryDirectory(prefix="vcp-bench-model-") as tmp:
        model = write_tiny_model(os.path.join(tmp, "model"), tokenizer=False)
        t0 = clock()
        llm = vllm.LLM(
            model=str(model),
            skip_tokenizer_init=True,
            enable_prefix_caching=False,  # every phase computes the same work
            seed=0,
            **ENGINE_KWARGS,
        )
        result["engine_start_s"] = clock() - t0

    from vllm.v1.core.sched.scheduler import Scheduler

    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler  # InprocClient -> EngineCore -> scheduler
    result["scheduler_class"] = f"{type(scheduler).__module__}.{type(scheduler).__qualname__}"
    if not isinstance(scheduler, Scheduler):
        raise RuntimeError(f"the engine's scheduler is a {type(scheduler)!r}, not a Scheduler: the patch would not run")
    original_schedule = type(scheduler).schedule
    original_update = type(scheduler).update_from_output

    steps = 0
    engine_step = engine.step

    def counting_step() -> Any:
        nonlocal steps
        steps += 1
        return engine_step()

    engine.step = counting_step  # an instance attribute: the same cost in every phase

    prompts = [
        {"prompt_token_ids": prompt_ids(i, spec["prompt_min"] + i % (spec["prompt_max"] - spec["prompt_min"] + 1))}
        for i in range(spec["requests"])
    ]
    params = vllm.SamplingParams(temperature=0, max_tokens=spec["max_tokens"], ignore_eos=True, seed=0)
    patched = False

    def set_variant(want: bool) -> None:
        nonlocal patched
        if want and not patched:
            PatchManager.apply(patch)
            cls = type(scheduler)
            if cls.schedule is original_schedule or cls.update_from_output is original_update:
                raise RuntimeError("the pass-through patch did not replace the scheduler's methods")
        elif patched and not want:
            PatchManager.rollback(patch)
            cls = type(scheduler)
            if cls.schedule is not original_schedule or cls.update_from_output is not original_update:
                raise RuntimeError("rolling back the pass-through patch did not restore the scheduler's methods")
        patched = want

    def phase(want_patched: bool) -> dict[str, Any]:
        nonlocal steps
        set_variant(want_patched)
        gc.collect()
        steps = 0
        c0, t0 = cpu_clock(), clock()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        elapsed, cpu = clock() - t0, cpu_clock() - c0
        tokens = [list(out.outputs[0].token_ids) for out in outputs]
        if any(len(t) != spec["max_tokens"] for t in tokens):
            raise RuntimeError(f"expected {spec['max_tokens']} tokens per request, got {[len(t) for t in tokens]}")
        digest = hashlib.sha256(json.dumps(tokens).encode()).hexdigest()[:16]
        return {"patched": want_patched, "s": elapsed, "cpu_s": cpu, "steps": steps, "requests": len(prompts),
                "tokens": sum(map(len, tokens)), "outputs_sha256": digest}  # fmt: skip

    warmup = [phase(v) for v in [False, True] * spec["warmup_pairs"]]
    pairs: list[dict[str, Any]] = []
    started = clock()
    for i in range(spec["pairs"]):
        first_patched = i % 2 == 1
        a = phase(first_patched)
        b = phase(not first_patched)
        unpatched, patched_phase = (b, a) if first_patched else (a, b)
        pairs.append({"unpatched": unpatched, "patched": patched_phase, "patched_first": first_patched})
        if spec.get("max_seconds") and i + 1 >= spec["min_pairs"] and clock() - started > spec["max_seconds"]:
            break
    set_variant(False)
    result["measure_s"] = clock() - started
    result["warmup"] = warmup
    result["pairs"] = pairs
    result["status_after"] = {s.name: s.state.value for s in PatchManager.status() if s.name == PATCH_NAME}
    return result


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    report = main(spec)
    sys.stdout.flush()
    print(MARKER + json.dumps(report), flush=True)
