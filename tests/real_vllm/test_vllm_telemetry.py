"""Per-patch telemetry in a real in-process vLLM engine (issue 20, part 1; slow: about 20 s).

One engine, ``VLLM_CUSTOM_PATCHES=shortest_prompt_first,scheduler_trace`` and
``VLLM_CUSTOM_PATCHES_TELEMETRY=1``, run through a batch; then the engine
process's own status record (what ``GET /custom_patches`` reports for it) is
read in that process.  ``scheduler_trace`` writes one line per ``schedule()``
(from ``Scheduler._update_after_schedule``, which ``schedule()`` calls exactly
once), so the trace says how many scheduler steps there were: both patches'
call counts must be exactly that.
"""

from __future__ import annotations

import json
import sys
import textwrap
from typing import Any

import pytest
from _early import JobContext, early_fixture

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

_CHILD = textwrap.dedent(
    """
    import json, sys

    def main(model, out):
        import vllm
        from vllm_custom_patches.testing import ENGINE_KWARGS
        from vllm_custom_patches._ops.agent import process_record

        llm = vllm.LLM(model=model, skip_tokenizer_init=True,
                       **{**ENGINE_KWARGS, "max_num_seqs": 2, "enable_prefix_caching": False})
        params = vllm.SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
        prompts = [{"prompt_token_ids": [10 + i + k for k in range(3 + 4 * i)]} for i in range(5)]
        outputs = llm.generate(prompts, params)
        record = process_record("engine_core")
        with open(out, "w") as f:
            json.dump({"record": record, "tokens": [len(o.outputs[0].token_ids) for o in outputs]}, f)

    if __name__ == "__main__":
        main(sys.argv[1], sys.argv[2])
    """
)


@early_fixture
def telemetry_engine(job: JobContext) -> dict[str, Any]:
    """One in-process engine with two catalogue patches and telemetry on (an early job)."""
    from vllm_custom_patches_catalogue.scheduler_trace import read_trace

    workdir = job.workspace.dir("engine-telemetry")
    script, out, trace = workdir / "child.py", workdir / "out.json", workdir / "trace.jsonl"
    script.write_text(_CHILD)
    trace.unlink(missing_ok=True)
    env = job.env(
        VLLM_ENABLE_V1_MULTIPROCESSING="0",
        VLLM_CUSTOM_PATCHES="shortest_prompt_first,scheduler_trace",
        VLLM_CUSTOM_PATCHES_TELEMETRY="1",
        VLLM_CUSTOM_PATCHES_TRACE_FILE=str(trace),
    )
    done = job.run([sys.executable, str(script), str(job.workspace.model), str(out)], env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result: dict[str, Any] = json.loads(out.read_text())
    result["steps"] = len(read_trace(trace))
    result["log"] = done.stdout + done.stderr
    return result


def test_every_scheduler_step_is_counted_for_each_patch(telemetry_engine: dict[str, Any]) -> None:
    record, steps = telemetry_engine["record"], telemetry_engine["steps"]
    assert telemetry_engine["tokens"] == [6] * 5
    assert set(record["applied"]) == {"shortest_prompt_first", "scheduler_trace"}
    rows = {(row["patch"], row["member"]): row for row in record["telemetry"]}
    schedule = rows[("shortest_prompt_first", "schedule")]
    traced = rows[("scheduler_trace", "_update_after_schedule")]
    assert steps > 0
    assert schedule["calls"] == traced["calls"] == steps  # one of each per scheduler step, none lost
    for row in (schedule, traced):
        assert row["errors"] == 0 and row["last_error"] is None
        assert 0 < row["own_s"] <= row["total_s"]
    # shortest_prompt_first's own time excludes vLLM's schedule() it calls, and with it the trace patch's time.
    assert schedule["total_s"] - schedule["own_s"] >= traced["total_s"]
    assert all(row["errors"] == 0 for row in record["telemetry"])
