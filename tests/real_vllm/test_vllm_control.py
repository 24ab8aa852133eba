"""The kill switch on a real ``vllm serve``: a patch rolled back and re-applied in every process, live.

One tensor-parallel-2 server for the module (API server, engine core, two
workers) with ``shortest_prompt_first``, ``scheduler_trace``, a worker-side
patch (it also shows where each patch runs with tensor parallelism) and the
example package's stackable observer ``schedule_log`` (stacked outside
``shortest_prompt_first`` on ``Scheduler.schedule``) selected, and
``VLLM_CUSTOM_PATCHES_CONTROL_TOKEN`` set.  Each test leaves
every patch applied, as it found it.  Evidence comes from inside the processes:
the scheduler trace (written by the engine core) shows the admission order
the live scheduler chose; the worker patch writes its rank and pid from each
worker; ``GET /custom_patches`` and ``/metrics`` show every process's state.
The requests whose order is measured are held by the test-only
``AdmissionGate`` (``_admission_gate.py``) until all of them have reached the
engine core, so the order is the policy's, whatever the machine's speed.
"""

from __future__ import annotations

import functools
import json
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from _admission_gate import held_lines, wait_held, write_admission_gate
from _engine import SPF_REQUESTS, _stop_group, free_port, launch_serve, prompt_ids, wait_ready, write_rank_witness
from _server import complete, control, request, states, status

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

TOKEN = "control-test-token-0123456789"
CLI = str(Path(sys.executable).with_name("vllm-custom-patches"))
#: Prompt length of the background stream's requests: no admission-order request has it.
STREAM_LEN = 7
#: The prompt whose output tokens are compared with an unpatched engine's.
PROBE = prompt_ids(42, 12)
PROBE_TOKENS = 8
#: The requests whose admission order is measured, in arrival order: (prompt length, max_tokens).
ORDERED = [(length, max_tokens) for _, length, max_tokens in SPF_REQUESTS[1:]]


@dataclass
class ControlServer:
    port: int
    model: str
    proc: subprocess.Popen[bytes]
    log: Path
    trace: Path
    witness: Path
    tamper: Path
    observed: Path
    """``schedule_log``'s file: one JSON line per scheduler step that admitted requests."""
    gate: Path
    """The AdmissionGate's log: one line per request it held."""
    reference: list[int]
    """The probe's output tokens from an unpatched engine of the same shape."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def server(vllm_workspace: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlServer]:
    from vllm_custom_patches.testing import run_engine

    tmp = tmp_path_factory.mktemp("control")
    model = str(vllm_workspace.model)
    tp2 = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}
    env = vllm_workspace.env(
        **tp2,
        VLLM_PLUGINS="custom_patches",
        VLLM_CUSTOM_PATCHES="shortest_prompt_first,scheduler_trace,RankWitness,AdmissionGate,schedule_log",
        VLLM_PATCHES_EXAMPLE_SCHEDULE_LOG=str(tmp / "schedule_log.jsonl"),
        VLLM_CUSTOM_PATCHES_PATH=str(write_admission_gate(write_rank_witness(tmp / "patches"))),
        VCP_GATE_LENGTHS=",".join(str(length) for length, _ in ORDERED),
        VCP_GATE_LOG=str(tmp / "gate.jsonl"),
        VLLM_CUSTOM_PATCHES_TRACE_FILE=str(tmp / "trace.jsonl"),
        VLLM_CUSTOM_PATCHES_CONTROL_TOKEN=TOKEN,
        VLLM_SERVER_DEV_MODE="1",  # vLLM's dev routes: POST /collective_rpc reaches both workers
        VCP_RANK_WITNESS_FILE=str(tmp / "ranks.jsonl"),
        VCP_TAMPER_IN_PROCESS="VllmWorker-1",
        VCP_TAMPER_FILE=str(tmp / "tamper-now"),
    )
    port, log = free_port(), tmp / "server.log"
    proc = launch_serve(model, env, log, ["--host", "127.0.0.1", "--port", str(port), "--tensor-parallel-size", "2"])
    try:
        # The unpatched baseline (same model, same tensor parallelism, nothing selected), computed
        # while the server starts up: start-up mostly waits on one process at a time.
        baseline = run_engine(model, patches=[], prompts=[PROBE], max_tokens=PROBE_TOKENS, timeout=600,
                              engine_args={"tensor_parallel_size": 2}, env=tp2, workdir=tmp / "baseline")  # fmt: skip
        assert baseline.processes and not any(p.applied for p in baseline.processes)
        print(f"tensor parallel 2 with control ready in {wait_ready(port, {log: proc}, timeout=600):.1f}s")
        yield ControlServer(port, model, proc, log, tmp / "trace.jsonl", tmp / "ranks.jsonl", tmp / "tamper-now",
                            tmp / "schedule_log.jsonl", tmp / "gate.jsonl", list(baseline.outputs[0]))  # fmt: skip
    finally:
        _stop_group(proc)


# -- HTTP helpers (``_server``) ------------------------------------------------------------

#: ``POST /custom_patches/NAME/ACTION`` with this server's control token unless ``token=`` says otherwise.
_control = functools.partial(control, token=TOKEN)


def _run_cli(server: ControlServer, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, *args, "--url", server.url], capture_output=True, text=True, timeout=120)


# -- admission order, read from the engine core's trace ---------------------------------


def _admitted_since(server: ControlServer, since: float) -> list[int]:
    """Prompt lengths of the requests the scheduler admitted since ``since``, in order."""
    order: list[int] = []
    if not server.trace.exists():
        return order
    for line in server.trace.read_text().splitlines():
        step = json.loads(line)
        if step["time"] >= since:
            order += [step["prompt_tokens"][rid] for rid in step["new"] if rid in step["prompt_tokens"]]
    return order


def _admission_order(server: ControlServer) -> list[int]:
    """Submit ORDERED, each once the previous one is held at the gate; the order they were admitted in (prompt lengths).

    The gate releases them into the waiting queue together, in arrival
    order, when the last one arrives: whatever runs at that moment, the live
    policy alone orders them.
    """
    since = time.time()
    base = held_lines(server.gate)
    with ThreadPoolExecutor(max_workers=len(ORDERED)) as pool:
        answers = []
        for index, (length, max_tokens) in enumerate(ORDERED, start=1):
            answers.append(pool.submit(complete, server, prompt_ids(index, length), max_tokens))
            # Arrival order = submission order: this one reached the engine core before the next is sent.
            assert wait_held(server.gate, base + index)[-1] == length
        served = [len(answer.result(timeout=180)) for answer in answers]
    assert served == [max_tokens for _, max_tokens in ORDERED]
    lengths = {length for length, _ in ORDERED}
    return [n for n in _admitted_since(server, since) if n in lengths]


FCFS = [length for length, _ in ORDERED]  # arrival order
SHORTEST_FIRST = sorted(FCFS)


class _Stream:
    """A client that keeps completions going (bounded in count and time) and records every failure."""

    def __init__(self, server: ControlServer, limit: int = 400, seconds: float = 240, minimum: int = 5) -> None:
        self.server, self.limit, self.seconds, self.minimum = server, limit, seconds, minimum
        self.outputs: list[list[int]] = []
        self.failures: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        deadline = time.monotonic() + self.seconds
        while not self._stop.is_set() and time.monotonic() < deadline and len(self.outputs) < self.limit:
            try:
                self.outputs.append(complete(self.server, prompt_ids(99, STREAM_LEN), 6))
            except BaseException as exc:  # collected and asserted by the test
                self.failures.append(exc)

    def __enter__(self) -> _Stream:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        # The test asserts on what the stream served: on a slow machine, let it reach
        # ``minimum`` first (its own count and time bounds still end it).
        while len(self.outputs) < self.minimum and not self.failures and self._thread.is_alive():
            time.sleep(0.05)
        self._stop.set()
        self._thread.join(timeout=180)


def _toggle_timings(server: ControlServer, rounds: int) -> list[float]:
    timings = []
    for _ in range(rounds):
        for action in ("rollback", "apply"):
            started = time.monotonic()
            code, report = _control(server, action, "shortest_prompt_first")
            timings.append(time.monotonic() - started)
            assert code == 200 and report["ok"], report
    return timings


def test_rollback_and_reapply_under_a_stream_of_requests_switch_the_live_scheduler(server: ControlServer) -> None:
    with _Stream(server) as stream:
        assert complete(server, PROBE, PROBE_TOKENS) == server.reference  # patched: same tokens as unpatched vLLM
        assert _admission_order(server) == SHORTEST_FIRST

        code, report = _control(server, "rollback", "shortest_prompt_first", body=b'{"reason": "p99 regression"}')
        assert code == 200 and report["ok"], report
        changed = [(p["role"], p["pid"]) for p in report["processes"] if p["changed"] and not p.get("waiting")]
        (core,) = [p for p in status(server)["processes"] if p["role"] == "engine_core"]
        assert changed == [("engine_core", core["pid"])]  # the scheduler lives there only
        # Elsewhere the patch waited for an import of the scheduler that never came: disarmed there.
        assert all(p["state"] == "available" for p in report["processes"] if p.get("waiting")), report
        assert states(server, "shortest_prompt_first")[("engine_core", None)] == "available"
        assert _admission_order(server) == FCFS  # vLLM's own first-come-first-served, live
        assert complete(server, PROBE, PROBE_TOKENS) == server.reference

        code, report = _control(server, "apply", "shortest_prompt_first")
        assert code == 200 and report["ok"], report
        assert states(server, "shortest_prompt_first")[("engine_core", None)] == "applied"
        assert _admission_order(server) == SHORTEST_FIRST
        assert complete(server, PROBE, PROBE_TOKENS) == server.reference

        loaded = _toggle_timings(server, rounds=5)
    assert not stream.failures, stream.failures[:3]
    assert len(stream.outputs) >= 5 and len({tuple(o) for o in stream.outputs}) == 1  # every one served, identically
    idle = _toggle_timings(server, rounds=5)
    print(f"toggle (POST to answer, every process switched): median {statistics.median(idle) * 1000:.0f} ms idle, "
          f"{statistics.median(loaded) * 1000:.0f} ms under load; {len(stream.outputs)} streamed requests, none failed")  # fmt: skip
    log = server.log.read_text(errors="replace")
    assert "rollback of patch 'shortest_prompt_first' requested by 127.0.0.1:" in log and "(p99 regression)" in log


def _schedule_chain(server: ControlServer) -> str:
    (core,) = [p for p in status(server)["processes"] if p["role"] == "engine_core"]
    (line,) = [line for line in core.get("stacks", []) if line.startswith("Scheduler.schedule:")]
    return str(line)


def _observed(server: ControlServer) -> list[str]:
    """The request ids ``schedule_log`` saw admitted, in order (from inside the engine core)."""
    lines = server.observed.read_text().splitlines() if server.observed.exists() else []
    return [rid for line in lines for rid in json.loads(line)["admitted"]]


STACKED = "Scheduler.schedule: schedule_log (order 10) \u2192 shortest_prompt_first \u2192 vLLM"


def test_the_kill_switch_removes_one_layer_of_a_live_stack_and_the_other_keeps_working(server: ControlServer) -> None:
    assert _schedule_chain(server) == STACKED
    seen = len(_observed(server))
    assert _admission_order(server) == SHORTEST_FIRST
    assert len(_observed(server)) >= seen + len(ORDERED)  # the outer layer saw them admitted

    # The observer's layer goes; the policy inside it keeps ordering admission.
    code, report = _control(server, "rollback", "schedule_log", body=b'{"reason": "layer test"}')
    assert code == 200 and report["ok"], report
    assert _schedule_chain(server) == "Scheduler.schedule: shortest_prompt_first \u2192 vLLM"
    seen = len(_observed(server))
    assert _admission_order(server) == SHORTEST_FIRST
    assert len(_observed(server)) == seen  # no longer called
    assert complete(server, PROBE, PROBE_TOKENS) == server.reference

    # Back on top, whatever order the layers come and go in: the chain depends only on the set.
    code, report = _control(server, "apply", "schedule_log")
    assert code == 200 and report["ok"], report
    assert _schedule_chain(server) == STACKED

    # The policy's layer goes; the observer, now directly on vLLM's schedule, sees FCFS admission.
    code, report = _control(server, "rollback", "shortest_prompt_first")
    assert code == 200 and report["ok"], report
    assert _schedule_chain(server) == "Scheduler.schedule: schedule_log (order 10) \u2192 vLLM"
    seen = len(_observed(server))
    assert _admission_order(server) == FCFS
    assert len(_observed(server)) >= seen + len(ORDERED)
    assert complete(server, PROBE, PROBE_TOKENS) == server.reference

    code, report = _control(server, "apply", "shortest_prompt_first")
    assert code == 200 and report["ok"], report
    assert _schedule_chain(server) == STACKED
    assert _admission_order(server) == SHORTEST_FIRST
    assert status(server)["consistent"] is True


def test_tensor_parallel_2_applies_a_worker_patch_in_both_ranks_and_the_scheduler_patch_in_the_engine_core(
    server: ControlServer,
) -> None:
    for index in range(4):
        assert len(complete(server, prompt_ids(60 + index, 6), 4)) == 4
    processes = status(server)["processes"]
    workers = sorted((p for p in processes if p["role"] == "worker"), key=lambda p: p["tp_rank"])
    assert [w["tp_rank"] for w in workers] == [0, 1], processes
    for worker in workers:
        assert "RankWitness" in worker["applied"], worker
    (core,) = [p for p in processes if p["role"] == "engine_core"]
    assert "scheduler_trace" in core["applied"] and "RankWitness" not in core["applied"]
    records = [json.loads(line) for line in server.witness.read_text().splitlines()]
    by_rank = {r["rank"]: r["pid"] for r in records}
    assert sorted(by_rank) == [0, 1]  # the patched method ran in both ranks
    assert {r["pid"] for r in records} == {w["pid"] for w in workers}  # from inside each worker process
    assert {json.loads(line)["pid"] for line in server.trace.read_text().splitlines()} == {core["pid"]}


def _witnessed_since(server: ControlServer, offset: int) -> set[int]:
    lines = server.witness.read_text().splitlines()[offset:] if server.witness.exists() else []
    return {json.loads(line)["pid"] for line in lines}


def _witness_lines(server: ControlServer) -> int:
    return len(server.witness.read_text().splitlines()) if server.witness.exists() else 0


def _metric(server: ControlServer, patch: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{server.url}/metrics", timeout=30) as response:
        text = response.read().decode()
    (family,) = [f for f in text_string_to_metric_families(text) if f.name == "vllm_custom_patches_applied"]
    return {
        s.labels["tp_rank"]: s.value
        for s in family.samples
        if s.labels["patch"] == patch and s.labels["role"] == "worker"
    }


def test_a_worker_patch_is_switched_off_and_on_in_both_tensor_parallel_ranks(server: ControlServer) -> None:
    workers = sorted((p for p in status(server)["processes"] if p["role"] == "worker"), key=lambda p: p["tp_rank"])
    pids = {w["pid"] for w in workers}
    assert len(pids) == 2

    result = _run_cli(server, "rollback", "RankWitness", "--token", TOKEN, "--reason", "ranks test")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "patch 'RankWitness' rolled back in every process where it applies" in result.stdout
    found = states(server, "RankWitness")
    assert (found[("worker", 0)], found[("worker", 1)]) == ("available", "available")
    assert _metric(server, "RankWitness") == {"0": 0.0, "1": 0.0}
    before = _witness_lines(server)
    complete(server, PROBE, 4)
    assert _witnessed_since(server, before) == set()  # neither rank runs the patch's code any more

    result = _run_cli(server, "apply", "RankWitness", "--token", TOKEN, "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert sorted(p["pid"] for p in report["processes"] if p["changed"] and not p.get("waiting")) == sorted(pids)
    assert _metric(server, "RankWitness") == {"0": 1.0, "1": 1.0}
    before = _witness_lines(server)
    complete(server, PROBE, 4)
    assert _witnessed_since(server, before) == pids  # both ranks run it again, from inside each worker


def test_a_rollback_one_rank_refuses_is_undone_everywhere_with_409(server: ControlServer) -> None:
    server.tamper.touch()
    try:
        complete(server, PROBE, 2)  # the next model step: another tool wraps the patched method in rank 1 only
        result = _run_cli(server, "rollback", "RankWitness", "--token", TOKEN)
        assert result.returncode == 1, result.stdout + result.stderr
        assert (
            "REFUSED: patch 'RankWitness' was not rolled back in every process; every process was put back as it was"
            in result.stdout
        )
        code, report = _control(server, "rollback", "RankWitness")
        assert code == 409 and report["ok"] is False
        by_rank = {p["tp_rank"]: p for p in report["processes"] if p["role"] == "worker"}
        assert by_rank[0]["changed"] and by_rank[0]["reverted"] and by_rank[0]["state"] == "applied"
        assert not by_rank[1]["ok"] and "was replaced after the patch was applied" in by_rank[1]["error"]
        found = states(server, "RankWitness")
        assert (found[("worker", 0)], found[("worker", 1)]) == ("applied", "applied")  # as before: every rank has it
        assert status(server)["consistent"] is True
    finally:
        server.tamper.unlink(missing_ok=True)
    complete(server, PROBE, 2)  # the other tool unwraps itself at the next step
    code, report = _control(server, "rollback", "RankWitness")
    assert code == 200 and report["ok"], report
    code, report = _control(server, "apply", "RankWitness")
    assert code == 200 and report["ok"], report


def test_refused_requests_change_nothing(server: ControlServer) -> None:
    def applied() -> dict[int, list[str]]:
        return {p["pid"]: p["applied"] for p in status(server)["processes"]}

    before = applied()
    url = f"{server.url}/custom_patches/shortest_prompt_first/rollback"
    assert _control(server, "rollback", "shortest_prompt_first", token=None)[0] == 403  # no header
    assert _control(server, "rollback", "shortest_prompt_first", token="wrong-token-wrong-token")[0] == 403
    assert request(url, data=b"{}", headers={"Authorization": f"Basic {TOKEN}"})[0] == 403  # not a bearer token
    code, body = _control(server, "rollback", "no_such_patch")
    assert code == 404 and "shortest_prompt_first" in body["known"] and "RankWitness" in body["known"]
    code, body = _control(server, "rollback", "shortest_prompt_first", body=b"{not json")
    assert code == 422 and "not JSON" in body["error"]
    code, body = _control(server, "rollback", "shortest_prompt_first", body=b'{"force": true}')
    assert code == 422 and "'force'" in body["error"]
    assert _control(server, "explode", "shortest_prompt_first")[0] == 404
    assert request(url)[0] == 405  # GET is not a control request
    result = _run_cli(server, "rollback", "shortest_prompt_first", "--token", "wrong-token-wrong-token")
    assert result.returncode == 2 and "403 Forbidden: the token was refused" in result.stderr
    result = _run_cli(server, "rollback", "no_such_patch", "--token", TOKEN)
    assert result.returncode == 2 and "known patches: " in result.stderr
    assert applied() == before
    log = server.log.read_text(errors="replace")
    assert "refused: wrong token" in log and "refused: no bearer token" in log


def test_a_malformed_dev_mode_call_of_the_control_method_leaves_both_workers_answering_in_step(
    server: ControlServer,
) -> None:
    """vLLM 0.32's multiprocessing executor stops reading answers at the first worker that raised, so
    one raising worker method made every later ``collective_rpc`` read the previous call's answers
    (the status then failed with 400, the switch with 409/500).  Whatever arrives, our worker
    methods answer: nothing changes, and the engine's RPCs stay in step."""
    workers = {p["pid"] for p in status(server)["processes"] if p["role"] == "worker"}
    url = f"{server.url}/collective_rpc"
    calls: list[dict[str, Any]] = [
        {"method": "vllm_custom_patches_control", "kwargs": {"action": "rollback", "name": "RankWitness"}},
        {"method": "vllm_custom_patches_control", "args": [1, 2, 3]},
        {"method": "vllm_custom_patches_status", "args": ["junk"], "kwargs": {"x": 1}},
    ]
    for body in calls:
        code, answer = request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        assert code == 200, (body, code, answer)
        results = answer["results"]
        assert len(results) == 2 and not any(r.get("changed") for r in results), (body, answer)
        assert {r["pid"] for r in results} == workers  # each worker answered this call, not an earlier one
        code, answer = request(url, data=b'{"method": "check_health"}', headers={"Content-Type": "application/json"})
        assert (code, answer) == (200, {"results": [None, None]}), (body, code, answer)
    found = states(server, "RankWitness")
    assert (found[("worker", 0)], found[("worker", 1)]) == ("applied", "applied")
    assert status(server)["consistent"] is True
    code, report = _control(server, "rollback", "RankWitness")
    assert code == 200 and report["ok"], report
    code, report = _control(server, "apply", "RankWitness")
    assert code == 200 and report["ok"], report
    assert "kill-switch call refused, nothing changed" in server.log.read_text(errors="replace")
