"""Per-patch telemetry in the operations plane (issue 20, part 1): the status record, ``/metrics``, the ``status`` CLI.

The figures themselves are tests/runtime/test_telemetry.py's; the real server
is the lead's data-parallel proof.  The counters are read back from
prometheus_client's own text (``generate_latest``), as ``/metrics`` serves it.
"""

from __future__ import annotations

import http.server
import json
import os
import threading
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from vllm_custom_patches import VLLMPatch
from vllm_custom_patches._cli.main import main as cli_main
from vllm_custom_patches._ops import metrics
from vllm_custom_patches._ops.agent import process_record
from vllm_custom_patches._ops.fleet import analyse
from vllm_custom_patches._runtime import telemetry

prometheus_client = pytest.importorskip("prometheus_client", reason="vLLM's dependency; installed with vLLM")


@pytest.fixture(autouse=True)
def _clean() -> Iterator[None]:
    metrics._reset_for_tests()
    yield
    telemetry._reset_for_tests()
    metrics._reset_for_tests()


def _row(patch: str, member: str, calls: int, own: float, total: float, errors: int = 0) -> dict[str, Any]:
    return {"patch": patch, "member": member, "calls": calls, "own_s": own, "total_s": total, "errors": errors,
            "last_error": "ValueError: x" if errors else None}  # fmt: skip


def _process(role: str, rows: list[dict[str, Any]] | None, **extra: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "role": role, "pid": 100, "host": "node-a", "process": "x", "dp_rank": None, "tp_rank": None,
        "pp_rank": None, "selection": "p", "applied": ["p"], "patches": [{"name": "p", "state": "applied"}],
        "stacks": [], "error": None,
    }  # fmt: skip
    if rows is not None:
        record["telemetry"] = rows
    record.update(extra)
    return record


# -- the status record ---------------------------------------------------------------------------


def test_the_process_record_has_telemetry_only_when_it_is_on() -> None:
    class Target:
        def step(self) -> int:
            return 1

    class Counted(VLLMPatch[Target]):
        def step(self) -> int:
            return self._original_step() + 1  # type: ignore[no-any-return]

    Counted.apply()
    assert "telemetry" not in process_record("engine_core", dp_rank=0)
    Counted.rollback()
    telemetry.enable()
    assert process_record("engine_core")["telemetry"] == []  # on, nothing timed yet
    Counted.apply()
    Target().step()
    Target().step()
    (row,) = process_record("engine_core", dp_rank=0)["telemetry"]
    assert row["patch"] == "Counted" and row["member"] == "step" and row["calls"] == 2
    assert set(row) == {"patch", "member", "calls", "own_s", "total_s", "errors", "last_error"}
    assert 0 <= row["own_s"] <= row["total_s"] and row["errors"] == 0 and row["last_error"] is None
    json.dumps(row)  # it travels as JSON


# -- /metrics -------------------------------------------------------------------------------------

ENGINE = {"role": "engine_core", "host": "node-a", "dp_rank": "1", "tp_rank": "", "pp_rank": ""}


def sample(name: str, patch: str = "p", member: str = "step", labels: dict[str, str] = ENGINE, **extra: str) -> Any:
    return prometheus_client.REGISTRY.get_sample_value(name, {"patch": patch, "member": member, **labels, **extra})


def figures(patch: str = "p", labels: dict[str, str] = ENGINE) -> tuple[Any, ...]:
    return (
        sample("vllm_custom_patches_calls_total", patch, labels=labels),
        sample("vllm_custom_patches_seconds_total", patch, labels=labels, scope="own"),
        sample("vllm_custom_patches_seconds_total", patch, labels=labels, scope="total"),
        sample("vllm_custom_patches_errors_total", patch, labels=labels),
    )


def publish(*processes: dict[str, Any], client_index: int | None = None) -> None:
    client = None if client_index is None else SimpleNamespace(engine_core=SimpleNamespace(client_index=client_index))
    metrics.publish(analyse(processes), client)


def test_the_counters_carry_the_applied_gauges_labels_plus_member_and_scope() -> None:
    publish(_process("engine_core", [_row("p", "step", 10, 0.25, 1.5, errors=2)], dp_rank=1, pid=11))
    text = prometheus_client.generate_latest(prometheus_client.REGISTRY).decode()
    for name in ("calls", "seconds", "errors"):
        assert f"# TYPE vllm_custom_patches_{name}_total counter" in text
    assert (
        'vllm_custom_patches_calls_total{dp_rank="1",host="node-a",member="step",patch="p",pp_rank="",'
        'role="engine_core",tp_rank=""} 10.0'
    ) in text
    assert figures() == (10.0, 0.25, 1.5, 2.0)
    assert 'vllm_custom_patches_seconds_total{dp_rank="1",host="node-a",member="step",patch="p",pp_rank="",' in text


def test_the_counters_only_grow_whatever_the_views_say() -> None:
    engine = {"dp_rank": 1, "pid": 11}
    publish(_process("engine_core", [_row("p", "step", 10, 0.25, 1.5)], **engine))
    assert figures() == (10.0, 0.25, 1.5, 0.0)  # every series exists from the first view, errors at 0
    publish(_process("engine_core", [_row("p", "step", 15, 0.5, 2.0, errors=1)], **engine))
    assert figures() == (15.0, 0.5, 2.0, 1.0)
    publish(_process("engine_core", [_row("p", "step", 15, 0.5, 2.0, errors=1)], **engine))
    assert figures() == (15.0, 0.5, 2.0, 1.0)  # the same view again: nothing added
    publish(_process("engine_core", None, **engine))  # a view without telemetry (or without the process)
    assert figures() == (15.0, 0.5, 2.0, 1.0)
    # The engine core restarted (another pid, its figures from zero): its new figures are added whole.
    publish(_process("engine_core", [_row("p", "step", 4, 0.125, 0.5)], dp_rank=1, pid=12))
    assert figures() == (19.0, 0.625, 2.5, 1.0)
    # Figures that went down without a new pid (cannot happen in one process): added whole, never subtracted.
    publish(_process("engine_core", [_row("p", "step", 1, 0.0, 0.25)], dp_rank=1, pid=12))
    assert figures() == (20.0, 0.625, 2.75, 1.0)


def test_only_the_first_api_server_publishes_the_engines_each_publishes_its_own() -> None:
    mine = {"role": "api_server", "host": "node-a", "dp_rank": "", "tp_rank": "", "pp_rank": ""}
    view = (
        _process("api_server", [_row("p", "step", 3, 0.5, 1.0)], pid=os.getpid()),
        _process("engine_core", [_row("p", "step", 10, 0.25, 1.5)], dp_rank=1, pid=11),
    )
    publish(*view, client_index=1)  # vLLM's second API server: the first one counts the engines
    assert figures("p", mine)[0] == 3.0 and figures()[0] is None
    publish(*view, client_index=0)
    assert figures()[0] == 10.0 and figures("p", mine)[0] == 3.0


def test_another_api_servers_record_is_not_this_ones_to_count() -> None:
    other = {"role": "api_server", "host": "node-a", "dp_rank": "", "tp_rank": "", "pp_rank": ""}
    publish(_process("api_server", [_row("q", "step", 3, 0.5, 1.0)], pid=os.getpid() + 1), client_index=0)
    assert figures("q", other)[0] is None


# -- the status CLI --------------------------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    answer = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(type(self).answer)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[tuple[str, type[_Handler]]]:
    handler = type("Handler", (_Handler,), {})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", handler
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_status_prints_one_line_per_timed_member_and_its_json_keeps_every_row(
    server: tuple[str, type[_Handler]], capsys: pytest.CaptureFixture[str]
) -> None:
    url, handler = server
    view = analyse(
        [
            _process("engine_core", [_row("p", "step", 1000, 0.002, 0.05)], dp_rank=0, pid=10),
            _process("engine_core", [_row("p", "step", 3000, 0.006, 0.15, errors=2)], dp_rank=1, pid=11),
            _process("api_server", None),
        ]
    )
    handler.answer = json.dumps(view).encode()
    assert cli_main(["status", "--url", url]) == 0
    out = capsys.readouterr().out
    assert (
        "telemetry  p.step: 4000 call(s) in 2 process(es), own 2.0 us/call, total 50.0 us/call "
        "(own 0.008 s, total 0.200 s), 2 error(s), last: ValueError: x"
    ) in out
    assert cli_main(["status", "--url", url, "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert [p.get("telemetry") for p in answer["processes"]] == [p.get("telemetry") for p in view["processes"]]


def test_status_refuses_telemetry_of_the_wrong_shape(
    server: tuple[str, type[_Handler]], capsys: pytest.CaptureFixture[str]
) -> None:
    url, handler = server
    broken = _process("engine_core", [{**_row("p", "step", 1, 0.1, 0.2), "calls": "many"}], dp_rank=0)
    handler.answer = json.dumps(analyse([broken])).encode()
    assert cli_main(["status", "--url", url]) == 2
    assert "answer.processes[0].telemetry[0].calls is str, not int" in capsys.readouterr().err


def test_a_row_of_another_shape_is_left_out_not_a_failure_of_the_status() -> None:
    rows = [{"patch": "p", "member": "step", "calls": "many"}, _row("p", "other", 2, 0.1, 0.2)]
    publish(_process("engine_core", rows, dp_rank=1, pid=11))
    assert figures()[0] is None
    assert sample("vllm_custom_patches_calls_total", "p", "other") == 2.0
