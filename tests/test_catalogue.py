"""The shipped catalogue (patches/) without vLLM: policies, settings, trace file, packaging.

What needs the real ``Scheduler`` or an engine is in tests/real_vllm/.
"""

from __future__ import annotations

import importlib
import json
import multiprocessing
import subprocess
import sys
from collections import deque
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import importlib_metadata
import pytest

from vllm_custom_patches import PatchConfigError, PatchManager, VLLMPatch
from vllm_custom_patches_catalogue import _settings, fair_share, scheduler_trace, shortest_prompt_first

MODULES = {"shortest_prompt_first": shortest_prompt_first, "fair_share": fair_share, "scheduler_trace": scheduler_trace}
PATCHES = {
    "shortest_prompt_first": shortest_prompt_first.ShortestPromptFirst,
    "fair_share": fair_share.FairShare,
    "scheduler_trace": scheduler_trace.SchedulerTrace,
}
ENV_VARS = {
    "shortest_prompt_first": ["VLLM_CUSTOM_PATCHES_SPF_MAX_WAIT_S"],
    "fair_share": ["VLLM_CUSTOM_PATCHES_FAIR_SHARE_KEY", "VLLM_CUSTOM_PATCHES_FAIR_SHARE_WEIGHTS"],
    "scheduler_trace": ["VLLM_CUSTOM_PATCHES_TRACE_FILE"],
}


def req(
    rid: str, prompt: int, *, tenant: str | None = None, arrival: float = 0.0, max_tokens: int = 4, computed: int = 0
) -> Any:
    """A stand-in with the attributes of ``vllm.v1.request.Request`` the policies read."""
    params = SimpleNamespace(extra_args={"tenant": tenant} if tenant is not None else None)
    return SimpleNamespace(
        request_id=rid, num_prompt_tokens=prompt, arrival_time=arrival, max_tokens=max_tokens,
        num_computed_tokens=computed, sampling_params=params,
    )  # fmt: skip


def ids(requests: list[Any]) -> list[str]:
    return [r.request_id for r in requests]


# -- packaging and documentation ------------------------------------------------


@pytest.mark.parametrize("name", sorted(PATCHES))
def test_each_patch_is_an_entry_point_named_after_it(name: str) -> None:
    (ep,) = [ep for ep in importlib_metadata.entry_points(group="vllm_custom_patches") if ep.name == name]
    assert ep.load() is PATCHES[name]
    assert PATCHES[name].name == name


def test_every_catalogue_module_is_declared() -> None:
    package = Path(shortest_prompt_first.__file__).parent
    modules = {p.stem for p in package.glob("*.py") if not p.name.startswith("_")}
    declared = {ep.module.rsplit(".", 1)[1] for ep in importlib_metadata.entry_points(group="vllm_custom_patches")
                if ep.module.startswith("vllm_custom_patches_catalogue.")}  # fmt: skip
    assert modules == declared == set(PATCHES)


@pytest.mark.parametrize("name", sorted(PATCHES))
def test_each_patch_documents_why_what_versions_settings_and_removal(name: str) -> None:
    patch = PATCHES[name]
    doc = patch.__doc__ or ""
    for section in ("Why:", "What it changes:", "vLLM versions:", "How to remove:", "Settings"):
        assert section in doc, f"{name}: docstring lacks {section!r}"
    for variable in ENV_VARS[name]:
        assert variable in doc
        assert variable.startswith("VLLM_")  # so vLLM's Ray executor copies it to remote workers
    assert "0.32.0" in doc and "0.33.0" in doc and "0.34.0" in doc
    assert patch._vcp_gate is not None and str(patch._vcp_gate) in ("<0.35,>=0.32", ">=0.32,<0.35")
    assert patch._vcp_spec.target == "vllm.v1.core.sched.scheduler:Scheduler"


def test_importing_the_catalogue_does_not_import_vllm() -> None:
    code = (
        "import sys\n"
        "import vllm_custom_patches_catalogue.shortest_prompt_first, vllm_custom_patches_catalogue.fair_share\n"
        "import vllm_custom_patches_catalogue.scheduler_trace\n"
        "print(sorted(m for m in sys.modules if m == 'vllm' or m.startswith('vllm.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# -- shortest prompt first -------------------------------------------------------


def test_shortest_prompt_first_is_stable_among_equal_lengths() -> None:
    queue = [req("a", 9), req("b", 3), req("c", 9), req("d", 3), req("e", 1)]
    assert ids(shortest_prompt_first.spf_order(queue, now=0, max_wait_s=None)) == ["e", "b", "d", "a", "c"]


def test_requests_past_the_max_wait_go_first_oldest_first() -> None:
    queue = [req("new-long", 50, arrival=99), req("old-long", 40, arrival=10), req("short", 2, arrival=98),
             req("older-long", 60, arrival=5)]  # fmt: skip
    order = shortest_prompt_first.spf_order(queue, now=100, max_wait_s=30)
    assert ids(order) == ["older-long", "old-long", "short", "new-long"]


def test_reorder_in_place_keeps_the_queue_object_and_skips_no_op_reorders() -> None:
    from collections import deque

    from vllm_custom_patches_catalogue._queue import reorder_in_place

    class Watched(deque):  # type: ignore[type-arg]
        cleared = 0

        def clear(self) -> None:
            Watched.cleared += 1
            super().clear()

    queue = Watched([req("a", 5), req("b", 1)])
    reorder_in_place(queue, list(queue))
    assert Watched.cleared == 0
    reorder_in_place(queue, shortest_prompt_first.spf_order(queue, now=0, max_wait_s=None))
    assert Watched.cleared == 1 and ids(list(queue)) == ["b", "a"]


# -- fair share -------------------------------------------------------------------


def test_fair_share_alternates_equal_tenants() -> None:
    queue = [req(f"a{i}", 8, tenant="a") for i in range(3)] + [req(f"b{i}", 8, tenant="b") for i in range(3)]
    order = fair_share.FairShareLedger().order(queue, [], fair_share.FairShareSettings())
    assert ids(order) == ["a0", "b0", "a1", "b1", "a2", "b2"]


def test_fair_share_weights_give_proportional_admission() -> None:
    queue = [req(f"a{i}", 8, tenant="a") for i in range(6)] + [req(f"b{i}", 8, tenant="b") for i in range(2)]
    settings = fair_share.FairShareSettings(weights={"a": 3.0})
    order = ids(fair_share.FairShareLedger().order(queue, [], settings))
    assert order[:4].count("b0") == 1 and sum(r.startswith("a") for r in order[:4]) == 3


def test_fair_share_counts_the_work_still_ahead_of_running_requests() -> None:
    ledger, settings = fair_share.FairShareLedger(), fair_share.FairShareSettings()
    running = [req("a0", 8, tenant="a", max_tokens=20, computed=8)]  # prefilled; 19 decode steps to come
    ledger.order([], running, settings)
    ledger.charge({"a0": 8}, {"a0": running[0]}, settings)
    queue = [req("b0", 8, tenant="b"), req("a1", 8, tenant="a"), req("b1", 8, tenant="b")]
    # b arrives now and starts at the virtual time, a's 8 tokens.  Start tags:
    # b0 8, b1 8 + (8 + 4 - 1) = 19, a1 8 + 19 = 27 (it would be 8, before b1,
    # if the work still ahead of a0 were not counted).
    assert ids(ledger.order(queue, running, settings)) == ["b0", "b1", "a1"]


def test_an_idle_tenant_earns_no_credit() -> None:
    ledger, settings = fair_share.FairShareLedger(), fair_share.FairShareSettings()
    # a and b have used 1000 tokens each; then c appears for the first time.
    ledger.order([req("a0", 8, tenant="a"), req("b0", 8, tenant="b")], [], settings)
    ledger.charge({"a0": 1000, "b0": 1000}, {"a0": req("a0", 8, tenant="a"), "b0": req("b0", 8, tenant="b")}, settings)
    queue = [req(f"c{i}", 8, tenant="c") for i in range(3)] + [req("a1", 8, tenant="a"), req("b1", 8, tenant="b")]
    order = ids(ledger.order(queue, [], settings))
    assert order[:3] == ["c0", "a1", "b1"]  # c starts at the virtual time (1000), not at 0
    assert ledger.usage["c"] == 1000


def test_requests_without_a_tenant_share_the_default_one() -> None:
    assert fair_share.tenant_of(req("x", 1)) == fair_share.DEFAULT_TENANT
    assert fair_share.tenant_of(SimpleNamespace(sampling_params=None)) == fair_share.DEFAULT_TENANT
    assert fair_share.tenant_of(req("x", 1, tenant="t"), "tenant") == "t"
    assert fair_share.tenant_of(req("x", 1, tenant="t"), "team") == fair_share.DEFAULT_TENANT


# -- settings ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [("", {}), ("a=2", {"a": 2.0}), (" gold = 3 , silver=0.5,", {"gold": 3.0, "silver": 0.5})],
)
def test_weights_parse(value: str, expected: dict[str, float]) -> None:
    assert _settings.env_weights({"W": value}, "W") == expected


@pytest.mark.parametrize("value", ["a", "a=", "=2", "a=0", "a=-1", "a=nan", "a=inf", "a=1,a=2", "a=x"])
def test_bad_weights_are_refused_with_the_variable_named(value: str) -> None:
    with pytest.raises(PatchConfigError, match=r"^W="):
        _settings.env_weights({"W": value}, "W")


@pytest.mark.parametrize("value", ["0", "-3", "soon", "nan", "inf"])
def test_bad_durations_are_refused(value: str) -> None:
    with pytest.raises(PatchConfigError, match="positive number of seconds"):
        _settings.env_positive_float({"T": value}, "T", unit="seconds")
    assert _settings.env_positive_float({"T": " 2.5 "}, "T", unit="seconds") == 2.5
    assert _settings.env_positive_float({}, "T", unit="seconds") is None


class _Target:
    def step(self) -> str:
        return "original"


def test_applied_settings_are_read_at_apply_and_a_bad_one_undoes_the_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm_custom_patches.testing import snapshot_namespace

    def parse(environ: Any) -> float | None:
        return _settings.env_positive_float(environ, "VCP_TEST_SETTING", unit="seconds")

    class Configured(VLLMPatch[_Target]):
        _configured_settings = _settings.AppliedSettings(parse)

        def step(self) -> str:
            return f"patched {self._configured_settings}"

    before = snapshot_namespace(_Target)
    monkeypatch.setenv("VCP_TEST_SETTING", "never")
    with pytest.raises(PatchConfigError, match="VCP_TEST_SETTING"):
        PatchManager.apply(Configured)
    before.assert_unchanged()
    monkeypatch.setenv("VCP_TEST_SETTING", "4")
    Configured.apply()
    monkeypatch.setenv("VCP_TEST_SETTING", "5")
    assert _Target().step() == "patched 4.0"  # read once, when applied
    Configured.rollback()
    before.assert_unchanged()


# -- the trace file -------------------------------------------------------------------


def _append_many(path: str, writer: int, count: int) -> None:
    for i in range(count):
        scheduler_trace.append_line(path, {"writer": writer, "i": i, "pad": "x" * 3000})


def test_trace_lines_from_concurrent_processes_never_interleave(tmp_path: Path) -> None:
    path = str(tmp_path / "trace.jsonl")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append_many, args=(path, w, 200)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    lines = Path(path).read_text().splitlines()
    assert len(lines) == 800
    records = [json.loads(line) for line in lines]  # each line is whole
    for w in range(4):
        assert [r["i"] for r in records if r["writer"] == w] == list(range(200))


def test_read_trace_of_a_missing_file_is_empty(tmp_path: Path) -> None:
    assert scheduler_trace.read_trace(tmp_path / "none.jsonl") == []


def test_trace_record_describes_one_step() -> None:
    new = [SimpleNamespace(req_id="r1-abcdefgh", prompt_token_ids=[1, 2, 3])]
    output = SimpleNamespace(
        scheduled_new_reqs=new, scheduled_cached_reqs=SimpleNamespace(req_ids=["r0-12345678"]),
        num_scheduled_tokens={"r1-abcdefgh": 3, "r0-12345678": 1}, total_num_scheduled_tokens=4,
        finished_req_ids={"r9-00000000"}, preempted_req_ids=None,
    )  # fmt: skip
    scheduler = SimpleNamespace(current_step=7, running=[1, 2], waiting=[3], kv_holding_waiting=[])  # vLLM 0.32/0.33
    record = scheduler_trace.trace_record(scheduler, output)
    assert record["step"] == 7 and record["scheduled"] == ["r1-abcdefgh", "r0-12345678"]
    assert record["new"] == ["r1-abcdefgh"] and record["prompt_tokens"] == {"r1-abcdefgh": 3}
    assert record["tokens"] == {"r1-abcdefgh": 3, "r0-12345678": 1} and record["total_tokens"] == 4
    assert record["finished"] == ["r9-00000000"] and record["preempted"] == []
    assert (record["running"], record["waiting"]) == (2, 1)
    assert json.loads(json.dumps(record)) == record


def test_the_trace_counts_every_waiting_queue_of_vllm_0_34() -> None:
    # vLLM 0.34 keeps requests whose KV load waits for a slot in a third queue, async_kv_waiting,
    # and counts it in get_request_counts; 0.32 has waiting and kv_holding_waiting only.
    new_034 = _Scheduler034(inflight=2, connector=object())
    new_034.waiting.extend([req("w", 3)])
    new_034.kv_holding_waiting.extend([req("k", 3)])
    new_034.async_kv_waiting.extend([req("a1", 3), req("a2", 3)])
    assert scheduler_trace.waiting_count(new_034) == 4 == new_034.get_request_counts()[1]
    old_032 = SimpleNamespace(waiting=[1], kv_holding_waiting=[2, 3])
    assert scheduler_trace.waiting_count(old_032) == 3
    assert scheduler_trace.waiting_count(SimpleNamespace(waiting=[1, 2])) == 2
    assert scheduler_trace.trace_record(new_034, _output())["waiting"] == 4


# -- the policies against the scheduler of vLLM 0.34 (a stand-in, no vLLM) -------------


class _Queue(deque):  # type: ignore[type-arg]
    """vLLM's FCFSRequestQueue: a deque with the methods the scheduler calls."""

    def add_request(self, request: Any) -> None:
        self.append(request)

    def pop_request(self) -> Any:
        return self.popleft()


class _Scheduler034:
    """What vLLM 0.34's ``Scheduler.__init__`` sets that the policies depend on, and a ``schedule``
    that admits as 0.34's does: ``kv_holding_waiting`` first, then the head of ``waiting`` or of
    ``async_kv_waiting``, whichever arrived first (``_next_waiting_queue``)."""

    def __init__(self, *, window: int = 0, connector: Any = None, inflight: int | None = None) -> None:
        self.policy = SimpleNamespace(value="fcfs")
        self.waiting, self.kv_holding_waiting, self.async_kv_waiting = _Queue(), _Queue(), _Queue()
        self.running: list[Any] = []
        self.requests: dict[str, Any] = {}
        self.connector = connector
        self.scheduler_config = SimpleNamespace(max_num_inflight_kv_loads=inflight, cache_aware_admission_window=window)
        self.cache_aware_window = window  # 0.34 sets the window only with FCFS and prefix caching
        self.current_step = 0

    def add_request(self, request: Any, *, async_kv: bool = False) -> None:
        self.requests[request.request_id] = request
        use_async = async_kv and self.connector is not None and self.scheduler_config.max_num_inflight_kv_loads
        (self.async_kv_waiting if use_async else self.waiting).add_request(request)

    def get_request_counts(self) -> tuple[int, int]:
        return len(self.running), len(self.waiting) + len(self.kv_holding_waiting) + len(self.async_kv_waiting)

    def schedule(self, throttle_prefills: bool = False) -> Any:
        admitted = []
        while len(admitted) < 2 and (self.kv_holding_waiting or self.waiting or self.async_kv_waiting):
            queue = self.kv_holding_waiting or self._next_waiting_queue()
            admitted.append(queue.pop_request())
        self.running += admitted
        output = _output({r.request_id: r.num_prompt_tokens for r in admitted})
        self._update_after_schedule(output)
        return output

    def _next_waiting_queue(self) -> Any:
        if not self.async_kv_waiting:
            return self.waiting
        if not self.waiting:
            return self.async_kv_waiting
        first = self.async_kv_waiting[0].arrival_time < self.waiting[0].arrival_time
        return self.async_kv_waiting if first else self.waiting

    def _update_after_schedule(self, scheduler_output: Any) -> None:
        self.current_step += 1


def _output(tokens: dict[str, int] | None = None) -> Any:
    tokens = tokens or {}
    return SimpleNamespace(
        scheduled_new_reqs=[SimpleNamespace(req_id=rid, prompt_token_ids=[0] * n) for rid, n in tokens.items()],
        scheduled_cached_reqs=SimpleNamespace(req_ids=[]), num_scheduled_tokens=dict(tokens),
        total_num_scheduled_tokens=sum(tokens.values()), finished_req_ids=set(), preempted_req_ids=None,
    )  # fmt: skip


@pytest.fixture
def vllm_034(monkeypatch: pytest.MonkeyPatch) -> type[_Scheduler034]:
    """The policies' target, ``vllm.v1.core.sched.scheduler:Scheduler``, as a stand-in of vLLM 0.34's."""
    import types

    module = types.ModuleType("vllm.v1.core.sched.scheduler")
    cls = type("Scheduler", (_Scheduler034,), {"__module__": module.__name__})
    module.Scheduler = cls  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setenv("VLLM_CUSTOM_PATCHES_VLLM_VERSION", "0.34.0")
    monkeypatch.delenv("VLLM_CUSTOM_PATCHES_SPF_MAX_WAIT_S", raising=False)
    return cls


POLICIES = ["shortest_prompt_first", "fair_share"]
BYPASSES = {
    # What 0.34 is started with -> the setting the refusal names, and the way out it offers.
    "cache-aware admission": ({"window": 8}, "--cache-aware-admission-window 8", "--cache-aware-admission-window 0"),
    "async KV loads": ({"connector": object(), "inflight": 4}, "--max-num-inflight-kv-loads 4",
                       "without --max-num-inflight-kv-loads"),
}  # fmt: skip


@pytest.mark.parametrize("name", POLICIES)
@pytest.mark.parametrize("bypass", sorted(BYPASSES))
def test_a_policy_refuses_to_start_where_vllm_0_34_would_bypass_its_order(
    vllm_034: type[_Scheduler034], name: str, bypass: str
) -> None:
    settings, setting, fix = BYPASSES[bypass]
    PatchManager.apply(name)
    try:
        with pytest.raises(PatchConfigError) as info:
            vllm_034(**settings)  # type: ignore[arg-type]
    finally:
        PatchManager.rollback(name)
    message = str(info.value)
    assert setting in message and fix in message and repr(name) in message
    assert "\n" not in message


@pytest.mark.parametrize("name", POLICIES)
@pytest.mark.parametrize(
    "settings",
    [{}, {"inflight": 4}, {"connector": object()}],  # the default; a limit with no connector; a connector, no limit
    ids=["default", "limit-without-connector", "connector-without-limit"],
)
def test_a_policy_starts_where_vllm_0_34_admits_in_its_order(
    vllm_034: type[_Scheduler034], name: str, settings: dict[str, Any]
) -> None:
    PatchManager.apply(name)
    try:
        scheduler = vllm_034(**settings)
        for request in (req("long", 40, tenant="a", arrival=1), req("a2", 40, tenant="a", arrival=2),
                        req("short", 4, tenant="b", arrival=3)):  # fmt: skip
            scheduler.add_request(request, async_kv=True)  # async only where 0.34 would queue it so
        assert not scheduler.async_kv_waiting
        output = scheduler.schedule()
    finally:
        PatchManager.rollback(name)
    expected = ["short", "long"] if name == "shortest_prompt_first" else ["long", "short"]
    assert [r.req_id for r in output.scheduled_new_reqs] == expected


@pytest.mark.parametrize("name", POLICIES)
@pytest.mark.parametrize("bypass", sorted(BYPASSES))
def test_a_live_apply_to_a_vllm_0_34_scheduler_that_would_bypass_the_policy_is_refused(
    vllm_034: type[_Scheduler034], name: str, bypass: str
) -> None:
    from vllm_custom_patches.testing import snapshot_namespace

    settings, setting, _ = BYPASSES[bypass]
    running = vllm_034(**settings)  # type: ignore[arg-type]
    before = snapshot_namespace(vllm_034)
    with pytest.raises(PatchConfigError, match=setting):
        PatchManager.apply(name)
    assert not PatchManager.is_applied(name)
    before.assert_unchanged()
    assert running.schedule().total_num_scheduled_tokens == 0  # vLLM's own schedule, unpatched


def test_catalogue_modules_reload_cleanly() -> None:
    # The plugin may import a catalogue module in a process where it was imported before.
    for module in MODULES.values():
        assert importlib.import_module(module.__name__) is module
