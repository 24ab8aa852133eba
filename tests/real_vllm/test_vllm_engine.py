"""The catalogue patches in a real in-process vLLM engine on the tiny model (slow: tens of seconds).

The engine admits one request at a time (``max_num_seqs=1``), so the order
requests finish in is the order the scheduler admitted them; every request of
a phase is added before its first step, so all of them wait together.  (The
multiprocess engine, patches enabled by the environment only, is
tests/real_vllm/test_vllm_testing_kit.py's.)
"""

from __future__ import annotations

from typing import Any

import pytest
from _early import JobContext, early_fixture
from _engine import SPF_REQUESTS, TENANT_REQUESTS, start_child, user_id

from vllm_custom_patches_catalogue.scheduler_trace import read_trace

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

SPF_SPEC = [{"id": rid, "len": n, "max_tokens": m} for rid, n, m in SPF_REQUESTS]
TENANT_SPEC = [{"id": rid, "len": n, "tenant": tenant} for rid, n, tenant in TENANT_REQUESTS]
SUBMITTED = [rid for rid, _, _ in SPF_REQUESTS]
SHORTEST_FIRST = [rid for rid, _, _ in sorted(SPF_REQUESTS, key=lambda r: r[1])]


def admitted(trace: list[dict[str, Any]], prefix: str) -> list[str]:
    """Request ids (without ``prefix``) in the order the trace shows them first scheduled."""
    order: list[str] = []
    for line in trace:
        for rid in line["new"]:
            name = user_id(rid)
            if name.startswith(prefix) and name[len(prefix) :] not in order:
                order.append(name[len(prefix) :])
    return order


@early_fixture
def in_process(job: JobContext) -> dict[str, Any]:
    """One in-process engine; patches applied and rolled back between phases with the Python API (an early job)."""
    workdir = job.workspace.dir("engine-in-process")
    trace_file = workdir / "trace.jsonl"
    spec = {
        "model": str(job.workspace.model),
        "import": ["shortest_prompt_first", "fair_share", "scheduler_trace"],
        "phases": [
            {"name": "fcfs", "apply": ["scheduler_trace"], "requests": SPF_SPEC},
            {"name": "spf", "apply": ["shortest_prompt_first"], "requests": SPF_SPEC},
            {"name": "rolled_back", "rollback": ["shortest_prompt_first"], "requests": SPF_SPEC},
            {"name": "tenants_fcfs", "requests": TENANT_SPEC},
            {"name": "fair", "apply": ["fair_share"], "requests": TENANT_SPEC},
        ],
    }
    env = job.env(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CUSTOM_PATCHES_TRACE_FILE=str(trace_file))
    child = start_child("engine", spec, env, workdir)
    job.track(child.proc)
    result = child.result(timeout=600)
    result["trace"] = read_trace(trace_file)
    return result


def test_in_process_shortest_prompt_first_serves_shortest_prompts_first(in_process: dict[str, Any]) -> None:
    phases = in_process["phases"]
    assert phases["fcfs"]["applied"] == ["scheduler_trace"]
    assert phases["fcfs"]["finished"] == SUBMITTED  # vLLM's own order: first come, first served
    assert phases["spf"]["applied"] == ["scheduler_trace", "shortest_prompt_first"]
    assert phases["spf"]["finished"] == SHORTEST_FIRST  # head(3), tiny(5), short(10), medium(20), long(40)
    # Rolled back on the live engine: first come, first served again.
    assert phases["rolled_back"]["finished"] == SUBMITTED
    # Only the order changes: every request produced exactly the same tokens.
    assert phases["spf"]["outputs"] == phases["fcfs"]["outputs"] == phases["rolled_back"]["outputs"]
    # The trace (written by the engine's scheduler) agrees.
    trace = in_process["trace"]
    assert admitted(trace, "fcfs:") == SUBMITTED
    assert admitted(trace, "spf:") == SHORTEST_FIRST
    first = {user_id(rid): n for line in trace for rid, n in line["prompt_tokens"].items()}
    assert [first[f"spf:{rid}"] for rid in SHORTEST_FIRST] == [3, 5, 10, 20, 40]


def test_in_process_fair_share_interleaves_tenants(in_process: dict[str, Any]) -> None:
    phases = in_process["phases"]
    assert phases["tenants_fcfs"]["finished"] == ["a0", "a1", "a2", "a3", "b0", "b1", "b2", "b3"]
    assert phases["fair"]["applied"] == ["scheduler_trace", "fair_share"]
    assert phases["fair"]["finished"] == ["a0", "b0", "a1", "b1", "a2", "b2", "a3", "b3"]
    assert phases["fair"]["outputs"] == phases["tenants_fcfs"]["outputs"]


def test_in_process_trace_is_written_by_this_process(in_process: dict[str, Any]) -> None:
    trace = in_process["trace"]
    assert trace, "no trace lines"
    assert {line["pid"] for line in trace} == {in_process["pid"]}
    steps = [line["step"] for line in trace]
    assert steps == list(range(steps[0], steps[0] + len(steps)))  # one line per schedule(), none lost
    for line in trace:
        assert sum(line["tokens"].values()) == line["total_tokens"]
        assert line["scheduled"] == line["new"] + [r for r in line["scheduled"] if r not in line["new"]]
