"""The kill switch under attack and under failure (issue 16): each test names the item it holds.

* item 2: a rollback in a process where the patch still waits for its target's
  import disarms it there (and an apply arms it), undoably;
* item 4: a change that could not be undone everywhere is INCONSISTENT (its own
  HTTP status, CLI exit 3, the status route not consistent), never "undone
  everywhere";
* item 6: the per-process step refuses what the server's own switch did not
  sign (vLLM's dev-mode ``POST /collective_rpc`` reaches a worker's methods),
  and exists only where the kill switch is enabled;
* item 11: the control token must be printable ASCII without spaces;
* the reason a client gives reaches every process's log without control characters.

The black-box proof on a real dev-mode server is in
``tests/real_vllm/test_vllm_control_hardening.py``.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import sys
import textwrap
import threading
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from _helpers import captured_logs, clean_env, forget_modules, fresh_plugin

from vllm_custom_patches import PatchManager, VLLMPatch, plugin
from vllm_custom_patches._ops.agent import (
    CONTROL_METHOD,
    STATUS_METHOD,
    install_responders,
    process_record,
    unreachable_record,
)
from vllm_custom_patches._ops.control import perform, undo
from vllm_custom_patches.testing import isolated_registry

TOKEN = "unit-test-control-token-0123"
ENV_TOKEN = "VLLM_CUSTOM_PATCHES_CONTROL_TOKEN"


class Target:
    def run(self) -> str:
        return "original"


@pytest.fixture(autouse=True)
def _control_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_TOKEN, TOKEN)


@pytest.fixture
def patch() -> Iterator[type[VLLMPatch[Any]]]:
    with isolated_registry():

        class Hardened(VLLMPatch[Target]):
            name = "hardened"

            def run(self) -> str:
                return "patched"

        PatchManager.register(Hardened)
        PatchManager.apply(Hardened)
        yield Hardened


def _state(name: str) -> str:
    return next(s.state.value for s in PatchManager.status() if s.name == name)


# -- item 6: only the switch's own, signed calls change anything ------------------------------


class _Parallel:
    tensor_parallel_size = 2
    pipeline_parallel_size = 1
    data_parallel_rank = 0
    data_parallel_index = 0


class _Wrapper:
    """Stands in for vLLM's WorkerWrapperBase (what ``POST /collective_rpc`` calls methods on)."""

    def __init__(self, rank: int) -> None:
        self.vllm_config = types.SimpleNamespace(parallel_config=_Parallel())
        self.rpc_rank = rank


@pytest.fixture
def no_vllm_process_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    # The worker reads its ranks from vLLM's process groups where it can; here it cannot (and
    # must not import vLLM to find out), so it falls back to its config.
    monkeypatch.setitem(sys.modules, "vllm.distributed", None)


def _worker_call(*args: Any) -> dict[str, Any]:
    """What vLLM's worker process runs for ``POST /collective_rpc {"method": CONTROL_METHOD, "args": [...]}``."""
    from vllm_custom_patches._ops.agent import _worker_control

    return _worker_control(_Wrapper(0), *args)


@pytest.mark.usefixtures("no_vllm_process_groups")
def test_the_dev_mode_route_s_unsigned_call_is_refused_changes_nothing_and_is_logged(patch: Any) -> None:
    # Exactly the request of the review: {"method": "vllm_custom_patches_control",
    # "args": ["rollback", NAME, OP, WHO]}, no token, a requester of the caller's choosing.
    with captured_logs() as logs:
        result = _worker_call("rollback", "hardened", "op-evil", "ops-team (approved)")
    assert result["ok"] is False and result["changed"] is False
    assert result["error"].startswith("refused: not a signed kill-switch operation")
    assert _state("hardened") == "applied" and Target().run() == "patched"
    refusals = [m for m in logs.messages() if "kill-switch call refused, nothing changed" in m]
    assert len(refusals) == 1 and "'op-evil'" in refusals[0]
    # An undo, a string where the signature goes, extra arguments: all refused the same way.
    for args in [("undo", "hardened", "op-evil", "x"), ("rollback", "hardened", "op", "x", "1", "00"),
                 ("rollback", "hardened", "op", "x", "1", "00", "extra"), ()]:  # fmt: skip
        refused = _worker_call(*args)
        assert refused["ok"] is False and refused["error"].startswith("refused: ")
    assert _state("hardened") == "applied" and Target().run() == "patched"


@pytest.mark.usefixtures("no_vllm_process_groups")
def test_a_signature_made_with_another_token_is_refused(patch: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm_custom_patches._ops.auth import sign

    monkeypatch.setenv(ENV_TOKEN, "another-server-s-token-42")
    forged = sign("rollback", "hardened", "op-forged", "someone")
    monkeypatch.setenv(ENV_TOKEN, TOKEN)
    result = _worker_call(*forged)
    assert result["ok"] is False and "bad signature" in result["error"]
    tampered = sign("apply", "hardened", "op-tampered", "someone")
    result = _worker_call("rollback", *tampered[1:])  # a valid signature of another action
    assert result["ok"] is False and "bad signature" in result["error"]
    assert _state("hardened") == "applied"


@pytest.mark.usefixtures("no_vllm_process_groups")
def test_a_signed_call_runs_once_a_replay_or_a_stale_one_is_refused(
    patch: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vllm_custom_patches._ops import auth as _auth

    signed = _auth.sign("rollback", "hardened", "op-once", "ops")
    first = _worker_call(*signed)
    assert first["ok"] and first["changed"] and _state("hardened") == "available"
    PatchManager.apply("hardened")  # re-applied since (by a later operation)
    replay = _worker_call(*signed)
    assert replay["ok"] is False and "already run here (a replay)" in replay["error"]
    assert _state("hardened") == "applied" and Target().run() == "patched"

    # One captured before the memory of seen operations ends is too old to be accepted.
    monkeypatch.setattr(_auth.time, "time", lambda: 1_000_000.0)
    old = _auth.sign("rollback", "hardened", "op-old", "ops")
    monkeypatch.setattr(_auth.time, "time", lambda: 1_000_000.0 + _auth.MAX_AGE_S + 1)
    stale = _worker_call(*old)
    assert stale["ok"] is False and "more than 300 s" in stale["error"]
    assert _state("hardened") == "applied"


@pytest.mark.usefixtures("no_vllm_process_groups")
def test_an_undo_must_be_signed_too(patch: Any) -> None:
    from vllm_custom_patches._ops.auth import sign

    assert _worker_call(*sign("rollback", "hardened", "op-u", "ops"))["changed"]
    assert _worker_call("undo", "hardened", "op-u", "attacker")["ok"] is False  # would re-apply the patch
    assert _state("hardened") == "available"
    undone = _worker_call(*sign("undo", "hardened", "op-u", "ops"))
    assert undone["ok"] and undone["undone"] and _state("hardened") == "applied"


def _fake_vllm_classes(monkeypatch: pytest.MonkeyPatch) -> tuple[type, type]:
    core = types.ModuleType("vllm.v1.engine.core")
    worker_base = types.ModuleType("vllm.v1.worker.worker_base")
    core.EngineCore = type("EngineCore", (), {})  # type: ignore[attr-defined]
    worker_base.WorkerWrapperBase = type("WorkerWrapperBase", (), {})  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vllm.v1.engine.core", core)
    monkeypatch.setitem(sys.modules, "vllm.v1.worker.worker_base", worker_base)
    return core.EngineCore, worker_base.WorkerWrapperBase  # type: ignore[attr-defined]


@pytest.mark.parametrize(("token", "enabled"), [(None, False), ("short", False), ("é" * 20, False), ("t" * 16, True)])
def test_the_control_methods_exist_only_where_the_kill_switch_is_enabled(
    monkeypatch: pytest.MonkeyPatch, token: str | None, enabled: bool
) -> None:
    if token is None:
        monkeypatch.delenv(ENV_TOKEN)
    else:
        monkeypatch.setenv(ENV_TOKEN, token)
    for cls in _fake_vllm_classes(monkeypatch):
        install_responders()
        assert STATUS_METHOD in vars(cls)  # the status (read-only) is always there
        assert (CONTROL_METHOD in vars(cls)) is enabled, vars(cls)


def test_an_engine_core_without_the_control_method_is_reported_with_the_fix() -> None:
    from vllm_custom_patches._ops.fleet import engine_failure

    # What vLLM's engine client raises for a utility method the engine core does not have.
    missing = Exception(
        f"Call to {CONTROL_METHOD} method failed: 'EngineCoreProc' object has no attribute '{CONTROL_METHOD}'"
    )
    assert engine_failure(missing).startswith(
        "the kill switch is not enabled in this engine core (is VLLM_CUSTOM_PATCHES_CONTROL_TOKEN set in its environment"
    )
    other = Exception(f"Call to {CONTROL_METHOD} method failed: ")  # any other failure is told as it is
    assert engine_failure(other) == f"Exception: Call to {CONTROL_METHOD} method failed: "


def _stand_in_engine_core(engine_core_cls: type, wrapper_cls: type) -> Any:
    """One engine core with two workers, in this process, answering through the real responders."""
    core = engine_core_cls()
    core.vllm_config = types.SimpleNamespace(parallel_config=_Parallel())
    wrappers = [wrapper_cls(), wrapper_cls()]
    for rank, wrapper in enumerate(wrappers):
        wrapper.vllm_config, wrapper.rpc_rank = core.vllm_config, rank

    def collective_rpc(method: str, timeout: float | None = None, args: tuple[Any, ...] = ()) -> list[Any]:
        return [getattr(wrapper, method)(*args) for wrapper in wrappers]  # vLLM's run_method

    core.model_executor = types.SimpleNamespace(collective_rpc=collective_rpc)
    return core


class _InProcessClient:
    def __init__(self, core: Any) -> None:
        self.engine_core = self
        self.core_engines = [(0).to_bytes(2, "little")]
        self.core = core

    async def _call_utility_async(self, method: str, *args: Any, engine: bytes) -> Any:
        import inspect

        bound = getattr(self.core, method)
        # As vLLM's EngineCore._convert_msgspec_args: no more arguments than parameters (*args counts one).
        assert len(args) <= len(inspect.signature(bound).parameters), "vLLM would refuse this utility call"
        return bound(*args)


@pytest.mark.usefixtures("no_vllm_process_groups")
def test_the_switch_s_own_calls_pass_through_the_engine_core_to_its_workers(
    patch: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vllm_custom_patches._ops.switch import change

    engine_core_cls, wrapper_cls = _fake_vllm_classes(monkeypatch)
    install_responders()
    client = _InProcessClient(_stand_in_engine_core(engine_core_cls, wrapper_cls))
    report = asyncio.run(change(client, "rollback", "hardened", "ops"))
    assert report["ok"] and report["outcome"] == "done", report
    assert [(p["role"], p["tp_rank"], p["ok"]) for p in report["processes"]] == [
        ("api_server", None, True), ("engine_core", None, True), ("worker", 0, True), ("worker", 1, True)
    ]  # fmt: skip
    assert _state("hardened") == "available"
    report = asyncio.run(change(client, "apply", "hardened", "ops"))
    assert report["ok"] and _state("hardened") == "applied"


# -- item 11: the token -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("token", "says"),
    [
        ("pässwörd-pässwörd-1234", "a non-ASCII character at position 2"),
        ("two words and more of them", "a space at position 4"),
        ("tab\there-0123456789", "a control character at position 4"),
        ("x" * 15, "it has 15 characters; use at least 16"),
    ],
)
def test_a_token_that_is_not_printable_ascii_disables_the_routes_with_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, token: str, says: str
) -> None:
    from vllm_custom_patches.endpoint import _control_token_hash

    monkeypatch.setenv(ENV_TOKEN, token)
    with captured_logs() as logs:
        assert _control_token_hash() is None
    (error,) = [m for m in logs.messages(level=40) if "is set but unusable" in m]
    assert says in error and "printable ASCII characters, no spaces" in error and token not in error


# -- the reason, as it reaches every process's log ---------------------------------------------


def test_control_characters_in_the_reason_never_reach_a_log_line_raw() -> None:
    from vllm_custom_patches.endpoint import _parse_body

    raw = json.dumps({"reason": "p99\rFAKE LOG LINE\x1b[2K\x1b[31mred\u202eevil\nnext\u2028line"}).encode()
    body, problem = _parse_body(raw)
    assert problem is None
    assert body.reason == "p99 FAKE LOG LINE\\x1b[2K\\x1b[31mred\\u202eevil next line"
    assert body.reason.isprintable()
    assert _parse_body(json.dumps({"reason": "plain, ünïcode ok"}).encode())[0].reason == "plain, ünïcode ok"


# -- item 2: a patch still waiting for its target's import ---------------------------------


LAZY = "vcp_lazy_switch_target"


@pytest.fixture
def lazy(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[type[VLLMPatch[Any]]]:
    """A patch selected at start-up on a module this process has not imported yet."""
    clean_env(monkeypatch, VLLM_CUSTOM_PATCHES_VLLM_VERSION="0.32.0")
    monkeypatch.setenv(ENV_TOKEN, TOKEN)
    (tmp_path / f"{LAZY}.py").write_text(textwrap.dedent("""
        class Lazy:
            def run(self):
                return "original"
        """))  # fmt: skip
    monkeypatch.syspath_prepend(str(tmp_path))
    with fresh_plugin():

        class LazyPatch(VLLMPatch[f"{LAZY}:Lazy"]):  # type: ignore[misc]
            name = "lazy_patch"

            def run(self) -> str:
                return "patched"

        monkeypatch.setenv("VLLM_CUSTOM_PATCHES", "lazy_patch")
        plugin.register()
        assert LAZY not in sys.modules and _state("lazy_patch") == "pending"
        yield LazyPatch
    forget_modules(LAZY)


def _import_lazy() -> Any:
    import importlib

    return importlib.import_module(LAZY)


def test_a_rollback_disarms_a_patch_that_waits_for_its_import(lazy: Any) -> None:
    result = perform("rollback", "lazy_patch", "op-l1", "ops")
    assert result == {
        "ok": True,
        "changed": True,
        "relevant": True,
        "state": "available",
        "error": None,
        "waiting": True,
    }
    module = _import_lazy()  # the first import after the rollback: the patch stays off
    assert module.Lazy().run() == "original"
    assert _state("lazy_patch") == "available" and not PatchManager.is_applied("lazy_patch")


def test_an_apply_re_arms_it_and_the_import_applies_it(lazy: Any) -> None:
    assert perform("rollback", "lazy_patch", "op-l2", "ops")["changed"]
    result = perform("apply", "lazy_patch", "op-l3", "ops")
    assert (result["ok"], result["changed"], result["relevant"], result["state"]) == (True, True, True, "pending")
    again = perform("apply", "lazy_patch", "op-l4", "ops")
    assert again["ok"] and not again["changed"] and again["state"] == "pending"  # already armed
    assert _import_lazy().Lazy().run() == "patched"
    assert _state("lazy_patch") == "applied"


def test_disarming_and_arming_are_undone_by_operation_id(lazy: Any) -> None:
    assert perform("rollback", "lazy_patch", "op-l5", "ops")["changed"]
    undone = undo("op-l5", "ops")
    assert undone["ok"] and undone["undone"] and _state("lazy_patch") == "pending"
    assert not undo("op-l5", "ops").get("undone")  # a second undo does nothing
    assert _import_lazy().Lazy().run() == "patched"


def test_an_apply_of_a_patch_never_selected_here_arms_it_and_its_undo_disarms_it(
    lazy: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Other(VLLMPatch[f"{LAZY}:Lazy"]):  # type: ignore[misc]
        name = "lazy_other"

        def other(self) -> str:
            return "added"

    assert perform("apply", "lazy_other", "op-l6", "ops")["state"] == "pending"
    assert undo("op-l6", "ops")["undone"] and _state("lazy_other") == "available"
    assert perform("apply", "lazy_other", "op-l7", "ops")["changed"]
    module = _import_lazy()
    assert module.Lazy().other() == "added" and module.Lazy().run() == "patched"  # both waited, both applied


def test_a_patch_armed_by_the_switch_that_cannot_apply_at_import_is_skipped_not_fatal(lazy: Any) -> None:
    class Missing(VLLMPatch[f"{LAZY}:NoSuchClass"]):  # type: ignore[misc]
        name = "lazy_missing"

        def run(self) -> None:
            return None

    assert perform("apply", "lazy_missing", "op-l8", "ops")["changed"]
    with captured_logs() as logs:
        module = _import_lazy()  # no exception into vLLM's import: the operator asked, the process runs on
    assert module.Lazy().run() == "patched" and _state("lazy_missing") == "skipped"
    assert any("lazy_missing" in m and "NoSuchClass" in m for m in logs.messages(level=30))


def test_the_switch_reports_the_disarm_as_a_change_in_this_process(lazy: Any) -> None:
    import io

    from vllm_custom_patches._ops.remote import print_control
    from vllm_custom_patches._ops.switch import change

    report = asyncio.run(change(None, "rollback", "lazy_patch", "ops"))
    assert report["ok"] and report["processes"][0]["changed"] and report["processes"][0]["relevant"]
    out = io.StringIO()
    print_control(report, out)
    assert out.getvalue().startswith("api_server pid=")
    assert ": disarmed before its target's import; now available\n" in out.getvalue()
    assert _import_lazy().Lazy().run() == "original"


# -- item 4: an undo that fails ----------------------------------------------------------------


class _Engines:
    """Stand-in engine cores (one per data-parallel rank) whose answers the test scripts, with patch state."""

    def __init__(self, scripts: dict[int, Callable[[str], str]]) -> None:
        self.core_engines = [rank.to_bytes(2, "little") for rank in scripts]
        self.engine_core = self
        self.scripts = scripts
        self.applied = dict.fromkeys(scripts, True)

    async def _call_utility_async(self, method: str, *args: Any, engine: bytes) -> Any:
        rank = int.from_bytes(engine, "little")
        record = {**unreachable_record("engine_core", "", dp_rank=rank), "pid": 4000 + rank, "host": "node",
                  "error": None}  # fmt: skip
        if method == STATUS_METHOD:
            applied = ["hardened"] if self.applied[rank] else []
            patches = [{"name": "hardened", "state": "applied" if applied else "available"}]
            return {"engine_core": {**record, "applied": applied, "patches": patches, "selection": "hardened"},
                    "workers": []}  # fmt: skip
        action = args[0]
        what = self.scripts[rank](action)
        if what == "timeout":
            raise asyncio.TimeoutError()
        if what == "error":  # the call failed in the engine core before our method ran
            raise Exception(f"Call to {method} method failed: 'EngineCoreProc' object has no attribute '{method}'")
        if what == "refuse":
            return [{**record, "ok": False, "changed": False, "relevant": True, "state": "applied",
                     "error": "PatchConflictError: outside change"}]  # fmt: skip
        if action == "undo":
            changed = not self.applied[rank]
            self.applied[rank] = True
            return [{**record, "ok": True, "changed": changed, "relevant": True, "state": "applied", "error": None,
                     "undone": changed}]  # fmt: skip
        self.applied[rank] = action == "apply"
        state = "applied" if self.applied[rank] else "available"
        return [{**record, "ok": True, "changed": True, "relevant": True, "state": state, "error": None}]


def _rolls_back_then_hangs(action: str) -> str:
    return "timeout" if action == "undo" else "ok"


def test_an_undo_that_times_out_is_inconsistent_and_names_the_process(patch: Any) -> None:
    from vllm_custom_patches._ops.switch import change, summary

    engines = _Engines({0: _rolls_back_then_hangs, 1: lambda action: "refuse" if action != "undo" else "ok"})
    report = asyncio.run(change(engines, "rollback", "hardened", "ops"))
    assert report["ok"] is False and report["outcome"] == "inconsistent"
    assert [(p["description"], p["error"]) for p in report["undo_failed"]] == [
        ("engine_core dp_rank=0 pid=4000 on node", "did not answer in time")
    ]
    (stuck,) = [p for p in report["processes"] if p.get("dp_rank") == 0]
    assert stuck["changed"] and not stuck["reverted"] and stuck["undo_error"] == "did not answer in time"
    line = summary(report)
    assert "INCONSISTENT" in line and "undone everywhere" not in line.replace("NOT undone everywhere", "")
    assert "NOT put back in: engine_core dp_rank=0 pid=4000 on node (did not answer in time)" in line
    assert _state("hardened") == "applied"  # this process was put back


def test_a_refusal_put_back_everywhere_is_still_refused_not_inconsistent(patch: Any) -> None:
    from vllm_custom_patches._ops.switch import change, summary

    engines = _Engines({0: lambda action: "ok", 1: lambda action: "refuse" if action != "undo" else "ok"})
    report = asyncio.run(change(engines, "rollback", "hardened", "ops"))
    assert report["outcome"] == "refused" and report["undo_failed"] == []
    assert "REFUSED, undone everywhere" in summary(report) and engines.applied == {0: True, 1: True}


def test_an_engine_core_whose_call_fails_outright_changed_nothing_so_the_refusal_is_clean(patch: Any) -> None:
    from vllm_custom_patches._ops.switch import change

    engines = _Engines({0: lambda action: "ok", 1: lambda action: "error"})
    report = asyncio.run(change(engines, "rollback", "hardened", "ops"))
    assert report["outcome"] == "refused" and report["undo_failed"] == [], report
    (failed,) = [p for p in report["processes"] if p.get("dp_rank") == 1]
    assert failed["ran"] is False and "the kill switch is not enabled in this engine core" in failed["error"]
    assert engines.applied == {0: True, 1: True} and _state("hardened") == "applied"


def _app(engines: Any) -> Any:
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from vllm_custom_patches.endpoint import CustomPatchesEndpoint

    endpoint = CustomPatchesEndpoint()
    app = FastAPI()
    endpoint.attach_router(app)
    endpoint._engine_client = engines
    return TestClient(app)


def test_the_route_answers_500_inconsistent_and_the_status_shows_the_mixed_state(
    patch: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vllm_custom_patches._ops import switch as _switch

    monkeypatch.setattr(_switch, "_record", _switch.Unsettled())  # this process's memory, empty
    # One engine core: the API server refuses (another tool wrapped the method here), the engine
    # core rolled back and cannot be asked to undo. Each role alone looks uniform.
    grafted = Target.__dict__["run"]

    def wrapped_by_another_tool(self: Any) -> Any:
        return grafted(self)

    monkeypatch.setattr(Target, "run", wrapped_by_another_tool)
    engines = _Engines({0: _rolls_back_then_hangs})
    client = _app(engines)
    answer = client.post("/custom_patches/hardened/rollback", headers={"Authorization": f"Bearer {TOKEN}"})
    assert answer.status_code == 500, answer.text
    assert answer.json()["outcome"] == "inconsistent"
    status = client.get("/custom_patches").json()
    applied = {p["role"]: p["applied"] for p in status["processes"]}
    assert applied == {"api_server": ["hardened"], "engine_core": []}  # the mixed state
    assert status["consistent"] is False
    (left,) = status["unsettled"]
    assert (left["patch"], left["action"], left["processes"]) == (
        "hardened",
        "rollback",
        ["engine_core dp_rank=0 pid=4000 on node"],
    )

    # Settled by an operation on the patch that is done everywhere.
    monkeypatch.setattr(Target, "run", grafted)
    engines.scripts[0] = lambda action: "ok"
    done = client.post("/custom_patches/hardened/apply", headers={"Authorization": f"Bearer {TOKEN}"})
    assert done.status_code == 200 and done.json()["outcome"] == "done"
    status = client.get("/custom_patches").json()
    assert status["consistent"] is True and status["unsettled"] == []


class _Canned(http.server.BaseHTTPRequestHandler):
    answer: tuple[int, bytes] = (500, b"")

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        code, body = self.answer
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_the_cli_exits_3_and_says_inconsistent(capsys: pytest.CaptureFixture[str]) -> None:
    from vllm_custom_patches._cli.main import main

    stuck = {**process_record("engine_core", dp_rank=0), "ok": True, "changed": True, "state": "available",
             "reverted": False, "undo_error": "did not answer in time"}  # fmt: skip
    report = {"ok": False, "outcome": "inconsistent", "action": "rollback", "patch": "hardened", "op_id": "abc",
              "elapsed_s": 0.01, "processes": [stuck],
              "undo_failed": [{"description": "engine_core dp_rank=0 pid=4000 on node", "error": "did not answer in time"}]}  # fmt: skip
    handler = type("Handler", (_Canned,), {"answer": (500, json.dumps(report).encode())})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        code = main(["rollback", "hardened", "--url", f"http://127.0.0.1:{server.server_address[1]}", "--token", TOKEN])
    finally:
        server.shutdown()
        server.server_close()
    out = capsys.readouterr().out
    assert code == 3, out
    assert "INCONSISTENT: patch 'hardened' was not rolled back, and NOT every process could be put back: " in out
    assert "engine_core dp_rank=0 pid=4000 on node (did not answer in time)" in out
    assert "every process was put back" not in out
