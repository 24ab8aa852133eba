"""The kill switch holds on a real ``vllm serve``: no bypass through vLLM's dev routes, no apply that kills the engine.

One server for the module, tensor parallel 1 (API server, engine core, one
worker), started with what makes both holes reachable:

* ``--scheduling-policy priority``: vLLM's waiting queue is a heap, which
  ``shortest_prompt_first`` (not selected at start) cannot reorder.  A live
  ``POST /custom_patches/shortest_prompt_first/apply`` must be refused (409)
  and change nothing, instead of answering "applied" and making the engine
  loop raise at its next step (issue 16, item 1).
* ``VLLM_SERVER_DEV_MODE=1``: vLLM's development routes.  Of them only
  ``POST /collective_rpc`` calls a method chosen by the client (by name, on
  every worker; the others call fixed methods), so it is the one route that
  can reach the control method; it needs no token.  With a control token set
  and the worker-side ``RankWitness`` patch applied, no request on it may
  change a patch (issue 16, item 6).

Evidence comes from inside the processes: ``GET /custom_patches`` (every
process's state) and the file ``RankWitness`` appends the worker's pid to at
every model step.  Each test leaves the server as it found it (RankWitness
applied, shortest_prompt_first not applied); the fixture puts that back if a
test failed half-way.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from _engine import (
    _stop_group,
    free_port,
    launch_serve,
    prompt_ids,
    tail,
    wait_ready,
    write_rank_witness,
)
from _server import complete, control, request, states, status

from vllm_custom_patches._ops.agent import CONTROL_METHOD

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

TOKEN = "hardening-control-token-0123456789"
WORKER_PATCH = "RankWitness"
SPF = "shortest_prompt_first"
PROBE = prompt_ids(5, 9)
#: How long the worker may take to show up in the witness file after a completion (a hang guard only).
WITNESS_TIMEOUT_S = 60.0


@dataclass
class HardeningServer:
    port: int
    model: str
    proc: subprocess.Popen[bytes]
    log: Path
    witness: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def server(vllm_workspace: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HardeningServer]:
    tmp = tmp_path_factory.mktemp("hardening")
    model = str(vllm_workspace.model)
    env = vllm_workspace.env(
        VLLM_PLUGINS="custom_patches",
        VLLM_CUSTOM_PATCHES=WORKER_PATCH,
        VLLM_CUSTOM_PATCHES_PATH=str(write_rank_witness(tmp / "patches")),
        VLLM_CUSTOM_PATCHES_CONTROL_TOKEN=TOKEN,
        VLLM_SERVER_DEV_MODE="1",
        VCP_RANK_WITNESS_FILE=str(tmp / "ranks.jsonl"),
    )
    port, log = free_port(), tmp / "server.log"
    proc = launch_serve(
        model, env, log, ["--host", "127.0.0.1", "--port", str(port), "--scheduling-policy", "priority"]
    )
    try:
        print(f"priority policy, dev mode and control token: ready in {wait_ready(port, {log: proc}):.1f}s")
        yield HardeningServer(port, model, proc, log, tmp / "ranks.jsonl")
    finally:
        _stop_group(proc)


@pytest.fixture(autouse=True)
def _as_found(server: HardeningServer) -> Iterator[None]:
    """After each test: RankWitness applied, shortest_prompt_first not (a no-op unless a test failed half-way)."""
    yield
    if server.proc.poll() is None:
        control(server, "apply", WORKER_PATCH, token=TOKEN)
        control(server, "rollback", SPF, token=TOKEN)


# -- evidence --------------------------------------------------------------------------


def _alive(server: HardeningServer) -> None:
    assert server.proc.poll() is None, f"the server exited with {server.proc.returncode}:\n{tail(server.log)}"
    code, body = request(f"{server.url}/health")
    assert code == 200, f"/health answered {code}: {body!r}\n{tail(server.log)}"


def _worker_pids(server: HardeningServer) -> set[int]:
    pids = {p["pid"] for p in status(server)["processes"] if p["role"] == "worker"}
    assert pids, status(server)
    return pids


def _witness_lines(server: HardeningServer) -> int:
    return len(server.witness.read_text().splitlines()) if server.witness.exists() else 0


def _witnessed_since(server: HardeningServer, offset: int) -> set[int]:
    lines = server.witness.read_text().splitlines()[offset:] if server.witness.exists() else []
    return {json.loads(line)["pid"] for line in lines}


def _assert_worker_patch_live(server: HardeningServer) -> None:
    """RankWitness applied in every worker (status), consistent, and its code still runs there (witness file)."""
    _alive(server)
    report = status(server)
    assert report["consistent"] is True, report
    worker_states = {key: state for key, state in states(server, WORKER_PATCH).items() if key[0] == "worker"}
    assert worker_states and set(worker_states.values()) == {"applied"}, worker_states
    pids = _worker_pids(server)
    before = _witness_lines(server)
    complete(server, PROBE, 3)
    deadline = time.monotonic() + WITNESS_TIMEOUT_S
    while not pids <= _witnessed_since(server, before):
        assert time.monotonic() < deadline, f"no model step of workers {pids} was witnessed after a completion"
        time.sleep(0.05)


# -- vLLM's dev route ---------------------------------------------------------------------


def _collective_rpc(server: HardeningServer, body: dict[str, Any]) -> tuple[int, Any]:
    """``POST /collective_rpc`` as anyone can send it in dev mode: no token."""
    return request(
        f"{server.url}/collective_rpc", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )


def _assert_route_reaches_the_workers(server: HardeningServer) -> None:
    # Without this, a refused forgery could only mean the route is missing.
    code, answer = _collective_rpc(server, {"method": "check_health"})
    assert code == 200 and answer == {"results": [None] * len(_worker_pids(server))}, (code, answer)


def _changed_by(code: int, answer: Any) -> list[Any]:
    """The results of a collective_rpc answer that report a change."""
    if code != 200 or not isinstance(answer, dict):
        return []
    return [r for r in answer.get("results") or [] if isinstance(r, dict) and r.get("changed")]


#: Requests an attacker can send: the control method's argument shape before the fix, and forged variants of it.
FORGERIES: dict[str, dict[str, Any]] = {
    "the old argument shape": {"args": ["rollback", WORKER_PATCH, "forged-op-1", "attacker"]},
    "a made-up signature appended": {"args": ["rollback", WORKER_PATCH, "forged-op-2", "attacker", "0" * 64]},
    "a made-up signature first": {"args": ["0" * 64, "rollback", WORKER_PATCH, "forged-op-3", "attacker"]},
    "junk arguments appended": {"args": ["rollback", WORKER_PATCH, "forged-op-4", "attacker", "x", "y", "z"]},
    "keyword arguments": {
        "kwargs": {"action": "rollback", "name": WORKER_PATCH, "op_id": "forged-op-5", "who": "attacker"}
    },
}


@pytest.mark.parametrize("forgery", list(FORGERIES))
def test_collective_rpc_without_the_switch_cannot_roll_back_a_worker_patch(
    server: HardeningServer, forgery: str
) -> None:
    _assert_worker_patch_live(server)
    _assert_route_reaches_the_workers(server)

    code, answer = _collective_rpc(server, {"method": CONTROL_METHOD, **FORGERIES[forgery]})

    assert _changed_by(code, answer) == [], f"POST /collective_rpc ({forgery}) changed a patch: {code} {answer}"
    _assert_worker_patch_live(server)


def test_replaying_a_real_operation_id_through_collective_rpc_changes_nothing(server: HardeningServer) -> None:
    """The kill switch answers with its operation id; sending that id to the workers must not undo the change."""
    _assert_route_reaches_the_workers(server)
    code, report = control(server, "rollback", WORKER_PATCH, token=TOKEN)
    assert code == 200 and report["ok"], report
    code, report = control(server, "apply", WORKER_PATCH, token=TOKEN)
    assert code == 200 and report["ok"], report
    assert {p["pid"] for p in report["processes"] if p["changed"]} >= _worker_pids(server), report
    op_id = report["op_id"]

    for args in (["undo", WORKER_PATCH, op_id, "attacker"], ["rollback", WORKER_PATCH, op_id, "attacker"]):
        code, answer = _collective_rpc(server, {"method": CONTROL_METHOD, "args": args})
        assert _changed_by(code, answer) == [], f"POST /collective_rpc {args} changed a patch: {code} {answer}"
        _assert_worker_patch_live(server)


def test_the_dev_mode_server_info_does_not_reveal_the_control_token(server: HardeningServer) -> None:
    for fmt in ("json", "text"):
        code, body = request(f"{server.url}/server_info?config_format={fmt}")
        assert code == 200, body
        text = body.decode(errors="replace") if isinstance(body, bytes) else json.dumps(body)
        assert TOKEN not in text


def test_a_live_apply_of_shortest_prompt_first_under_the_priority_policy_is_refused_and_changes_nothing(
    server: HardeningServer,
) -> None:
    assert all(SPF not in p["applied"] for p in status(server)["processes"])

    code, report = control(server, "apply", SPF, token=TOKEN)
    if code == 200:
        # The bug: the next scheduler step would raise in the engine loop and
        # take the module's server down; undo it before any request arrives.
        control(server, "rollback", SPF, token=TOKEN)
    assert code == 409, f"the apply answered {code}, not 409: {report}"
    assert report["ok"] is False
    refusals = [p for p in report["processes"] if not p["ok"]]
    assert refusals, report
    for process in refusals:  # names the problem and the fix
        assert "fcfs" in (process.get("error") or "").lower(), process
    assert all(not p["changed"] or p.get("reverted") for p in report["processes"]), report

    after = status(server)
    assert after["consistent"] is True, after
    assert all(SPF not in p["applied"] for p in after["processes"]), after
    for index in range(5):  # served by vLLM's own priority scheduler, every one
        assert len(complete(server, prompt_ids(index, 4 + 3 * index), 3)) == 3
    _alive(server)
    after = status(server)
    assert after["consistent"] is True, after
    assert all(SPF not in p["applied"] for p in after["processes"]), after
    _assert_worker_patch_live(server)
