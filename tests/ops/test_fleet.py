"""The server-wide status view, without vLLM: consistency rules, the metric, the ``status`` CLI's client side.

The real endpoint, on real multi-process vLLM servers, is tested in
``tests/real_vllm/test_vllm_fleet.py``; here the rules and the client's
handling of every kind of answer (including the broken ones) are pinned down.
"""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest

from vllm_custom_patches import PatchManager, VLLMPatch
from vllm_custom_patches._cli.main import main as cli_main
from vllm_custom_patches._ops.agent import STATUS_METHOD, install_responders, process_record
from vllm_custom_patches._ops.fleet import analyse, describe_process
from vllm_custom_patches.testing import isolated_registry


def _process(role: str, applied: list[str], **extra: Any) -> dict[str, Any]:
    record = {
        "role": role, "pid": extra.pop("pid", 100), "host": "node-a", "process": "x",
        "dp_rank": None, "tp_rank": None, "pp_rank": None, "selection": ",".join(applied),
        "applied": applied, "patches": [{"name": n, "state": "applied", "reason": ""} for n in applied],
        "error": None,
    }  # fmt: skip
    record.update(extra)
    return record


def test_the_same_patches_in_every_process_of_each_role_is_consistent() -> None:
    report = analyse(
        [
            _process("api_server", []),  # the API server never imports the scheduler: compared only with itself
            _process("engine_core", ["trace"], dp_rank=0),
            _process("engine_core", ["trace"], dp_rank=1),
            _process("worker", ["witness"], dp_rank=0, tp_rank=0),
            _process("worker", ["witness"], dp_rank=0, tp_rank=1),
        ]
    )
    assert report["consistent"] is True
    assert report["inconsistencies"] == [] and report["errors"] == []
    assert len(report["processes"]) == 5


def test_a_rank_without_a_patch_its_role_has_elsewhere_is_named_with_why() -> None:
    unpatched = _process("engine_core", [], dp_rank=2, pid=300, selection="", patches=[])
    failed = _process(
        "worker", [], dp_rank=0, tp_rank=1, pid=401,
        patches=[{"name": "witness", "state": "failed", "reason": "conflict: outside change"}],
    )  # fmt: skip
    report = analyse(
        [
            _process("engine_core", ["trace"], dp_rank=0),
            _process("engine_core", ["trace"], dp_rank=1),
            unpatched,
            _process("worker", ["witness"], dp_rank=0, tp_rank=0, pid=400),
            failed,
        ]
    )
    assert report["consistent"] is False
    by_patch = {issue["patch"]: issue for issue in report["inconsistencies"]}
    assert set(by_patch) == {"trace", "witness"}
    trace = by_patch["trace"]
    assert trace["role"] == "engine_core" and trace["applied_in"] == 2
    (missing,) = trace["missing_in"]
    assert (missing["dp_rank"], missing["pid"], missing["host"]) == (2, 300, "node-a")
    assert missing["why"] == "VLLM_CUSTOM_PATCHES is not set in this process"
    assert missing["description"] == "engine_core dp_rank=2 pid=300 on node-a"
    (missing,) = by_patch["witness"]["missing_in"]
    assert missing["tp_rank"] == 1 and missing["why"] == "failed: conflict: outside change"


def test_a_process_that_cannot_answer_makes_the_server_not_consistent() -> None:
    silent = _process("engine_core", [], dp_rank=1, pid=None, host=None, error="did not answer in time")
    report = analyse([_process("engine_core", [], dp_rank=0), silent])
    # Nothing is applied anywhere, so no patch is missing; but nothing can be said about rank 1.
    assert report["inconsistencies"] == []
    assert report["consistent"] is False
    assert report["errors"] == [
        {"role": "engine_core", "pid": None, "host": None, "dp_rank": 1, "tp_rank": None, "pp_rank": None,
         "description": "engine_core dp_rank=1", "error": "did not answer in time"}
    ]  # fmt: skip


def test_describe_process_names_every_rank_it_has() -> None:
    assert describe_process(_process("worker", [], dp_rank=1, tp_rank=0, pp_rank=0, pid=7)) == (
        "worker dp_rank=1 tp_rank=0 pp_rank=0 pid=7 on node-a"
    )


class Target:
    def run(self) -> str:
        return "original"


def test_process_record_is_this_process_as_the_manager_reports_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_CUSTOM_PATCHES", "fleet_probe")
    with isolated_registry():

        class Probe(VLLMPatch[Target]):
            name = "fleet_probe"

            def run(self) -> str:
                return "patched"

        PatchManager.apply(Probe)
        record = process_record("worker", dp_rank=0, tp_rank=1, pp_rank=0)
    assert record["applied"] == ["fleet_probe"]
    (probe,) = [p for p in record["patches"] if p["name"] == "fleet_probe"]
    assert probe["state"] == "applied" and probe["overrides"] == ["run"] and "description" not in probe
    assert (record["role"], record["dp_rank"], record["tp_rank"], record["pp_rank"]) == ("worker", 0, 1, 0)
    assert record["selection"] == "fleet_probe" and record["error"] is None
    assert Target().run() == "original"  # rolled back by the isolated registry


def test_responders_are_installed_only_on_imported_vllm_classes_and_never_over_a_foreign_member(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import sys
    import types

    core = types.ModuleType("vllm.v1.engine.core")
    worker_base = types.ModuleType("vllm.v1.worker.worker_base")
    foreign = object()
    core.EngineCore = type("EngineCore", (), {})  # type: ignore[attr-defined]
    worker_base.WorkerWrapperBase = type("WorkerWrapperBase", (), {STATUS_METHOD: foreign})  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vllm.v1.engine.core", core)
    monkeypatch.setitem(sys.modules, "vllm.v1.worker.worker_base", worker_base)
    install_responders()
    install_responders()  # idempotent
    assert callable(vars(core.EngineCore)[STATUS_METHOD])
    assert vars(worker_base.WorkerWrapperBase)[STATUS_METHOD] is foreign
    assert "already exists and is not ours" in caplog.text


# -- the status CLI against an HTTP server with canned answers ---------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    answers: ClassVar[dict[str, tuple[int, bytes]]] = {}
    seen_auth: ClassVar[list[str | None]] = []

    def do_GET(self) -> None:
        type(self).seen_auth.append(self.headers.get("Authorization"))
        code, body = self.answers.get(self.path, (404, b'{"detail":"Not Found"}'))
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def fake_server() -> Iterator[tuple[str, type[_Handler]]]:
    handler = type("Handler", (_Handler,), {"answers": {}, "seen_auth": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


def _report(consistent: bool) -> bytes:
    processes = [_process("engine_core", ["trace"], dp_rank=0, pid=10)]
    processes.append(_process("engine_core", ["trace"] if consistent else [], dp_rank=1, pid=11, selection=""))
    return json.dumps(analyse(processes)).encode()


def test_status_exits_0_when_consistent_and_shows_a_table(fake_server, capsys) -> None:  # type: ignore[no-untyped-def]
    url, handler = fake_server
    handler.answers["/custom_patches"] = (200, _report(consistent=True))
    assert cli_main(["status", "--url", url + "/", "--api-key", "k1"]) == 0
    out = capsys.readouterr().out
    assert "engine_core dp_rank=1 pid=11 on node-a  applied" in out
    assert "2 process(es), 1 patch(es): consistent" in out
    assert handler.seen_auth == ["Bearer k1"]


def test_status_exits_1_naming_the_process_rank_and_host_that_lacks_a_patch(fake_server, capsys) -> None:  # type: ignore[no-untyped-def]
    url, handler = fake_server
    handler.answers["/custom_patches"] = (200, _report(consistent=False))
    assert cli_main(["status", "--url", url]) == 1
    out = capsys.readouterr().out
    assert (
        "INCONSISTENT: trace is applied in 1 engine_core process(es) but not in engine_core dp_rank=1 pid=11 "
        "on node-a: VLLM_CUSTOM_PATCHES is not set in this process"
    ) in out
    assert cli_main(["status", "--url", url, "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["consistent"] is False


@pytest.mark.parametrize(
    ("answer", "api_key", "expected"),
    [
        (None, None, "the endpoint is not enabled; start the server with vllm-custom-patches installed and VLLM_PLUGINS including custom_patches"),
        ((401, b'{"error":"Unauthorized"}'), None, "401 Unauthorized: pass the server's API key with --api-key"),
        ((401, b'{"error":"Unauthorized"}'), "wrong", "401 Unauthorized: the API key given was refused"),
        ((200, b"<html>"), None, "did not answer JSON"),
        ((200, b'{"models": []}'), None, "without a 'processes' list"),
        ((500, b"boom"), None, "answered HTTP 500"),
    ],
)  # fmt: skip
def test_status_exits_2_with_the_fix_when_the_server_cannot_tell(  # type: ignore[no-untyped-def]
    fake_server, capsys, answer, api_key, expected
) -> None:
    url, handler = fake_server
    if answer is not None:
        handler.answers["/custom_patches"] = answer
    argv = ["status", "--url", url] + (["--api-key", api_key] if api_key else [])
    assert cli_main(argv) == 2
    assert expected in capsys.readouterr().err


def test_status_exits_2_when_nothing_listens_or_the_url_is_not_one(capsys) -> None:  # type: ignore[no-untyped-def]
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert cli_main(["status", "--url", f"http://127.0.0.1:{port}", "--timeout", "5"]) == 2
    assert "cannot reach" in capsys.readouterr().err
    assert cli_main(["status", "--url", "127.0.0.1:8000"]) == 2
    assert "is not an http(s) URL" in capsys.readouterr().err


def test_the_metric_mirrors_the_report_and_forgets_series_that_are_gone() -> None:
    pytest.importorskip("prometheus_client", reason="vLLM's dependency; installed with vLLM")
    from prometheus_client import REGISTRY, generate_latest

    from vllm_custom_patches._ops.metrics import publish

    def sample(patch: str, dp_rank: str) -> float | None:
        return REGISTRY.get_sample_value(
            "vllm_custom_patches_applied",
            {"patch": patch, "role": "engine_core", "host": "node-a", "dp_rank": dp_rank, "tp_rank": "", "pp_rank": ""},
        )  # fmt: skip

    publish(json.loads(_report(consistent=False)))
    assert sample("trace", "0") == 1.0
    assert sample("trace", "1") == 0.0  # missing where its role has it: a 0, not an absent series
    assert REGISTRY.get_sample_value("vllm_custom_patches_consistent") == 0.0
    publish(analyse([_process("engine_core", [], dp_rank=0, pid=10, patches=[])]))
    assert sample("trace", "0") is None and sample("trace", "1") is None
    assert REGISTRY.get_sample_value("vllm_custom_patches_consistent") == 1.0
    assert b"# TYPE vllm_custom_patches_applied gauge" in generate_latest(REGISTRY)
