"""The kit's ``run_engine`` and ``vllm_engine`` on the real vLLM: per-process evidence, failures surfaced."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vllm_custom_patches.testing import DEFAULT_PROMPTS, EngineRunError, run_engine

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

_MISFIT = '''
from typing_extensions import override

from vllm_custom_patches import VLLMPatch


class Misfit(VLLMPatch["vllm.v1.core.sched.scheduler:Scheduler"]):
    @override
    def schedule_v2(self):
        return None
'''


def test_a_multiprocess_engine_reports_the_patch_from_the_engine_core(vllm_engine, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    trace = tmp_path / "trace.jsonl"
    run = vllm_engine(patches=["shortest_prompt_first", "scheduler_trace"], env={"VLLM_CUSTOM_PATCHES_TRACE_FILE": str(trace)})
    (core,) = run.role("engine_core")
    assert set(core.applied) == {"shortest_prompt_first", "scheduler_trace"} and core.reported
    (driver,) = run.role("driver")
    workers = run.role("worker")
    assert workers and all(w.reported for w in workers)
    # The scheduler is imported only in the EngineCore: elsewhere the patches wait for it.
    for process in (driver, *workers):
        states = {p["name"]: p["state"] for p in process.patches}
        assert states["shortest_prompt_first"] == "pending" and not process.applied
    pids_in_trace = {json.loads(line)["pid"] for line in trace.read_text().splitlines()}
    assert pids_in_trace == {core.pid}
    # Token-id prompts of 40, 5, 20, 10 tokens.  How many reach the EngineCore before its first
    # step is timing (the first may already run alone), but whatever waits is admitted shortest first.
    lengths = [len(p) for p in DEFAULT_PROMPTS]
    rest = [lengths[i] for i in run.finished[1:]]
    assert sorted(run.finished) == [0, 1, 2, 3] and rest == sorted(rest), run.finished
    assert len(run.outputs) == 4 and all(len(o) == 4 for o in run.outputs)


def test_a_patch_that_stops_start_up_surfaces_as_an_engine_run_error(tiny_vllm_model: Path, tmp_path: Path) -> None:
    patch_dir = tmp_path / "patches"
    patch_dir.mkdir(mode=0o755)
    (patch_dir / "misfit.py").write_text(_MISFIT)
    (patch_dir / "misfit.py").chmod(0o644)
    with pytest.raises(EngineRunError, match="(?s)exited with .*schedule_v2"):
        run_engine(
            tiny_vllm_model,
            patches="Misfit",
            multiprocess=False,
            env={"VLLM_CUSTOM_PATCHES_PATH": str(patch_dir)},
            workdir=tmp_path / "run",
        )
