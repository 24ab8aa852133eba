"""The kit's ``run_engine`` and ``vllm_engine`` on the real vLLM: per-process evidence, failures surfaced.

The multiprocess run is also the test that a policy selected by nothing but
``VLLM_CUSTOM_PATCHES`` runs in vLLM's EngineCore process (and only there).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from _admission_gate import write_admission_gate
from _engine import write_patch_file

from vllm_custom_patches.testing import DEFAULT_PROMPTS, EngineRunError, run_engine

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

_MISFIT = """
from typing_extensions import override

from vllm_custom_patches import VLLMPatch


class Misfit(VLLMPatch["vllm.v1.core.sched.scheduler:Scheduler"]):
    @override
    def schedule_v2(self):
        return None
"""


def test_a_multiprocess_engine_reports_the_patch_from_the_engine_core(vllm_engine, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    trace = tmp_path / "trace.jsonl"
    # The test-only AdmissionGate holds the four prompts until all have reached the EngineCore: they
    # wait together, whatever the engine's speed compared with the client's.
    gate = {"VLLM_CUSTOM_PATCHES_PATH": str(write_admission_gate(tmp_path / "gate")),
            "VCP_GATE_LENGTHS": ",".join(str(len(p)) for p in DEFAULT_PROMPTS)}  # fmt: skip
    run = vllm_engine(patches=["shortest_prompt_first", "scheduler_trace", "AdmissionGate"],
                      env={"VLLM_CUSTOM_PATCHES_TRACE_FILE": str(trace), **gate})  # fmt: skip
    (core,) = run.role("engine_core")
    assert set(core.applied) == {"shortest_prompt_first", "scheduler_trace", "AdmissionGate"} and core.reported
    (driver,) = run.role("driver")
    workers = run.role("worker")
    assert workers and all(w.reported for w in workers)
    # The scheduler is imported only in the EngineCore: elsewhere the patches wait for it.
    for process in (driver, *workers):
        states = {p["name"]: p["state"] for p in process.patches}
        assert states["shortest_prompt_first"] == "pending" and not process.applied
    assert len({core.pid, driver.pid, os.getpid()}) == 3  # its own process: neither the driver nor this test
    lines = [json.loads(line) for line in trace.read_text().splitlines()]
    assert lines, "the EngineCore wrote no trace"
    assert {line["pid"] for line in lines} == {core.pid}
    # The policy ran there, enabled by nothing but the environment: all four waited together (three
    # still waiting after the first was admitted), admitted shortest first in the trace as well.
    assert max(line["waiting"] for line in lines) == len(DEFAULT_PROMPTS) - 1, lines[:3]
    assert [n for line in lines for n in (line["prompt_tokens"][rid] for rid in line["new"])] == [5, 10, 20, 40]
    # Token-id prompts of 40, 5, 20, 10 tokens, all waiting at once: admitted shortest first.
    lengths = [len(p) for p in DEFAULT_PROMPTS]
    assert [lengths[i] for i in run.finished] == [5, 10, 20, 40], run.finished
    assert len(run.outputs) == 4 and all(len(o) == 4 for o in run.outputs)


def test_a_patch_that_stops_start_up_surfaces_as_an_engine_run_error(tiny_vllm_model: Path, tmp_path: Path) -> None:
    patch_dir = write_patch_file(tmp_path / "patches", "misfit.py", _MISFIT)
    with pytest.raises(EngineRunError, match=r"(?s)exited with .*schedule_v2"):
        run_engine(
            tiny_vllm_model,
            patches="Misfit",
            multiprocess=False,
            env={"VLLM_CUSTOM_PATCHES_PATH": str(patch_dir)},
            workdir=tmp_path / "run",
        )
