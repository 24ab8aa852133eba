"""Tests of ``lifo_admission``, written with vllm-custom-patches' testing kit only.

The kit's pytest plugin is installed with vllm-custom-patches (entry point
``pytest11``), so its fixtures need no conftest.py:

* ``vllm_patches``: apply a patch for one test; at teardown it is rolled back
  and the test fails unless the target's namespace is exactly as before;
* ``vllm_engine``: a real vLLM engine on a tiny offline model, in a fresh
  process, with the patches selected through ``VLLM_CUSTOM_PATCHES`` as an
  operator would; it returns the outputs, the finishing order and what each
  process of the engine applied.

The engines run on the CPU build of vLLM too (about 30-50 s each on 2 cores).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any

import pytest
from packaging.specifiers import SpecifierSet
from vllm_patches_example.lifo_admission import LifoAdmission, lifo_order

from vllm_custom_patches import PatchConfigError, PatchManager, PatchState

PATCH = "lifo_admission"
TARGET = "vllm.v1.core.sched.scheduler:Scheduler"


def _request(request_id: str, arrival_time: float, *, preempted: bool = False) -> SimpleNamespace:
    from vllm.v1.request import RequestStatus

    status = RequestStatus.PREEMPTED if preempted else RequestStatus.WAITING
    return SimpleNamespace(request_id=request_id, arrival_time=arrival_time, status=status)


def _ids(requests: Any) -> list[str]:
    return [r.request_id for r in requests]


# -- in-process, against the real Scheduler class ------------------------------------------


def test_lifo_order_serves_preempted_first_then_newest_first() -> None:
    queue = [
        _request("old", 1.0),
        _request("preempted-late", 2.0, preempted=True),
        _request("new", 5.0),
        _request("preempted-early", 0.5, preempted=True),
        _request("middle", 3.0),
    ]
    # Preempted requests keep their queue order; the others go newest first.
    assert _ids(lifo_order(queue)) == ["preempted-late", "preempted-early", "new", "middle", "old"]
    assert lifo_order([]) == []


def test_apply_grafts_init_and_schedule_onto_the_real_scheduler(vllm_patches: Any) -> None:
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler
    from vllm.v1.core.sched.scheduler import Scheduler

    original_schedule = vars(Scheduler)["schedule"]
    vllm_patches.apply(PATCH)  # registered by the import above; teardown proves an exact rollback

    (status,) = [s for s in PatchManager.status() if s.name == PATCH]
    assert status.state is PatchState.APPLIED
    assert status.target == TARGET
    assert set(status.overrides) == {"__init__", "schedule"}
    assert status.additions == ()
    assert SpecifierSet(status.versions) == SpecifierSet(">=0.32,<0.34")
    assert vars(Scheduler)["schedule"] is vars(LifoAdmission)["schedule"]
    assert LifoAdmission.original("schedule") is original_schedule
    # AsyncScheduler (async scheduling) does not override schedule: it inherits the patch.
    assert "schedule" not in vars(AsyncScheduler)
    assert AsyncScheduler.schedule is Scheduler.schedule


def test_schedule_reorders_the_waiting_queue_in_place_then_calls_the_original(
    monkeypatch: pytest.MonkeyPatch, vllm_patches: Any
) -> None:
    from vllm.v1.core.sched.request_queue import FCFSRequestQueue
    from vllm.v1.core.sched.scheduler import Scheduler

    seen: list[tuple[Any, list[str], bool]] = []

    def original(self: Any, throttle_prefills: bool = False) -> str:
        seen.append((self.waiting, _ids(self.waiting), throttle_prefills))
        return "scheduler output"

    # Stand in for vLLM's own schedule before applying: the patch (stackable, so its original()
    # is linked when it is applied) keeps the stand-in as the original. vllm_patches comes after
    # monkeypatch in the arguments, so it rolls back first, and monkeypatch then puts vLLM's back.
    monkeypatch.setattr(Scheduler, "schedule", original)
    vllm_patches.apply(LifoAdmission)
    waiting = FCFSRequestQueue([_request("a", 1.0), _request("b", 2.0), _request("c", 3.0)])
    stub = SimpleNamespace(waiting=waiting)  # no _original_schedule: original() still finds it

    assert Scheduler.schedule(stub, True) == "scheduler output"
    assert seen == [(waiting, ["c", "b", "a"], True)]  # the same deque, newest first
    assert stub.waiting is waiting


def test_a_live_apply_is_refused_where_a_scheduler_runs_with_another_policy(vllm_patches: Any) -> None:
    from vllm.v1.core.sched.request_queue import SchedulingPolicy, create_request_queue
    from vllm.v1.core.sched.scheduler import Scheduler

    # A scheduler vLLM built before the patch (as on a server started with --scheduling-policy
    # priority, where the kill switch then applies it): built without __init__ here, for speed.
    running = Scheduler.__new__(Scheduler)
    running.waiting = create_request_queue(SchedulingPolicy.PRIORITY)
    running.policy = SchedulingPolicy.PRIORITY
    original_schedule = vars(Scheduler)["schedule"]
    with pytest.raises(PatchConfigError, match=r"scheduling policy 'priority'.*--scheduling-policy fcfs"):
        vllm_patches.apply(LifoAdmission)  # check_live refuses it: nothing is applied
    assert vars(Scheduler)["schedule"] is original_schedule and not LifoAdmission.is_applied()


# -- real engines, the patch selected through VLLM_CUSTOM_PATCHES ------------------------------


def test_the_engine_serves_the_newest_waiting_request_first(vllm_engine: Any) -> None:
    # One request at a time (max_num_seqs=1), so the finishing order is the
    # admission order.  In-process, all four prompts are queued before the
    # first step.  The two engines are independent processes: run them side
    # by side to halve the wait.
    with ThreadPoolExecutor(2) as pool:
        patched_run = pool.submit(vllm_engine, patches=[PATCH], multiprocess=False)
        baseline_run = pool.submit(vllm_engine, patches=[], multiprocess=False)
        patched, baseline = patched_run.result(), baseline_run.result()

    assert baseline.finished == (0, 1, 2, 3)  # vLLM's FCFS
    assert patched.finished == (3, 2, 1, 0)  # last in, first out
    # Only the order changes: every prompt gets the same tokens.
    assert patched.outputs == baseline.outputs
    assert all(len(tokens) == 4 for tokens in patched.outputs)
    # In-process, the driver is the engine's only process.
    (driver,) = patched.processes
    assert driver.role == "driver" and driver.applied == (PATCH,)
    (unpatched_driver,) = baseline.processes
    assert unpatched_driver.applied == ()


@pytest.mark.slow
def test_the_multiprocess_engine_applies_it_in_the_engine_core(vllm_engine: Any) -> None:
    run = vllm_engine(patches=[PATCH], multiprocess=True)

    # The scheduler lives in the EngineCore process: that is where the patch
    # is applied.  The driver and the worker never import the scheduler
    # module, so there it stays pending (waiting for that import).
    (core,) = run.role("engine_core")
    assert core.applied == (PATCH,)
    for process in [*run.role("driver"), *run.role("worker")]:
        assert process.applied == ()
        assert {p["name"]: p["state"] for p in process.patches} == {PATCH: "pending"}
    assert sorted(run.finished) == [0, 1, 2, 3]
    # (The order depends on how many prompts reached the EngineCore before its
    # first step, so it is checked in-process above, not here.)
