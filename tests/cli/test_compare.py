"""``vllm-custom-patches compare`` (issue 20 item 3) against a real local HTTP server serving status and metrics.

The server answers ``GET /custom_patches`` (a status with a rollout) and
``GET /metrics`` (vLLM's page, built by ``_vllm_metrics`` with vLLM 0.32's
names, labels and buckets) over real HTTP; the command reads both through
``_ops.remote``'s client. The table, the JSON shape and the exit codes: 0
within every guard (or none), 1 a guard broken, 2 cannot tell.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _vllm_metrics import Engine, metrics_text

from vllm_custom_patches._cli import compare
from vllm_custom_patches._cli.main import main
from vllm_custom_patches._ops.figures import Reading
from vllm_custom_patches._ops.vllm_metrics import parse

START = 1_700_000_000.0
NOW = START + 60.0
FAST, SLOW = 0.015, 0.09
CLI = str(Path(sys.executable).with_name("vllm-custom-patches"))


class Served:
    """What the test server answers; tests change it."""

    def __init__(self) -> None:
        self.engines = {0: Engine.serving(20, ttft=FAST), 1: Engine.serving(20, ttft=FAST)}
        start = Reading(
            parse(metrics_text(self.engines), at=START), {"calls": 0, "own_s": 0, "total_s": 0, "errors": 0}
        )
        self.rollout: dict[str, Any] = {
            "id": "3f2a9c1b7d4e", "patch": "slow_schedule", "dp_ranks": [1], "since": START,
            "requester": "127.0.0.1:50000", "reason": "", "guards": ["ttft_p99<=1.2x", "errors==0"],
            "window_s": 60.0, "state": "active", "ended": None, "figures": None, "revision": 1,
            "at_start": start.to_json(),
        }  # fmt: skip
        self.telemetry_errors = 0
        self.redirect_metrics = False
        self.seen_auth: list[str | None] = []

    def serve(self, canary: Engine, baseline: Engine | None) -> None:
        self.engines[1] = self.engines[1].plus(canary)
        if baseline is not None:
            self.engines[0] = self.engines[0].plus(baseline)

    def status(self) -> dict[str, Any]:
        processes: list[dict[str, Any]] = [{"role": "api_server", "pid": 1, "applied": [], "patches": []}]
        for rank in (0, 1):
            telemetry = (
                [{"patch": "slow_schedule", "member": "Scheduler.schedule", "calls": 40, "own_s": 1.5,
                  "total_s": 1.9, "errors": self.telemetry_errors, "last_error": None}]
                if rank in self.rollout["dp_ranks"]
                else []
            )  # fmt: skip
            processes.append(
                {"role": "engine_core", "pid": 10 + rank, "dp_rank": rank, "tp_rank": None, "pp_rank": None,
                 "applied": ["slow_schedule"] if rank == 1 else [], "patches": [], "telemetry": telemetry}
            )  # fmt: skip
        return {"consistent": True, "processes": processes, "rollouts": [self.rollout]}


@contextlib.contextmanager
def http_server(served: Served) -> Iterator[str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            served.seen_auth.append(self.headers.get("Authorization"))
            if self.path == "/custom_patches":
                body, kind = json.dumps(served.status()).encode(), "application/json"
            elif self.path == "/metrics" and served.redirect_metrics:
                self.send_response(302)
                self.send_header("Location", "http://elsewhere.example/metrics")
                self.end_headers()
                return
            elif self.path == "/metrics":
                body, kind = metrics_text(served.engines).encode(), "text/plain; version=0.0.4"
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def served() -> Served:
    return Served()


@pytest.fixture
def url(served: Served, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setattr(compare, "_clock", lambda: NOW)
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    with http_server(served) as address:
        yield address


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["compare", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_canary_breaking_a_guard_exits_1_with_the_table(
    served: Served, url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    served.serve(Engine.serving(30, ttft=SLOW), Engine.serving(30, ttft=FAST))
    code, out, err = run(capsys, "slow_schedule", "--url", url)
    assert (code, err) == (1, "")
    lines = out.splitlines()
    assert lines[0] == (
        "rollout 3f2a9c1b7d4e of slow_schedule: canary dp ranks [1] vs baseline dp ranks [0], "
        "over the rollout's life (60.0 s)"
    )
    rows = {line.split()[0]: line.split() for line in lines[2:20] if line}
    assert rows["ttft_p50"][1:] == ["90.0", "ms", "15.0", "ms", "6.00x"]
    assert rows["requests"][1:] == ["30", "30", "1.00x"]
    assert rows["request_rate"][1:] == ["0.5/s", "0.5/s", "1.00x"]
    assert "patch telemetry on the canary ranks: 40 calls, own 1.500 s, total 1.900 s, 0 errors" in lines
    assert "ttft_p99<=1.2x  BROKEN   canary ttft_p99 0.0998 breaks <= 0.02388 (1.2 x baseline 0.0199)" in lines
    assert "errors==0       ok       canary errors 0 meets == 0" in lines
    assert lines[-1] == "verdict: BROKEN: ttft_p99<=1.2x"


def test_json_has_a_canary_and_a_baseline_with_their_ranks_and_figures(
    served: Served, url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    served.serve(Engine.serving(30, ttft=SLOW, errors=2), Engine.serving(30, ttft=FAST))
    served.telemetry_errors = 1
    code, out, _ = run(capsys, "slow_schedule", "--url", url, "--json")
    assert code == 1
    report = json.loads(out)
    assert set(report) == {"patch", "rollout", "since", "over", "window_s", "canary", "baseline", "guards", "verdict"}
    assert (report["patch"], report["rollout"], report["over"], report["window_s"]) == (
        "slow_schedule", "3f2a9c1b7d4e", "life", 60.0,
    )  # fmt: skip
    canary, baseline = report["canary"], report["baseline"]
    assert canary["dp_ranks"] == [1] and baseline["dp_ranks"] == [0]
    for side in (canary, baseline):
        for figure in ("ttft_p50", "ttft_p99", "itl_p50", "itl_p99", "e2e_p50", "e2e_p99", "queue_p50", "queue_p99",
                       "request_rate", "token_rate", "requests", "failed_requests"):  # fmt: skip
            assert isinstance(side[figure], float), figure
    assert canary["ttft_p50"] == pytest.approx(0.09) and baseline["ttft_p50"] == pytest.approx(0.015)
    assert canary["request_rate"] == pytest.approx(0.5) and canary["token_rate"] == pytest.approx(2.0)
    # Errors on the canary: 2 failed requests plus the patch's 1 (telemetry since the rollout's start).
    assert (canary["failed_requests"], canary["patch_errors"], canary["errors"]) == (2.0, 1.0, 3.0)
    assert canary["telemetry"] == {"calls": 40, "own_s": 1.5, "total_s": 1.9, "errors": 1.0}
    assert [(g["guard"], g["verdict"]) for g in report["guards"]] == [
        ("ttft_p99<=1.2x", "broken"),
        ("errors==0", "broken"),
    ]
    assert set(report["guards"][0]) == {"guard", "verdict", "canary", "baseline", "limit", "why"}
    assert report["verdict"] == "broken"


def test_a_canary_within_every_guard_exits_0(served: Served, url: str, capsys: pytest.CaptureFixture[str]) -> None:
    served.serve(Engine.serving(30, ttft=FAST), Engine.serving(30, ttft=FAST))
    code, out, _ = run(capsys, "slow_schedule", "--url", url)
    assert code == 0
    assert out.splitlines()[-1] == "verdict: within every guard"
    served.rollout["guards"] = []
    code, out, _ = run(capsys, "slow_schedule", "--url", url)
    assert code == 0
    assert out.splitlines()[-1] == "verdict: no guards: nothing to judge"


def test_a_guard_that_cannot_be_evaluated_exits_2_and_says_why(
    served: Served, url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    served.serve(Engine.serving(30, ttft=SLOW), None)  # no request on the baseline rank since the start
    code, out, _ = run(capsys, "slow_schedule", "--url", url)
    assert code == 2
    assert "  baseline ttft_p50: no request finished in the window" in out.splitlines()
    assert out.splitlines()[-1] == "verdict: CANNOT TELL: ttft_p99<=1.2x"
    code, out, _ = run(capsys, "slow_schedule", "--url", url, "--json")
    assert (code, json.loads(out)["verdict"]) == (2, "cannot_tell")


def test_window_compares_two_readings_that_far_apart(
    served: Served, url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    served.serve(Engine.serving(30, ttft=SLOW), Engine.serving(30, ttft=FAST))  # before the window: slow
    clock = [NOW]
    waited: list[float] = []

    def sleep(seconds: float) -> None:
        waited.append(seconds)
        clock[0] += seconds
        served.serve(Engine.serving(10, ttft=FAST), Engine.serving(10, ttft=FAST))  # during it: fast

    monkeypatch.setattr(compare, "_clock", lambda: clock[0])
    monkeypatch.setattr(compare, "_sleep", sleep)
    code, out, _ = run(capsys, "slow_schedule", "--url", url, "--window", "20", "--json")
    assert code == 0 and waited == [20.0]
    report = json.loads(out)
    assert (report["over"], report["window_s"]) == ("window", 20.0)
    assert report["canary"]["requests"] == 10.0 and report["canary"]["ttft_p99"] < 0.02


def test_without_a_start_reading_the_life_cannot_be_compared_but_a_window_can(
    served: Served, url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    del served.rollout["at_start"]
    code, out, err = run(capsys, "slow_schedule", "--url", url)
    assert (code, out) == (2, "")
    assert err == (
        "vllm-custom-patches: the rollout of 'slow_schedule' keeps no reading of its start, so its life cannot be "
        "compared; pass --window S to compare over S seconds from now\n"
    )
    monkeypatch.setattr(
        compare, "_sleep", lambda seconds: served.serve(Engine.serving(5, FAST), Engine.serving(5, FAST))
    )
    code, out, err = run(capsys, "slow_schedule", "--url", url, "--window", "1")
    assert code == 0, err


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s.rollout.update(patch="other"),
         "no rollout of 'slow_schedule' on {url} (active rollouts: other); start one with 'vllm-custom-patches "
         "apply slow_schedule --dp-ranks RANKS --url {url}'"),
        (lambda s: s.rollout.update(state="rolled_back_by_guard"),
         "the rollout of 'slow_schedule' (3f2a9c1b7d4e) is no longer active: it ended rolled_back_by_guard; nothing "
         "to compare (its record: vllm-custom-patches status --url {url} --json)"),
        (lambda s: s.rollout.update(at_start={"metrics": []}),
         "the rollout's start reading cannot be read (a metrics snapshot of an unexpected shape); pass --window S"),
        (lambda s: s.rollout.update(guards=["ttft_p99 <= fast"]),
         "the rollout's guards cannot be read: guard 'ttft_p99 <= fast': threshold 'fast' is not a number; give "
         "seconds (0.5, 500ms) or a multiple of the baseline ranks' (1.2x)"),
        (lambda s: s.engines.clear(),
         "{url}/metrics has no per-engine vLLM request metrics (vllm:* series with an engine label); was the server "
         "started with --disable-log-stats?"),
        (lambda s: setattr(s, "redirect_metrics", True),
         "{url}/metrics answered HTTP 302, a redirect to http://elsewhere.example/metrics: not followed, because the "
         "request carries the API key, which goes only to the address given; if the server is elsewhere, pass that "
         "address with --url"),
    ],
)  # fmt: skip
def test_what_cannot_be_compared_exits_2_with_one_line(
    served: Served, url: str, capsys: pytest.CaptureFixture[str], change: Any, message: str
) -> None:
    change(served)
    code, out, err = run(capsys, "slow_schedule", "--url", url)
    assert (code, out) == (2, "")
    assert err == f"vllm-custom-patches: {message.format(url=url)}\n"


def test_an_unreachable_server_or_bad_arguments_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nobody listens there
    code, out, err = run(capsys, "slow_schedule", "--url", f"http://127.0.0.1:{port}")
    assert (code, out) == (2, "")
    assert err.startswith(f"vllm-custom-patches: cannot reach http://127.0.0.1:{port}: ") and err.count("\n") == 1
    with pytest.raises(SystemExit) as exited:
        main(["compare", "slow_schedule", "--url", "http://127.0.0.1:1", "--window", "-3"])
    assert exited.value.code == 2
    assert "'-3' is not a positive number of seconds" in capsys.readouterr().err
    code, _, err = run(capsys, "slow_schedule", "--url", "http://127.0.0.1:1", "--window", "7200")
    assert code == 2 and "--window 7200 is longer than 3600 s" in err


def test_the_api_key_goes_to_both_routes(served: Served, url: str, capsys: pytest.CaptureFixture[str]) -> None:
    served.serve(Engine.serving(30, FAST), Engine.serving(30, FAST))
    code, _, _ = run(capsys, "slow_schedule", "--url", url, "--api-key", "sk-test")
    assert code == 0
    assert served.seen_auth == ["Bearer sk-test", "Bearer sk-test"]


def test_the_console_script_exits_with_the_verdict(served: Served, url: str) -> None:
    # The real entry point, in its own process; the rollout's start is an hour back on this clock.
    served.serve(Engine.serving(30, ttft=SLOW), Engine.serving(30, ttft=FAST))
    result = subprocess.run([CLI, "compare", "slow_schedule", "--url", url], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    assert result.stdout.splitlines()[-1] == "verdict: BROKEN: ttft_p99<=1.2x"
