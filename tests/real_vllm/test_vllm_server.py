"""A real ``vllm serve`` (OpenAI-compatible server) with catalogue patches enabled by env var.

It runs with ``--fail-on-environ-validation``: it would not start if vLLM
did not know the ``VLLM_CUSTOM_PATCHES*`` variables set for it.

One server for the module (about 35 s to start on 2 cores), queried over HTTP
with the ``openai`` client; the last test stops it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
from _engine import Server, start_server, stop_server, tail, user_id

from vllm_custom_patches_catalogue.scheduler_trace import read_trace

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


@pytest.fixture(scope="module")
def server(vllm_workspace: Any) -> Iterator[Server]:
    workdir = vllm_workspace.dir("server")
    env = vllm_workspace.env(
        VLLM_CUSTOM_PATCHES="fair_share,scheduler_trace",
        VLLM_CUSTOM_PATCHES_TRACE_FILE=str(workdir / "trace.jsonl"),
        VLLM_CUSTOM_PATCHES_FAIR_SHARE_WEIGHTS="alice=2,bob=1",
        VLLM_SERVER_DEV_MODE="1",  # vLLM's dev routes: POST /collective_rpc calls any worker method, no token
    )
    # --fail-on-environ-validation: vLLM refuses unknown VLLM_* variables, and the plugin
    # declares its own (and the catalogue's) before vLLM validates.
    srv = start_server(
        str(vllm_workspace.model), env, workdir / "server.log", extra_args=["--fail-on-environ-validation"]
    )
    srv.trace = workdir / "trace.jsonl"
    try:
        yield srv
    finally:
        stop_server(srv)


def _descendants(pid: int) -> dict[int, str]:
    import psutil

    found = {}
    for proc in psutil.Process(pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):  # gone, or not ours to read
            found[proc.pid] = proc.name() + " " + " ".join(proc.cmdline())
    return found


def _wait_for_trace(server: Server, internal_prefix: str, timeout: float = 60) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        assert server.trace is not None
        trace = read_trace(server.trace)
        if (
            any(user_id(rid).startswith(internal_prefix) for line in trace for rid in line["new"])
            or time.monotonic() > deadline
        ):
            return trace
        time.sleep(0.2)


def test_the_server_answers_an_openai_client_and_its_engine_core_ran_the_patches(server: Server) -> None:
    import openai

    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)
    models = [m.id for m in client.models.list().data]
    assert models == [server.model]

    completion = client.completions.create(
        model=server.model,
        prompt="The capital of France is",
        max_tokens=5,
        temperature=0,
        extra_body={"ignore_eos": True, "vllm_xargs": {"tenant": "alice"}},
    )
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 5
    prompt_tokens = completion.usage.prompt_tokens

    trace = _wait_for_trace(server, completion.id)
    mine = [line for line in trace if any(user_id(rid).startswith(completion.id) for rid in line["scheduled"])]
    assert mine, f"request {completion.id} is not in the trace: {trace}"
    # Prefill of the whole prompt, then one token per step for the rest.
    (rid,) = mine[0]["new"]
    assert mine[0]["prompt_tokens"][rid] == prompt_tokens
    assert [line["tokens"][rid] for line in mine] == [prompt_tokens, 1, 1, 1, 1]

    # Written by the server's EngineCore: a child process of the server, not the
    # server (API process) itself, and not this test.
    children = _descendants(server.proc.pid)
    pids = {line["pid"] for line in trace}
    assert len(pids) == 1
    (engine_pid,) = pids
    assert engine_pid in children and "EngineCore" in children[engine_pid], children
    assert engine_pid not in (server.proc.pid, os.getpid())

    # The plugin's own log lines from that process (vLLM's log) name both patches.
    engine_lines = [
        line for line in server.log.read_text(errors="replace").splitlines() if f"[pid {engine_pid}]" in line
    ]
    assert any("'fair_share'" in line for line in engine_lines), engine_lines
    assert any("'scheduler_trace'" in line for line in engine_lines), engine_lines


def test_concurrent_clients_of_two_tenants_are_all_served(server: Server) -> None:
    import concurrent.futures

    import openai

    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)

    def ask(i: int) -> Any:
        tenant = "alice" if i % 2 else "bob"
        return client.completions.create(
            model=server.model,
            prompt=f"Request {i} from {tenant}:",
            max_tokens=4,
            temperature=0,
            extra_body={"ignore_eos": True, "vllm_xargs": {"tenant": tenant}},
        )

    with concurrent.futures.ThreadPoolExecutor(max_workers=6) as pool:
        completions = list(pool.map(ask, range(6)))
    assert all(c.usage is not None and c.usage.completion_tokens == 4 for c in completions)
    trace = _wait_for_trace(server, completions[-1].id)
    served = {user_id(rid) for line in trace for rid in line["new"]}
    for completion in completions:
        assert any(rid.startswith(completion.id) for rid in served)


def _running(pid: int) -> bool:
    import psutil

    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def test_without_a_control_token_no_process_has_the_control_method(server: Server) -> None:
    import json

    import openai
    from _server import request

    from vllm_custom_patches._ops.agent import CONTROL_METHOD

    url, headers = f"http://127.0.0.1:{server.port}/collective_rpc", {"Content-Type": "application/json"}
    code, answer = request(url, data=json.dumps({"method": "check_health"}).encode(), headers=headers)
    assert code == 200 and answer == {"results": [None]}, (code, answer)  # dev mode: the route reaches the worker
    for args in (["rollback", "scheduler_trace", "op-1", "attacker"], ["apply", "fair_share", "op-2", "attacker"]):
        code, answer = request(url, data=json.dumps({"method": CONTROL_METHOD, "args": args}).encode(), headers=headers)
        assert code >= 400 and CONTROL_METHOD in str(answer), (code, answer)  # no such method: the switch is off

    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)
    completion = client.completions.create(model=server.model, prompt="Still traced", max_tokens=2, temperature=0)
    trace = _wait_for_trace(server, completion.id)
    assert any(user_id(rid).startswith(completion.id) for line in trace for rid in line["new"])  # patches untouched


def test_sigterm_stops_the_server_and_its_engine(server: Server) -> None:
    children = _descendants(server.proc.pid)
    assert any("EngineCore" in text for text in children.values())
    # SIGTERM to the server's pid alone, as an orchestrator sends it; nothing else is signalled
    # until the server and every process it started are gone (the bounds only guard against a hang).
    server.proc.send_signal(signal.SIGTERM)
    try:
        server.proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the server was still running 120 s after SIGTERM:\n{tail(server.log)}")
    assert server.proc.returncode is not None
    deadline = time.monotonic() + 60
    while left := {pid: text for pid, text in children.items() if _running(pid)}:
        assert time.monotonic() < deadline, f"still running 60 s after the server stopped: {left}"
        time.sleep(0.2)
