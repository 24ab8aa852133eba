"""``vllm.plugins.load_general_plugins()`` in a fresh process applies what ``VLLM_CUSTOM_PATCHES`` names.

Each case is a new interpreter that does what vLLM does at the start of each
of its processes (load the general plugins), then imports the scheduler
module as the EngineCore would.  The cases run two at a time (about 10 s each,
mostly ``import vllm``), as an early job (``_early``).
"""

from __future__ import annotations

from typing import Any

import pytest
from _early import JobContext, early_fixture
from _engine import Child, start_child

pytestmark = pytest.mark.vllm

SPF = "vllm_custom_patches_catalogue.shortest_prompt_first"
FAIR = "vllm_custom_patches_catalogue.fair_share"
TRACE = "vllm_custom_patches_catalogue.scheduler_trace"
LOG = "vllm_patches_example.schedule_log"

CASES: dict[str, dict[str, str]] = {
    "named": {"VLLM_CUSTOM_PATCHES": "shortest_prompt_first, scheduler_trace", "trace": "1"},
    "star": {"VLLM_CUSTOM_PATCHES": "*", "trace": "1"},
    "missing_trace_file": {"VLLM_CUSTOM_PATCHES": "scheduler_trace"},
    "bad_setting": {"VLLM_CUSTOM_PATCHES": "shortest_prompt_first", "VLLM_CUSTOM_PATCHES_SPF_MAX_WAIT_S": "soon"},
    "unknown_name": {"VLLM_CUSTOM_PATCHES": "shortest_promt_first"},
}


#: How many cases run at once: the job runs while the unit tests do, some of which time code (with margins
#: for a shared machine); two more processes, not five, keep that margin.
AT_ONCE = 2


@early_fixture
def results(job: JobContext) -> dict[str, dict[str, Any]]:
    """Each case's child, :data:`AT_ONCE` at a time: an early job, from the start of the session."""
    done: dict[str, dict[str, Any]] = {}
    running: list[tuple[str, Child]] = []
    for case, settings in CASES.items():
        if len(running) == AT_ONCE:
            first, child = running.pop(0)
            done[first] = child.result(timeout=600)
        workdir = job.workspace.dir(f"plugins-{case}")
        extra = {k: v for k, v in settings.items() if k.startswith("VLLM_")}
        if settings.get("trace"):
            extra["VLLM_CUSTOM_PATCHES_TRACE_FILE"] = str(workdir / "trace.jsonl")
        running.append((case, start_child("plugins", {}, job.env(**extra), workdir)))
        job.track(running[-1][1].proc)
    for case, child in running:
        done[case] = child.result(timeout=600)
    return done


def test_named_patches_wait_for_the_scheduler_module_then_apply(results: dict[str, dict[str, Any]]) -> None:
    result = results["named"]
    assert "error" not in result, result.get("error")
    before, after = result["after_plugins"], result["after_import"]
    if not result["scheduler_imported_by_plugins"]:
        # The plugin never imports the target itself: it waits for vLLM to.
        assert before["shortest_prompt_first"]["state"] == "pending"
        assert before["scheduler_trace"]["state"] == "pending"
    assert after["shortest_prompt_first"]["state"] == "applied"
    assert after["scheduler_trace"]["state"] == "applied"
    assert "fair_share" not in after  # not selected: its module was never imported
    assert result["applied"] == ["shortest_prompt_first", "scheduler_trace"]
    assert result["scheduler_members"] == {"__init__": SPF, "schedule": SPF, "_update_after_schedule": TRACE}


def test_star_applies_what_can_be_applied_and_skips_the_conflicting_policy(results: dict[str, dict[str, Any]]) -> None:
    result = results["star"]
    assert "error" not in result, result.get("error")
    after = result["after_import"]
    # '*' takes patches in name order: fair_share is the first admission policy (exclusive
    # "queue-sort"), so the other two (best effort under '*') are skipped with the conflict; the
    # example package's observer schedule_log stacks on fair_share, outermost (order 10).
    assert result["applied"] == ["fair_share", "schedule_log", "scheduler_trace"]
    for policy in ("lifo_admission", "shortest_prompt_first"):
        assert after[policy]["state"] == "skipped"
        assert "conflicts with applied patch 'fair_share'" in after[policy]["reason"]
    assert result["scheduler_members"] == {"__init__": FAIR, "schedule": LOG, "_update_after_schedule": TRACE}


@pytest.mark.parametrize(
    ("case", "error_type", "words"),
    [
        ("missing_trace_file", "PatchConfigError", ["needs VLLM_CUSTOM_PATCHES_TRACE_FILE"]),
        ("bad_setting", "PatchConfigError", ["VLLM_CUSTOM_PATCHES_SPF_MAX_WAIT_S='soon'", "positive number"]),
        ("unknown_name", "UnknownPatchError", ["shortest_promt_first", "Did you mean 'shortest_prompt_first'?"]),
    ],
)
def test_a_misconfigured_process_fails_its_start_up(
    results: dict[str, dict[str, Any]], case: str, error_type: str, words: list[str]
) -> None:
    result = results[case]
    assert "error" in result, f"{case}: start-up did not fail: {result}"
    assert result["error"]["type"] == error_type
    assert "PatchError" in result["error"]["mro"]
    for word in words:
        assert word in result["error"]["message"]
    assert result["applied"] == []
