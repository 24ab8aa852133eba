"""Stacks on a real vLLM engine (issue 19): the example package's observer ``schedule_log`` (stackable,
order 10) composes with the catalogue's ``shortest_prompt_first`` (stackable, exclusive queue-sort)
on ``Scheduler.schedule``.

In-process engines of the tiny model (``testing.run_engine``), one request at a time, so the
finishing order is the admission order. Both installation orders (``VLLM_CUSTOM_PATCHES``) give the
same chain; the policy still orders admission (the observer sees that order, from outside it); the
generated tokens equal an unpatched engine's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from _early import JobContext, early_fixture

from vllm_custom_patches.testing import EngineRun, run_engine

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
pytest.importorskip("vllm_patches_example", reason="the example package is installed by make test")

# Prompt lengths out of order: vLLM's FCFS admits 0, 1, 2, 3; shortest first admits 1, 3, 2, 0.
PROMPTS = [[7 + i for i in range(n)] for n in (20, 5, 12, 8)]
SHORTEST_FIRST = (1, 3, 2, 0)
CHAIN = "Scheduler.schedule: schedule_log (order 10) \u2192 shortest_prompt_first \u2192 vLLM"
SELECTIONS = {
    "baseline": "",
    "observer_first": "schedule_log,shortest_prompt_first",
    "policy_first": "shortest_prompt_first,schedule_log",
}


def _run(job: JobContext, workdir: Path, selection: str) -> tuple[EngineRun, list[str]]:
    workdir.mkdir(parents=True)
    log = workdir / "admitted.jsonl"
    # schedule_log by name: the package's entry point.  The session's environment, not os.environ
    # as a foreground test may have changed it (this runs in the background lane).
    env = job.env(VLLM_PATCHES_EXAMPLE_SCHEDULE_LOG=str(log))
    run = run_engine(
        job.workspace.model, patches=selection, prompts=PROMPTS, multiprocess=False, env=env,
        workdir=workdir / "engine", timeout=600,
    )  # fmt: skip
    admitted = (
        [rid for line in log.read_text().splitlines() for rid in json.loads(line)["admitted"]] if log.exists() else []
    )
    return run, admitted


def _stacks(run: EngineRun) -> set[str]:
    (driver,) = run.processes
    return {line for status in driver.patches for line in status.get("stacks", [])}


@early_fixture
def runs(job: JobContext) -> dict[str, tuple[EngineRun, list[str]]]:
    """An unpatched engine and the two installation orders, one after another (an early job: in the background lane)."""
    root = job.workspace.dir("stacks")
    return {key: _run(job, root / key, selection) for key, selection in SELECTIONS.items()}


@pytest.mark.parametrize("order", ["observer_first", "policy_first"])
def test_the_observer_composes_with_the_policy_in_either_installation_order(runs: dict[str, Any], order: str) -> None:
    run, admitted = runs[order]
    (driver,) = run.processes
    assert sorted(driver.applied) == ["schedule_log", "shortest_prompt_first"]
    first = {"observer_first": "schedule_log", "policy_first": "shortest_prompt_first"}[order]
    assert driver.applied[0] == first  # installed in the order selected...
    assert CHAIN in _stacks(run)  # ...and stacked the same way
    assert _stacks(run) == _stacks(runs["observer_first"][0])
    # The policy still orders admission, and the observer, outside it, sees that order.
    assert run.finished == SHORTEST_FIRST
    assert [int(rid.split("-", 1)[0]) for rid in admitted] == list(SHORTEST_FIRST)


def test_outputs_equal_an_unpatched_engines(runs: dict[str, Any]) -> None:
    baseline, nothing_logged = runs["baseline"]
    assert baseline.finished == (0, 1, 2, 3) and nothing_logged == []
    for order in ("observer_first", "policy_first"):
        assert runs[order][0].outputs == baseline.outputs
