"""The catalogue patches against the real vLLM V1 ``Scheduler`` class (no engine started)."""

from __future__ import annotations

import time
from collections import deque
from pathlib import Path
from typing import Any

import pytest
from packaging.specifiers import SpecifierSet

from vllm_custom_patches import (
    PatchConfigError,
    PatchConflictError,
    PatchManager,
    PatchState,
    PatchVersionError,
)
from vllm_custom_patches.testing import snapshot_namespace

# Imported at collection time, so the patches are registered before the
# registry isolation of each test (tests/conftest.py) takes its copy.
from vllm_custom_patches_catalogue import fair_share, scheduler_trace, shortest_prompt_first

pytestmark = pytest.mark.vllm

CATALOGUE = {
    "shortest_prompt_first": (shortest_prompt_first.ShortestPromptFirst, {"__init__", "schedule"}),
    "fair_share": (fair_share.FairShare, {"__init__", "schedule"}),
    "scheduler_trace": (scheduler_trace.SchedulerTrace, {"_update_after_schedule"}),
}


@pytest.fixture
def classes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[type, type]:
    monkeypatch.setenv("VLLM_CUSTOM_PATCHES_TRACE_FILE", str(tmp_path / "trace.jsonl"))
    for name in ("VLLM_CUSTOM_PATCHES_SPF_MAX_WAIT_S", "VLLM_CUSTOM_PATCHES_FAIR_SHARE_KEY",
                 "VLLM_CUSTOM_PATCHES_FAIR_SHARE_WEIGHTS", "VLLM_CUSTOM_PATCHES_VLLM_VERSION"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler
    from vllm.v1.core.sched.scheduler import Scheduler

    return Scheduler, AsyncScheduler


@pytest.mark.parametrize("name", sorted(CATALOGUE))
def test_each_patch_applies_to_and_rolls_back_from_the_real_scheduler_exactly(
    classes: tuple[type, type], name: str
) -> None:
    scheduler, async_scheduler = classes
    patch, overrides = CATALOGUE[name]
    before, before_async = snapshot_namespace(scheduler), snapshot_namespace(async_scheduler)
    originals = {member: vars(scheduler)[member] for member in overrides}

    assert patch.apply() is True
    status = next(s for s in PatchManager.status() if s.name == name)
    assert status.state is PatchState.APPLIED
    assert set(status.overrides) == overrides
    assert status.target == "vllm.v1.core.sched.scheduler:Scheduler"
    assert SpecifierSet(status.versions) == SpecifierSet(">=0.32,<0.35")
    for member in overrides:
        assert vars(scheduler)[member] is not originals[member]
        assert vars(scheduler)[f"_original_{member}"] is originals[member]
    # AsyncScheduler (used with async scheduling) gets the patch through inheritance.
    assert before_async.changes() == []

    assert patch.rollback() is True
    before.assert_unchanged()
    before_async.assert_unchanged()
    assert not patch.is_applied()


@pytest.mark.parametrize("policy", ["shortest_prompt_first", "fair_share"])
def test_a_policy_and_the_trace_combine_and_roll_back_exactly(classes: tuple[type, type], policy: str) -> None:
    scheduler, _ = classes
    before = snapshot_namespace(scheduler)
    PatchManager.apply(policy)
    PatchManager.apply("scheduler_trace")
    assert PatchManager.applied()[-2:] == [policy, "scheduler_trace"]
    PatchManager.rollback_all()
    before.assert_unchanged()


def test_two_policies_conflict_and_the_second_changes_nothing(classes: tuple[type, type]) -> None:
    scheduler, _ = classes
    before = snapshot_namespace(scheduler)
    shortest_prompt_first.ShortestPromptFirst.apply()
    with_spf = snapshot_namespace(scheduler)
    with pytest.raises(PatchConflictError, match="shortest_prompt_first"):
        fair_share.FairShare.apply()
    with_spf.assert_unchanged()
    shortest_prompt_first.ShortestPromptFirst.rollback()
    before.assert_unchanged()


@pytest.mark.parametrize(
    ("name", "variable", "value", "message"),
    [
        ("shortest_prompt_first", "VLLM_CUSTOM_PATCHES_SPF_MAX_WAIT_S", "soon", "positive number of seconds"),
        ("shortest_prompt_first", "VLLM_CUSTOM_PATCHES_SPF_MAX_WAIT_S", "-1", "positive number of seconds"),
        ("fair_share", "VLLM_CUSTOM_PATCHES_FAIR_SHARE_WEIGHTS", "gold=3,silver=0", "weight > 0"),
        ("fair_share", "VLLM_CUSTOM_PATCHES_FAIR_SHARE_WEIGHTS", "gold", "TENANT=WEIGHT"),
        ("scheduler_trace", "VLLM_CUSTOM_PATCHES_TRACE_FILE", "", "needs VLLM_CUSTOM_PATCHES_TRACE_FILE"),
        ("scheduler_trace", "VLLM_CUSTOM_PATCHES_TRACE_FILE", "/nonexistent-dir/t.jsonl", "cannot open"),
    ],
)
def test_a_bad_setting_fails_the_apply_and_changes_nothing(
    classes: tuple[type, type], monkeypatch: pytest.MonkeyPatch, name: str, variable: str, value: str, message: str
) -> None:
    scheduler, _ = classes
    monkeypatch.setenv(variable, value)
    before = snapshot_namespace(scheduler)
    with pytest.raises(PatchConfigError, match=message) as info:
        PatchManager.apply(name)
    assert variable in str(info.value)
    before.assert_unchanged()
    status = next(s for s in PatchManager.status() if s.name == name)
    assert status.state is PatchState.FAILED


def test_settings_are_read_when_the_patch_is_applied(
    classes: tuple[type, type], monkeypatch: pytest.MonkeyPatch
) -> None:
    scheduler, _ = classes
    monkeypatch.setenv("VLLM_CUSTOM_PATCHES_SPF_MAX_WAIT_S", "12.5")
    shortest_prompt_first.ShortestPromptFirst.apply()
    assert scheduler._spf_settings.max_wait_s == 12.5  # type: ignore[attr-defined]
    monkeypatch.setenv("VLLM_CUSTOM_PATCHES_SPF_MAX_WAIT_S", "3")
    assert scheduler._spf_settings.max_wait_s == 12.5  # type: ignore[attr-defined]
    shortest_prompt_first.ShortestPromptFirst.rollback()
    shortest_prompt_first.ShortestPromptFirst.apply()
    assert scheduler._spf_settings.max_wait_s == 3.0  # type: ignore[attr-defined]


def test_the_version_gate_refuses_other_vllm_versions(
    classes: tuple[type, type], monkeypatch: pytest.MonkeyPatch
) -> None:
    scheduler, _ = classes
    before = snapshot_namespace(scheduler)
    monkeypatch.setenv("VLLM_CUSTOM_PATCHES_VLLM_VERSION", "0.35.0")
    for name in CATALOGUE:
        with pytest.raises(PatchVersionError, match=r"<0.35,>=0.32|>=0.32,<0.35"):
            PatchManager.apply(name)
    before.assert_unchanged()


# -- the policies' ordering on real vLLM Request objects ---------------------------


def _request(request_id: str, length: int, *, tenant: str | None = None, arrival: float | None = None) -> Any:
    from vllm import SamplingParams
    from vllm.v1.request import Request

    params = SamplingParams(max_tokens=4, extra_args={"tenant": tenant} if tenant is not None else None)
    return Request(request_id, list(range(1, length + 1)), params, None, arrival_time=arrival)


def test_shortest_prompt_first_orders_real_requests() -> None:
    now = time.time()
    queue = [_request("a", 30, arrival=now - 3), _request("b", 5, arrival=now - 2),
             _request("c", 12, arrival=now - 1), _request("d", 5, arrival=now)]  # fmt: skip
    order = shortest_prompt_first.spf_order(queue, now=now, max_wait_s=None)
    assert [r.request_id for r in order] == ["b", "d", "c", "a"]
    # With an anti-starvation bound of 2.5 s, "a" (waiting 3 s) goes first.
    order = shortest_prompt_first.spf_order(queue, now=now, max_wait_s=2.5)
    assert [r.request_id for r in order] == ["a", "b", "d", "c"]


def test_reordering_keeps_vllms_queue_object() -> None:
    from vllm.v1.core.sched.request_queue import FCFSRequestQueue

    from vllm_custom_patches_catalogue._queue import reorder_in_place

    queue = FCFSRequestQueue([_request("a", 30), _request("b", 5)])
    same = queue
    reorder_in_place(queue, shortest_prompt_first.spf_order(queue, now=time.time(), max_wait_s=None))
    assert queue is same and [r.request_id for r in queue] == ["b", "a"]
    assert queue.peek_request().request_id == "b"


def test_fair_share_interleaves_real_requests_of_two_tenants() -> None:
    queue = [_request(f"{t}{i}", 8, tenant=t) for t in "ab" for i in range(3)]
    settings = fair_share.FairShareSettings()
    order = fair_share.FairShareLedger().order(queue, [], settings)
    assert [r.request_id for r in order] == ["a0", "b0", "a1", "b1", "a2", "b2"]
    assert fair_share.tenant_of(_request("x", 3)) == fair_share.DEFAULT_TENANT
    assert fair_share.remaining_work(queue[0]) == 8 + 4 - 1


def test_the_policies_refuse_a_priority_queue() -> None:
    from types import SimpleNamespace

    from vllm.v1.core.sched.request_queue import SchedulingPolicy, create_request_queue

    from vllm_custom_patches_catalogue._queue import require_admission_order

    fcfs = SimpleNamespace(waiting=create_request_queue(SchedulingPolicy.FCFS), policy=SchedulingPolicy.FCFS)
    require_admission_order(fcfs, "shortest_prompt_first")
    assert isinstance(fcfs.waiting, deque)
    prio = SimpleNamespace(waiting=create_request_queue(SchedulingPolicy.PRIORITY), policy=SchedulingPolicy.PRIORITY)
    with pytest.raises(PatchConfigError, match=r"'priority'.*--scheduling-policy fcfs"):
        require_admission_order(prio, "shortest_prompt_first")


# -- a live apply meets the schedulers that already run -------------------------------


def _real_scheduler(directory: Path, policy: str, cls: Any = None) -> Any:
    """A real vLLM Scheduler (or AsyncScheduler) as EngineCore builds one, on the tiny model; no engine."""
    import torch
    from vllm.config import CacheConfig, ModelConfig, SchedulerConfig, VllmConfig
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    from vllm_custom_patches.testing import write_tiny_model

    model = ModelConfig(
        model=str(write_tiny_model(directory)), skip_tokenizer_init=True, max_model_len=128, dtype="float32"
    )
    cache = CacheConfig(
        block_size=16, cache_dtype="auto", enable_prefix_caching=False
    )  # its requests carry no block hashes
    cache.num_gpu_blocks = 64
    config = VllmConfig(
        model_config=model,
        cache_config=cache,
        scheduler_config=SchedulerConfig(
            max_num_seqs=4, max_num_batched_tokens=128, max_model_len=128, policy=policy, is_encoder_decoder=False
        ),
    )
    spec = FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=64, dtype=torch.float32)
    kv_cache = KVCacheConfig(num_blocks=64, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(["layer"], spec)])
    return (cls or Scheduler)(
        vllm_config=config,
        kv_cache_config=kv_cache,
        structured_output_manager=StructuredOutputManager(config),
        block_size=16,
    )


@pytest.mark.parametrize("name", ["shortest_prompt_first", "fair_share"])
def test_a_live_apply_to_a_running_priority_scheduler_is_refused_and_it_keeps_scheduling(
    classes: tuple[type, type], tmp_path: Path, name: str
) -> None:
    import gc

    scheduler_cls, async_cls = classes
    running = _real_scheduler(tmp_path, "priority", async_cls)  # the class vLLM instantiates by default
    running.add_request(_request("r1", 8))
    before, before_async = snapshot_namespace(scheduler_cls), snapshot_namespace(async_cls)
    gc.freeze()  # as EngineCore does once it is built: the scheduler is then invisible to gc's walks
    try:
        with pytest.raises(PatchConfigError, match=r"scheduling policy 'priority'.*--scheduling-policy fcfs"):
            PatchManager.apply(name)
    finally:
        gc.unfreeze()
    before.assert_unchanged()
    before_async.assert_unchanged()
    assert not PatchManager.is_applied(name)
    # Refused, so the engine's next step is vLLM's own, and it schedules.
    assert running.schedule().total_num_scheduled_tokens == 8


@pytest.mark.parametrize("name", ["shortest_prompt_first", "fair_share"])
def test_a_live_apply_to_a_running_fcfs_scheduler_is_accepted_and_schedules(
    classes: tuple[type, type], tmp_path: Path, name: str
) -> None:
    scheduler_cls, _ = classes
    running = _real_scheduler(tmp_path, "fcfs")
    queue = running.waiting
    for request_id, length in (("long", 40), ("short", 4)):
        running.add_request(_request(request_id, length))
    before = snapshot_namespace(scheduler_cls)
    assert PatchManager.apply(name) is True
    try:
        output = running.schedule()  # the patched schedule on a scheduler built before the patch
        assert output.total_num_scheduled_tokens == 44 and running.waiting is queue
        admitted = [new.req_id for new in output.scheduled_new_reqs]
        assert admitted == (["short", "long"] if name == "shortest_prompt_first" else ["long", "short"])
    finally:
        PatchManager.rollback(name)
    before.assert_unchanged()


# -- vLLM 0.34's configurations that bypass the policies, on the real 0.32 classes --------
# vLLM 0.34 cannot run here (no CPU build past 0.32.0), so each test gives a real 0.32
# Scheduler what 0.34's Scheduler.__init__ sets for that configuration: the patches read
# those attributes with defaults, and 0.32 itself (no such attribute) must keep working.


def _as_0_34(scheduler: Any, bypass: str) -> None:
    """Set on ``scheduler`` what vLLM 0.34's ``__init__`` sets under ``bypass``."""
    from vllm.v1.core.sched.request_queue import create_request_queue

    if bypass == "cache-aware admission":  # --cache-aware-admission-window 4, FCFS, prefix caching on
        scheduler.cache_aware_window = 4
    else:  # a KV connector and --max-num-inflight-kv-loads 2
        scheduler.async_kv_waiting = create_request_queue(scheduler.policy)
        scheduler.connector = object()
        # 0.32's SchedulerConfig has no such field (and validates assignments).
        object.__setattr__(scheduler.scheduler_config, "max_num_inflight_kv_loads", 2)


BYPASSES = {
    "cache-aware admission": "--cache-aware-admission-window 4",
    "async KV loads": "--max-num-inflight-kv-loads 2",
}


@pytest.mark.parametrize("name", ["shortest_prompt_first", "fair_share"])
@pytest.mark.parametrize("bypass", sorted(BYPASSES))
def test_a_policy_refuses_to_start_a_real_scheduler_configured_as_vllm_0_34_bypasses_it(
    classes: tuple[type, type], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str, bypass: str
) -> None:
    scheduler_cls, async_cls = classes
    vllm_init = scheduler_cls.__init__

    def init_as_0_34(self: Any, *args: Any, **kwargs: Any) -> None:
        vllm_init(self, *args, **kwargs)
        _as_0_34(self, bypass)

    monkeypatch.setattr(scheduler_cls, "__init__", init_as_0_34)
    PatchManager.apply(name)
    try:
        with pytest.raises(PatchConfigError) as info:
            _real_scheduler(tmp_path, "fcfs", async_cls)  # the class vLLM instantiates by default
    finally:
        PatchManager.rollback(name)
    assert BYPASSES[bypass] in str(info.value) and repr(name) in str(info.value)


@pytest.mark.parametrize("name", ["shortest_prompt_first", "fair_share"])
@pytest.mark.parametrize("bypass", sorted(BYPASSES))
def test_a_live_apply_to_a_real_scheduler_configured_as_vllm_0_34_bypasses_it_is_refused(
    classes: tuple[type, type], tmp_path: Path, name: str, bypass: str
) -> None:
    scheduler_cls, async_cls = classes
    running = _real_scheduler(tmp_path, "fcfs", async_cls)
    _as_0_34(running, bypass)
    before, before_async = snapshot_namespace(scheduler_cls), snapshot_namespace(async_cls)
    with pytest.raises(PatchConfigError, match=BYPASSES[bypass]):
        PatchManager.apply(name)
    before.assert_unchanged()
    before_async.assert_unchanged()
    assert not PatchManager.is_applied(name)


@pytest.mark.usefixtures("classes")
def test_the_trace_counts_what_the_real_scheduler_counts_as_waiting(tmp_path: Path) -> None:
    running = _real_scheduler(tmp_path, "fcfs")
    for request_id in ("a", "b", "c"):
        running.add_request(_request(request_id, 8))
    assert scheduler_trace.waiting_count(running) == 3 == running.get_request_counts()[1]
    _as_0_34(running, "async KV loads")
    running.async_kv_waiting.add_request(_request("d", 8))
    assert scheduler_trace.waiting_count(running) == 4


def test_the_policies_schedule_without_judging_the_configuration_per_step(classes: tuple[type, type]) -> None:
    # Configuration is refused at start-up (__init__) and at a live apply (check_live); schedule() never raises for it.
    import inspect

    for patch in (shortest_prompt_first.ShortestPromptFirst, fair_share.FairShare):
        body = inspect.getsource(patch._vcp_spec.members["schedule"])  # type: ignore[arg-type]
        assert "require_admission_order" not in body and "raise" not in body
        assert patch._vcp_checks_live and "check_live" not in patch._vcp_spec.members
