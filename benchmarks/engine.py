"""Section 5: a real vLLM engine's throughput with a pass-through patch on the scheduler.

One child process (``benchmarks/_engine_child.py``) builds ONE in-process vLLM
engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) on the tiny model of
``vllm_custom_patches.testing`` (dummy weights, token-id prompts, no
download) and runs the same batch of requests through ``llm.generate`` again
and again: first warm-up phases, then pairs of one phase without any patch and
one with a pass-through patch on ``Scheduler.schedule`` and
``Scheduler.update_from_output`` (applied and rolled back on the live engine
between phases; ABBA order inside the pairs).  Both methods run once per engine
step, so this is the hot path a scheduler patch sits on.

Reported: requests/s and engine steps/s of each variant (medians), and the
ratio patched/unpatched of the requests/s of the two phases of the same pair,
summarised as median, interquartile range and min-max.  The target is a median
ratio of at least 0.99.  The same ratio over the child's CPU time
(``time.process_time``) is shown too: it leaves out the time the process
waited for a CPU, so it is less noisy where other work shares the machine.  The generated token ids of every phase must be the
same (temperature 0, ``ignore_eos``), and the run says whether they were.

The child runs with ``VLLM_CPU_OMP_THREADS_BIND=nobind`` and
``OMP_NUM_THREADS=1`` unless the environment sets them: vLLM's automatic binding
pins the in-process engine's threads to one CPU, the same one any other vLLM on
the machine pins itself to, and phases then stalled up to 25x on a shared
2-core machine.  The patch's cost does not depend on that; the noise does.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ._common import ROOT, RunOptions, SectionResult, Table, fmt_range
from ._timing import Spread

NAME = "engine"
TITLE = "5. Real engine (vLLM on CPU, tiny model, in-process): pass-through patch on Scheduler.schedule + update_from_output"

CHILD = Path(__file__).resolve().parent / "_engine_child.py"
MARKER = "ENGINE-JSON "
TARGET_RATIO = 0.99

#: The batch every phase runs: requests, prompt lengths (cycling through the range), tokens generated each.
REQUESTS = 64
PROMPT_MIN, PROMPT_MAX = 8, 24
MAX_TOKENS = 16

_VARS_CLEARED = ("VLLM_PLUGINS", "PYTHONPATH")
_THREAD_DEFAULTS = {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1"}


def spec_for(options: RunOptions) -> dict[str, Any]:
    """What the child does: the batch, warm-up, pairs and the time cap on the pairs."""
    if options.rounds:
        pairs, max_seconds, warmup = options.rounds, None, 1
    elif options.quick:
        pairs, max_seconds, warmup = 60, 20.0, 1
    else:
        pairs, max_seconds, warmup = 400, 110.0, 3
    return {
        "requests": REQUESTS,
        "prompt_min": PROMPT_MIN,
        "prompt_max": PROMPT_MAX,
        "max_tokens": MAX_TOKENS,
        "warmup_pairs": warmup,
        "pairs": pairs,
        "min_pairs": min(pairs, 10),
        "max_seconds": max_seconds,
    }


def child_env(workdir: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(environment of the child, the variables this section set in it)."""
    from vllm_custom_patches.testing._model import ENGINE_ENV  # standard library only

    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_CUSTOM_PATCHES") and k not in _VARS_CLEARED}
    (workdir / "rpc").mkdir()
    values = {
        **ENGINE_ENV,
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CACHE_ROOT": str(workdir / "cache"),
        "VLLM_RPC_BASE_PATH": str(workdir / "rpc"),
        "VLLM_NO_USAGE_STATS": "1",
        "VLLM_DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    values.update({k: v for k, v in _THREAD_DEFAULTS.items() if k not in os.environ})
    env.update(values)
    return env, values


def run_child(spec: dict[str, Any], env: dict[str, str], timeout: float = 600) -> dict[str, Any]:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-P", str(CHILD), json.dumps(spec)],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip
    wall = time.perf_counter() - t0
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARKER)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"engine child failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    result: dict[str, Any] = json.loads(lines[-1][len(MARKER) :])
    result["child_wall_s"] = wall
    return result


def run(options: RunOptions) -> SectionResult:
    started = time.perf_counter()
    if importlib.util.find_spec("vllm") is None:
        reason = "vLLM is not installed here (make vllm)"
        table = Table(TITLE, ["", "result"], [["real engine", f"unavailable ({reason})"]])
        return SectionResult(NAME, TITLE, [table], {"unavailable": reason}, time.perf_counter() - started)
    spec = spec_for(options)
    # A short path: vLLM puts Unix sockets under VLLM_RPC_BASE_PATH.
    workdir = Path(tempfile.mkdtemp(prefix="vcp-eng-"))
    try:
        env, values = child_env(workdir)
        result = run_child(spec, env)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return _report(result, spec, values, started)


def _report(result: dict[str, Any], spec: dict[str, Any], env_values: dict[str, str], started: float) -> SectionResult:
    pairs = result["pairs"]
    if not pairs:
        raise RuntimeError("the engine child measured no pairs")
    phases = [*result["warmup"], *(p[v] for p in pairs for v in ("unpatched", "patched"))]
    digests = {p["outputs_sha256"] for p in phases}
    identical = len(digests) == 1
    if not identical:
        raise RuntimeError(f"the generated tokens differ between phases: {sorted(digests)}")
    steps = sorted({p["steps"] for p in phases})

    def rps(phase: dict[str, Any]) -> float:
        return float(phase["requests"] / phase["s"])

    def sps(phase: dict[str, Any]) -> float:
        return float(phase["steps"] / phase["s"])

    def per_variant(metric: Any, variant: str) -> Spread:
        return Spread.of([metric(p[variant]) for p in pairs])

    ratio = Spread.of([rps(p["patched"]) / rps(p["unpatched"]) for p in pairs])
    step_ratio = Spread.of([sps(p["patched"]) / sps(p["unpatched"]) for p in pairs])
    cpu_ratio = Spread.of([p["unpatched"]["cpu_s"] / p["patched"]["cpu_s"] for p in pairs])
    per_step_us = Spread.of(
        [
            (p["patched"]["s"] / p["patched"]["steps"] - p["unpatched"]["s"] / p["unpatched"]["steps"]) * 1e6
            for p in pairs
        ]
    )
    spreads = {
        "requests_per_s_unpatched": per_variant(rps, "unpatched"),
        "requests_per_s_patched": per_variant(rps, "patched"),
        "steps_per_s_unpatched": per_variant(sps, "unpatched"),
        "steps_per_s_patched": per_variant(sps, "patched"),
    }

    def row(label: str, s: Spread, digits: int = 1) -> list[str]:
        return [
            label,
            f"{s.median:.{digits}f}",
            fmt_range(s.q1, s.q3, digits),
            fmt_range(s.min, s.max, digits),
            str(s.n),
        ]

    def ratio_row(label: str, s: Spread) -> list[str]:
        return [label, f"{s.median:.3f}x", fmt_range(s.q1, s.q3, 3), fmt_range(s.min, s.max, 3), str(s.n)]

    met = ratio.median >= TARGET_RATIO
    columns = ["", "median", "IQR", "min-max", "n"]
    rows = [
        row("requests/s, no patch", spreads["requests_per_s_unpatched"]),
        row("requests/s, pass-through patch", spreads["requests_per_s_patched"]),
        ratio_row("  ratio patched / no patch (per pair)", ratio),
        row("engine steps/s, no patch", spreads["steps_per_s_unpatched"]),
        row("engine steps/s, pass-through patch", spreads["steps_per_s_patched"]),
        ratio_row("  ratio patched / no patch (per pair)", step_ratio),
        row("patched - no patch, us per step (per pair)", per_step_us),
        ratio_row("requests per CPU-s: patched / no patch (per pair)", cpu_ratio),
    ]
    mean_phase_s = statistics.fmean(p[v]["s"] for p in pairs for v in ("unpatched", "patched"))
    threads = (
        ", ".join(f"{k}={v}" for k, v in env_values.items() if k in _THREAD_DEFAULTS) or "as set in the environment"
    )
    notes = [
        f"target: median ratio >= {TARGET_RATIO}: {'met' if met else 'NOT met'} ({ratio.median:.3f}x, "
        f"IQR {fmt_range(ratio.q1, ratio.q3, 3)}); a ratio below 1 means slower with the patch.",
        f"outputs identical in all {len(phases)} phases ({len(result['warmup'])} warm-up + {len(pairs)} pairs x 2): "
        f"{'yes' if identical else 'NO'}; engine steps per phase: {', '.join(map(str, steps))}.",
        f"each phase: llm.generate of {spec['requests']} token-id requests (prompts {spec['prompt_min']}-"
        f"{spec['prompt_max']} tokens, max_tokens={spec['max_tokens']}, temperature 0, ignore_eos), "
        f"{mean_phase_s * 1e3:.0f} ms on average; pairs in ABBA order; {len(pairs)} pairs in {result['measure_s']:.0f} s.",
        f"one in-process engine (vLLM {result['vllm_version']}, {result['scheduler_class']}), started in "
        f"{result['engine_start_s']:.1f} s after import vllm in {result['import_vllm_s']:.1f} s; child {result['child_wall_s']:.0f} s "
        f"in all; threads: {threads}.",
        "the patch adds two Python calls per engine step: any deviation of the ratio from 1 beyond its IQR is the machine. "
        "The last row divides by the process's CPU time instead of wall time (time.process_time, which leaves out "
        "time the process waited for a CPU): less noise on a shared machine, same work.",
    ]
    table = Table(TITLE, columns, rows, notes)
    data = {
        "target_ratio": TARGET_RATIO,
        "target_met": met,
        "ratio_patched_vs_unpatched_requests_per_s": ratio.as_dict(4),
        "ratio_patched_vs_unpatched_steps_per_s": step_ratio.as_dict(4),
        "patched_minus_unpatched_us_per_step": per_step_us.as_dict(2),
        "ratio_patched_vs_unpatched_requests_per_cpu_s": cpu_ratio.as_dict(4),
        **{key: s.as_dict(2) for key, s in spreads.items()},
        "outputs_identical": identical,
        "outputs_sha256": sorted(digests),
        "steps_per_phase": steps,
        "spec": spec,
        "env_set": env_values,
        "child": {
            k: result[k]
            for k in ("vllm_version", "scheduler_class", "import_vllm_s", "engine_start_s", "measure_s", "child_wall_s")
        },
        "pairs": [
            {
                "patched_first": p["patched_first"],
                **{f"{v}_s": round(p[v]["s"], 5) for v in ("unpatched", "patched")},
                **{f"{v}_cpu_s": round(p[v]["cpu_s"], 5) for v in ("unpatched", "patched")},
                **{f"{v}_steps": p[v]["steps"] for v in ("unpatched", "patched")},
            }
            for p in pairs
        ],
    }
    return SectionResult(NAME, TITLE, [table], data, time.perf_counter() - started)
