"""Every rank, every node, live: data parallel, multi-node, a rank that fails, and ``GET /custom_patches``.

Real ``vllm serve`` process trees (vLLM's own CLI, ``_vllm_cli.py``) on the
tiny model, queried over real HTTP and through the installed
``vllm-custom-patches`` console script.  Each claim rests on per-process
evidence: pids that are live vLLM processes with vLLM's own titles, and files
written by the patched code from inside those processes.

Servers are shared per module (starting one costs 40-90 s here): one data-
parallel server, one three-node cluster, one tensor-parallel server whose
rank 1 cannot take the worker patch.  Each of the last two starts while the
tests before it run (start-up mostly waits on one process at a time).  The tests on a shared server only read,
except the kill-switch test, which rolls a patch back and applies it again.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from _engine import _stop_group, free_port, launch_serve, tail, wait_ready, write_rank_witness
from _slow_patch import write_slow_schedule

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

API_KEY = "fleet-test-key"
CONTROL_TOKEN = "fleet-control-token-0123456789"
CLI = str(Path(sys.executable).with_name("vllm-custom-patches"))


@dataclass
class Cluster:
    """One vLLM server, possibly spread over several "nodes" (process trees with their own environment)."""

    port: int
    model: str
    procs: dict[Path, subprocess.Popen[bytes]]
    files: dict[str, Path] = field(default_factory=dict)
    ready_s: float = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        for proc in self.procs.values():
            _stop_group(proc)


def _get(url: str, key: str | None = API_KEY, timeout: float = 30) -> tuple[int, Any]:
    request = urllib.request.Request(url)
    if key is not None:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
            return response.status, json.loads(body) if "json" in response.headers.get("Content-Type", "") else body
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _complete(cluster: Cluster, prompt: str, max_tokens: int = 4) -> dict[str, Any]:
    body = json.dumps({"model": cluster.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}).encode()
    request = urllib.request.Request(
        f"{cluster.url}/v1/completions", data=body,
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"},
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=120) as response:
        answer: dict[str, Any] = json.loads(response.read())
    return answer


def _status(cluster: Cluster) -> dict[str, Any]:
    code, report = _get(f"{cluster.url}/custom_patches")
    assert code == 200, (code, report)
    assert isinstance(report, dict)
    return report


def _by_role(report: Mapping[str, Any], role: str) -> list[dict[str, Any]]:
    return sorted(
        (p for p in report["processes"] if p["role"] == role), key=lambda p: (p["dp_rank"], p["tp_rank"] or 0)
    )


def _title(pid: int) -> str:
    import psutil

    return " ".join(psutil.Process(pid).cmdline())


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=120)


def _start(cluster: Cluster, timeout: float = 600) -> Cluster:
    try:
        cluster.ready_s = wait_ready(cluster.port, cluster.procs, timeout)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _ready(launched: Cluster, what: str) -> Cluster:
    """A cluster launched while earlier tests ran, once it serves."""
    if not launched.ready_s:
        _start(launched)
        print(f"{what} ready in {launched.ready_s:.1f}s (after the wait for it)")
    return launched


def _cpu_env(workspace: Any, bind: str, **extra: str) -> dict[str, str]:
    # One core per CPU worker (2 cores here); without a binding vLLM refuses
    # several local CPU workers ("Not enough allowed NUMA nodes").
    return workspace.env(VLLM_CPU_OMP_THREADS_BIND=bind, **extra)


# -- data parallel 2: one node, two engine cores ---------------------------------------


@pytest.fixture(scope="module")
def dp_server(
    vllm_workspace: Any, tmp_path_factory: pytest.TempPathFactory, three_nodes_launched: Cluster
) -> Iterator[Cluster]:
    # three_nodes_launched: that cluster starts up while this one does and its tests run
    # (start-up is mostly waiting on one process at a time; two overlap on 2 cores).
    tmp = tmp_path_factory.mktemp("dp2")
    files = {"trace": tmp / "trace.jsonl", "witness": tmp / "ranks.jsonl"}
    env = _cpu_env(
        vllm_workspace, "0|1",
        VLLM_PLUGINS="custom_patches",
        VLLM_CUSTOM_PATCHES_CONTROL_TOKEN=CONTROL_TOKEN,
        VLLM_CUSTOM_PATCHES="scheduler_trace,RankWitness",
        VLLM_CUSTOM_PATCHES_PATH=str(write_slow_schedule(write_rank_witness(tmp / "patches"))),
        VLLM_CUSTOM_PATCHES_TRACE_FILE=str(files["trace"]),
        VCP_RANK_WITNESS_FILE=str(files["witness"]),
        VLLM_CUSTOM_PATCHES_TELEMETRY="1",
        VLLM_CUSTOM_PATCHES_GUARD_INTERVAL="1",  # the guard test's canary is judged every second
        VCP_SLOW_SCHEDULE_S="0.05",  # SlowSchedule (registered, applied only by the guard test's canary)
    )  # fmt: skip
    port = free_port()
    args = ["--host", "127.0.0.1", "--port", str(port), "--data-parallel-size", "2", "--api-key", API_KEY]
    log = tmp / "server.log"
    cluster = _start(
        Cluster(port, str(vllm_workspace.model), {log: launch_serve(str(vllm_workspace.model), env, log, args)}, files)
    )
    print(f"data parallel 2 ready in {cluster.ready_s:.1f}s")
    try:
        yield cluster
    finally:
        cluster.stop()


def test_data_parallel_2_every_engine_core_and_worker_applies_and_runs_the_patches(dp_server: Cluster) -> None:
    for i in range(6):  # vLLM balances requests over both ranks
        assert _complete(dp_server, f"hello number {i}")["choices"][0]["text"] is not None
    report = _status(dp_server)
    assert report["consistent"] is True, report["inconsistencies"] or report["errors"]
    cores, workers = _by_role(report, "engine_core"), _by_role(report, "worker")
    assert [c["dp_rank"] for c in cores] == [0, 1] and [w["dp_rank"] for w in workers] == [0, 1]
    for core in cores:
        assert core["applied"] == ["scheduler_trace"], core  # RankWitness targets the worker: pending here
        assert f"EngineCore_DP{core['dp_rank']}" in _title(core["pid"])  # a live vLLM engine core, this rank's
    for worker in workers:
        assert worker["applied"] == ["RankWitness"] and worker["tp_rank"] == 0, worker
        assert "VLLM::Worker" in _title(worker["pid"])
    assert len({p["pid"] for p in cores + workers}) == 4
    (api,) = _by_role(report, "api_server")[:1]
    assert api["applied"] == [] and {p["name"]: p["state"] for p in api["patches"]}["scheduler_trace"] == "pending"
    # The patched code ran inside each of those processes: the trace from both
    # engine cores, the witness from both workers.
    traced = {json.loads(line)["pid"] for line in dp_server.files["trace"].read_text().splitlines()}
    assert traced == {c["pid"] for c in cores}
    witnessed = {json.loads(line)["pid"] for line in dp_server.files["witness"].read_text().splitlines()}
    assert witnessed == {w["pid"] for w in workers}


def test_the_status_route_requires_the_servers_api_key(dp_server: Cluster) -> None:
    assert _get(f"{dp_server.url}/custom_patches", key=None)[0] == 401
    assert _get(f"{dp_server.url}/custom_patches", key="not-the-key")[0] == 401
    assert _get(f"{dp_server.url}/custom_patches", key=API_KEY)[0] == 200


def test_the_status_answers_while_the_server_serves_and_changes_nothing(dp_server: Cluster) -> None:
    before = _status(dp_server)
    stop, served, failures = threading.Event(), [], []

    def load() -> None:
        deadline = time.monotonic() + 90
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                served.append(_complete(dp_server, "a steady stream of requests", max_tokens=16))
            except Exception as exc:  # collected; asserted below
                failures.append(exc)

    clients = [threading.Thread(target=load, daemon=True) for _ in range(3)]
    for client in clients:
        client.start()
    try:
        deadline = time.monotonic() + 120
        while len(served) < len(clients) and not failures:  # the engines are busy now
            assert time.monotonic() < deadline, "the load generator served nothing within 120 s"
            time.sleep(0.05)
        timings = []
        for _ in range(8):
            started = time.monotonic()
            report = _status(dp_server)
            timings.append(time.monotonic() - started)
            assert report["consistent"] is True
    finally:
        stop.set()
        for client in clients:
            client.join(timeout=120)
    print(
        f"GET /custom_patches under load: median {statistics.median(timings) * 1000:.0f} ms, max {max(timings) * 1000:.0f} ms"
    )
    # The clients never let the queues drain: a status that waited for them would never have answered
    # (each GET gives up after 30 s, failing the test).  Its speed is printed, not asserted: it is the machine's.
    assert not failures, failures[:3]
    assert served, "the load generator served nothing: the status was not measured under load"
    after = _status(dp_server)

    def applied(report: Mapping[str, Any]) -> dict[int, tuple[str, list[str]]]:
        return {p["pid"]: (p["role"], p["applied"]) for p in report["processes"] if p["role"] != "api_server"}

    assert applied(after) == applied(before)  # same processes, same patches


def test_the_metric_shows_each_processs_patches_on_vllms_metrics(dp_server: Cluster) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    _status(dp_server)  # the route refreshes what the metric shows
    code, body = _get(f"{dp_server.url}/metrics", key=None)
    assert code == 200
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    samples = {
        (s.labels["patch"], s.labels["role"], s.labels["dp_rank"], s.labels["tp_rank"]): s.value
        for s in families["vllm_custom_patches_applied"].samples
    }
    assert samples[("scheduler_trace", "engine_core", "0", "")] == 1.0
    assert samples[("scheduler_trace", "engine_core", "1", "")] == 1.0
    assert samples[("RankWitness", "worker", "0", "0")] == 1.0
    assert samples[("RankWitness", "worker", "1", "0")] == 1.0
    assert samples[("scheduler_trace", "worker", "1", "0")] == 0.0  # selected there, pending: known, not applied
    assert [s.value for s in families["vllm_custom_patches_consistent"].samples] == [1.0]


def test_the_status_cli_shows_the_table_and_exits_0_on_a_consistent_server(dp_server: Cluster) -> None:
    result = _run_cli("status", "--url", dp_server.url, "--api-key", API_KEY)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "engine_core dp_rank=1" in result.stdout and "consistent" in result.stdout
    result = _run_cli("status", "--url", dp_server.url, "--api-key", API_KEY, "--json")
    assert result.returncode == 0 and json.loads(result.stdout)["consistent"] is True
    result = _run_cli("status", "--url", dp_server.url)  # no key
    assert result.returncode == 2 and "pass the server's API key with --api-key" in result.stderr


def _post(url: str, token: str) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=b"{}", method="POST", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_the_kill_switch_reaches_the_engine_core_of_every_data_parallel_rank(dp_server: Cluster) -> None:
    code, report = _post(f"{dp_server.url}/custom_patches/scheduler_trace/rollback", CONTROL_TOKEN)
    assert code == 200 and report["ok"], report
    changed = sorted((p["role"], p["dp_rank"]) for p in report["processes"] if p["changed"] and not p.get("waiting"))
    assert changed == [("engine_core", 0), ("engine_core", 1)]  # elsewhere it was only disarmed (``waiting``)
    assert [c["applied"] for c in _by_role(_status(dp_server), "engine_core")] == [[], []]
    before = len(dp_server.files["trace"].read_text().splitlines())
    for i in range(4):
        _complete(dp_server, f"untraced {i}")
    assert len(dp_server.files["trace"].read_text().splitlines()) == before  # neither engine core traces now
    code, report = _post(f"{dp_server.url}/custom_patches/scheduler_trace/apply", CONTROL_TOKEN)
    assert code == 200 and report["ok"], report
    assert [c["applied"] for c in _by_role(_status(dp_server), "engine_core")] == [["scheduler_trace"]] * 2
    assert _status(dp_server)["consistent"] is True


def test_a_status_read_right_after_a_change_shows_it_whichever_api_server_answers(dp_server: Cluster) -> None:
    # --data-parallel-size 2 starts two API servers on the one port, each with its own view of the
    # server (reused for up to a second); either may take the change and either the next GET.
    answered_by = set()
    for round_ in range(10):
        for action, expected in (("rollback", []), ("apply", ["scheduler_trace"])):
            code, report = _post(f"{dp_server.url}/custom_patches/scheduler_trace/{action}", CONTROL_TOKEN)
            assert code == 200 and report["ok"], report
            for _ in range(2):
                status = _status(dp_server)
                answered_by.update(p["pid"] for p in _by_role(status, "api_server"))  # the one that answered
                shown = [c["applied"] for c in _by_role(status, "engine_core")]
                assert shown == [expected] * 2, f"round {round_}: the status right after the {action} shows {shown}"
    assert len(answered_by) == 2, answered_by  # both API servers were read


def _post_json(url: str, body: Mapping[str, Any], token: str = CONTROL_TOKEN) -> tuple[int, Any]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _applied(report: Mapping[str, Any]) -> dict[tuple[str, int | None, int | None], list[str]]:
    return {(p["role"], p["dp_rank"], p["tp_rank"]): p["applied"] for p in report["processes"]
            if p["role"] != "api_server"}  # fmt: skip


def test_a_canary_on_rank_1_then_promote_seen_by_both_api_servers(dp_server: Cluster) -> None:
    """Issue 20 (b, d): shortest_prompt_first on data-parallel rank 1 only, declared (consistent), listed by both
    API servers, refused on tensor-parallel ranks, an unknown rank or with a malformed guard; promote reaches rank 0.
    The server is left with the patches it had."""
    name, url = "shortest_prompt_first", dp_server.url
    before = _status(dp_server)
    rollouts_before = len(before["rollouts"])
    control = ("--url", url, "--token", CONTROL_TOKEN)
    result = _run_cli("apply", name, "--dp-ranks", "1", "--reason", "canary on rank 1", *control)
    assert result.returncode == 0, result.stdout + result.stderr
    print(f"$ vllm-custom-patches apply {name} --dp-ranks 1 ...\n{result.stdout}")
    assert f"patch '{name}' applied on dp rank(s) 1" in result.stdout
    try:
        # Each read may be answered by either API server (two on one port): every one must show the canary.
        answered_by: set[int] = set()
        for _ in range(60):
            report = _status(dp_server)
            (api,) = _by_role(report, "api_server")
            answered_by.add(api["pid"])
            assert report["consistent"] is True, report["inconsistencies"] or report["errors"]
            cores = _by_role(report, "engine_core")
            assert [c["applied"] for c in cores] == [["scheduler_trace"], ["scheduler_trace", name]], cores
            active = [r for r in report["rollouts"] if r["state"] == "active"]
            assert [(r["patch"], r["dp_ranks"], r["reason"]) for r in active] == [(name, [1], "canary on rank 1")]
            if len(answered_by) == 2:
                break
        assert len(answered_by) == 2, f"60 reads were all answered by {answered_by}"
        # What compare and the guards measure its life from: vLLM's metrics of both ranks as it began.
        assert sorted(active[0]["at_start"]["metrics"]["engines"]) == ["0", "1"], active[0]["at_start"]
        for i in range(6):  # both ranks serve, the canary's with its scheduler
            assert _complete(dp_server, f"canary traffic {i}")["choices"][0]["text"] is not None
        result = _run_cli("compare", name, "--url", url, "--api-key", API_KEY, "--json")
        assert result.returncode == 0, result.stdout + result.stderr  # no guards: within every one
        compared = json.loads(result.stdout)
        assert (compared["canary"]["dp_ranks"], compared["baseline"]["dp_ranks"]) == ([1], [0]), compared
        for side in ("canary", "baseline"):  # both sides served since the canary began
            assert compared[side]["requests"] >= 1 and compared[side]["ttft_p50"] is not None, compared
        print(
            f"$ vllm-custom-patches compare {name} ...\n{_run_cli('compare', name, '--url', url, '--api-key', API_KEY).stdout}"
        )
        result = _run_cli("status", "--url", url, "--api-key", API_KEY)
        assert result.returncode == 0 and f"{name} on dp rank(s) 1: active since" in result.stdout, result.stdout
        print(f"$ vllm-custom-patches status ...\n{result.stdout}")

        # Refused, nothing changed: a canary of tensor-parallel ranks, a rank no engine core has, a bad guard.
        shown = _applied(_status(dp_server))
        for body, problem in (
            ({"dp_ranks": [1], "tp_ranks": [0]}, "unknown field(s) 'tp_ranks'"),
            ({"dp_ranks": [2]}, "no engine core has dp rank(s) [2]; this server's engine cores have dp ranks [0, 1]"),
            ({"dp_ranks": [0], "guards": ["ttft_p99<=fast"]}, "threshold 'fast' is not a number"),
        ):
            code, answer = _post_json(f"{url}/custom_patches/fair_share/apply", body)
            assert code == 422 and problem in answer["error"], (code, answer)
        second = _post_json(f"{url}/custom_patches/{name}/apply", {"dp_ranks": [0]})
        assert second[0] == 409 and "has an active canary" in second[1]["error"]
        after = _status(dp_server)
        assert _applied(after) == shown and [r["state"] for r in after["rollouts"]][rollouts_before:] == ["active"]

        result = _run_cli("promote", name, *control)
        assert result.returncode == 0, result.stdout + result.stderr
        print(f"$ vllm-custom-patches promote {name} ...\n{result.stdout}")
        report = _status(dp_server)
        assert [c["applied"] for c in _by_role(report, "engine_core")] == [["scheduler_trace", name]] * 2
        assert report["consistent"] is True
        (promoted,) = report["rollouts"][rollouts_before:]
        assert promoted["state"] == "promoted" and promoted["ended"] >= promoted["since"]
        assert promoted["at_start"] is None  # an ended rollout keeps no start reading
    finally:
        code, answer = _post(f"{url}/custom_patches/{name}/rollback", CONTROL_TOKEN)
        assert code == 200 and answer["ok"], answer
    assert _applied(_status(dp_server)) == _applied(before)


def _telemetry(report: Mapping[str, Any]) -> dict[tuple[int | None, str, str], dict[str, Any]]:
    """(dp rank, patch, member) -> the engine core's telemetry row."""
    return {(core["dp_rank"], row["patch"], row["member"]): row
            for core in _by_role(report, "engine_core") for row in core.get("telemetry", [])}  # fmt: skip


def _calls_metric(cluster: Cluster, patch: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    code, text = _get(f"{cluster.url}/metrics")
    assert code == 200, code
    text = text.decode() if isinstance(text, bytes) else json.dumps(text)
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "vllm_custom_patches_calls"  # the parser drops a counter's _total
        for sample in family.samples
        if sample.name.endswith("_total") and sample.labels["patch"] == patch and sample.labels["role"] == "engine_core"
    )


def test_telemetry_counts_each_patchs_calls_per_engine_core_and_nothing_for_one_not_applied(
    dp_server: Cluster,
) -> None:
    """Issue 20 (a): with VLLM_CUSTOM_PATCHES_TELEMETRY=1, the counters grow with requests and an unapplied patch
    (SlowSchedule, registered from VLLM_CUSTOM_PATCHES_PATH) counts nothing."""
    before = _telemetry(_status(dp_server))
    metric_before = _calls_metric(dp_server, "scheduler_trace")
    requests = 8
    for i in range(requests):
        assert _complete(dp_server, f"telemetry {i}")["choices"][0]["text"] is not None
    trace = "scheduler_trace", "_update_after_schedule"

    def grown(after: Mapping[tuple[int | None, str, str], Mapping[str, Any]]) -> int:
        return sum(
            after[(rank, *trace)]["calls"] - before.get((rank, *trace), {"calls": 0})["calls"] for rank in (0, 1)
        )

    # At least one scheduler step per request, in the rank that served it.  A status answer may be a
    # view up to about a second old (shared between concurrent reads): wait for one taken after them.
    started = time.monotonic()
    while grown(after := _telemetry(_status(dp_server))) < requests:
        assert time.monotonic() - started < 60, (before, after)
        time.sleep(0.2)  # polling the observable state
    for key, row in after.items():
        assert 0 <= row["own_s"] <= row["total_s"] and row["errors"] == 0, (key, row)
    # Never applied: no row, no series (a patch's figures start at its first apply).
    assert not [key for key in after if key[1] == "SlowSchedule"], after
    # /metrics: the same counters, growing with the calls.  The first API server publishes the engine
    # cores' series, from its views (each read it answers, and its background refresh every few
    # seconds): wait for a view of it taken after the requests, whichever API server answered above.
    started = time.monotonic()
    while _calls_metric(dp_server, "scheduler_trace") - metric_before < requests:
        assert time.monotonic() - started < 120, "the calls counter on /metrics did not grow with the requests"
        time.sleep(0.5)  # polling the observable state
    assert _calls_metric(dp_server, "SlowSchedule") == 0  # no series at all


class _Stream:
    """Completions from two client threads until stopped; every failure recorded (the test asserts there are none)."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster, self.served = cluster, 0
        self.failures: list[BaseException] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(2)]

    def _run(self, n: int) -> None:
        i = 0
        while not self._stop.is_set():
            i += 1
            try:
                _complete(self.cluster, f"stream {n} " + "word " * (i % 5))
                self.served += 1
            except BaseException as exc:  # asserted by the test
                self.failures.append(exc)

    def __enter__(self) -> _Stream:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=180)


def test_a_slow_canary_is_rolled_back_by_its_guard_within_the_window_and_no_request_fails(dp_server: Cluster) -> None:
    """Issue 20 (c): SlowSchedule (a stackable patch sleeping 50 ms per scheduler step) canaried on rank 1 with
    ``ttft_p99<=1.2x`` over 5 s windows, under a stream of requests: the API server that accepted the canary rolls
    it back itself, all or nothing, and the record says why, with the figures."""
    name, url, window = "SlowSchedule", dp_server.url, 5
    before = _applied(_status(dp_server))
    with _Stream(dp_server) as stream:
        body = {"dp_ranks": [1], "guards": ["ttft_p99<=1.2x", "errors==0"], "window_s": window, "reason": "guard test"}
        code, answer = _post_json(f"{url}/custom_patches/{name}/apply", body)
        assert code == 200 and answer["ok"], answer
        rollout_id = answer["rollout"]["id"]
        started = time.monotonic()
        while True:  # the rollout's record, read from the engine cores by whichever API server answers
            (record,) = [r for r in _status(dp_server)["rollouts"] if r["id"] == rollout_id]
            if record["state"] != "active":
                break
            assert time.monotonic() - started < 240, f"the guard did not end the canary: {record}"
            time.sleep(0.2)  # polling the observable state; the guardian judges on its own clock
    assert not stream.failures, stream.failures[:3]
    assert stream.served > 0
    assert record["state"] == "rolled_back_by_guard", record
    (broken,) = record["figures"]["broken"]
    assert broken["guard"] == "ttft_p99<=1.2x" and broken["canary"] > broken["limit"], broken
    assert broken["broken_for_s"] >= window  # a whole window of breach, never less
    assert "ttft_p99<=1.2x broken" in record["end_reason"]
    report = _status(dp_server)
    assert report["consistent"] is True and _applied(report) == before  # rolled back on rank 1, nothing else changed
    print(f"guard: canary of {name} rolled back by its guard {record['ended'] - record['since']:.1f} s after the "
          f"apply (window {window} s, judged every 1 s; breach judged {broken['broken_for_s']:.1f} s); "
          f"{stream.served} requests served meanwhile, none failed")  # fmt: skip


# -- multi-node: three nodes, one started without VLLM_CUSTOM_PATCHES ----------------------


@pytest.fixture(scope="module")
def three_nodes(three_nodes_launched: Cluster) -> Cluster:
    return _ready(three_nodes_launched, "three nodes (data parallel 3)")


@pytest.fixture(scope="module")
def three_nodes_launched(vllm_workspace: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """vLLM's multi-node data parallel, as ops teams start it: one command per node, each with its own environment.

    Node 0 serves the API and data-parallel rank 0; nodes 1 and 2 are
    headless (``--headless --data-parallel-start-rank N``).  Nodes 0 and 1 set
    ``VLLM_CUSTOM_PATCHES``; node 2 was started without it (nor
    ``VLLM_PLUGINS``): it serves, unpatched.
    """
    tmp = tmp_path_factory.mktemp("nodes")
    trace = tmp / "trace.jsonl"
    model = str(vllm_workspace.model)
    port, rpc_port = free_port(), free_port()
    common = ["--data-parallel-size", "3", "--data-parallel-size-local", "1",
              "--data-parallel-address", "127.0.0.1", "--data-parallel-rpc-port", str(rpc_port)]  # fmt: skip
    patched = {"VLLM_PLUGINS": "custom_patches", "VLLM_CUSTOM_PATCHES": "scheduler_trace",
               "VLLM_CUSTOM_PATCHES_TRACE_FILE": str(trace)}  # fmt: skip
    nodes = [
        (_cpu_env(vllm_workspace, "0", **patched), ["--host", "127.0.0.1", "--port", str(port), "--api-server-count", "1", "--api-key", API_KEY]),
        (_cpu_env(vllm_workspace, "1", **patched), ["--headless", "--data-parallel-start-rank", "1"]),
        (_cpu_env(vllm_workspace, "0"), ["--headless", "--data-parallel-start-rank", "2"]),
    ]  # fmt: skip
    procs = {}
    for index, (env, args) in enumerate(nodes):
        log = tmp / f"node{index}.log"
        procs[log] = launch_serve(model, env, log, [*common, *args])
    cluster = Cluster(port, model, procs, {"trace": trace})  # launched; ``three_nodes`` waits until it serves
    try:
        yield cluster
    finally:
        cluster.stop()


def test_multi_node_patched_nodes_apply_everywhere_and_the_unpatched_node_is_named(three_nodes: Cluster) -> None:
    for i in range(6):
        _complete(three_nodes, f"request {i}")
    report = _status(three_nodes)
    cores, workers = _by_role(report, "engine_core"), _by_role(report, "worker")
    assert [c["dp_rank"] for c in cores] == [0, 1, 2] and [w["dp_rank"] for w in workers] == [0, 1, 2]
    for core in cores:
        assert f"EngineCore_DP{core['dp_rank']}" in _title(core["pid"])
    assert [c["applied"] for c in cores] == [["scheduler_trace"], ["scheduler_trace"], []]
    assert cores[2]["selection"] == "" and cores[2]["patches"] == []
    # Both patched nodes ran the patch in their engine cores (the trace is written from inside them).
    traced = {json.loads(line)["pid"] for line in three_nodes.files["trace"].read_text().splitlines()}
    assert traced == {cores[0]["pid"], cores[1]["pid"]}
    # ... and the node started without VLLM_CUSTOM_PATCHES is not silent:
    assert report["consistent"] is False
    (issue,) = report["inconsistencies"]
    assert (issue["role"], issue["patch"], issue["applied_in"]) == ("engine_core", "scheduler_trace", 2)
    (missing,) = issue["missing_in"]
    assert missing["dp_rank"] == 2 and missing["pid"] == cores[2]["pid"] and missing["host"]
    assert missing["why"] == "VLLM_CUSTOM_PATCHES is not set in this process"

    result = _run_cli("status", "--url", three_nodes.url, "--api-key", API_KEY)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"but not in engine_core dp_rank=2 pid={cores[2]['pid']} on {missing['host']}" in result.stdout

    from prometheus_client.parser import text_string_to_metric_families

    families = {
        f.name: f for f in text_string_to_metric_families(_get(f"{three_nodes.url}/metrics", key=None)[1].decode())
    }
    values = {(s.labels["role"], s.labels["dp_rank"]): s.value for s in families["vllm_custom_patches_applied"].samples
              if s.labels["patch"] == "scheduler_trace"}  # fmt: skip
    assert (values[("engine_core", "0")], values[("engine_core", "1")], values[("engine_core", "2")]) == (1.0, 1.0, 0.0)
    assert [s.value for s in families["vllm_custom_patches_consistent"].samples] == [0.0]


def test_without_a_control_token_the_kill_switch_does_not_exist(three_nodes: Cluster) -> None:
    assert _post(f"{three_nodes.url}/custom_patches/scheduler_trace/rollback", "x" * 20)[0] == 404
    result = _run_cli("rollback", "scheduler_trace", "--url", three_nodes.url, "--token", "x" * 20)
    assert result.returncode == 2 and "VLLM_CUSTOM_PATCHES_CONTROL_TOKEN" in result.stderr
    assert [c["applied"] for c in _by_role(_status(three_nodes), "engine_core")][:2] == [["scheduler_trace"]] * 2


# -- a patch that fails in one tensor-parallel rank only ----------------------------------


def _tp2_env(workspace: Any, tmp: Path, **extra: str) -> dict[str, str]:
    return _cpu_env(
        workspace, "0|1",
        VLLM_PLUGINS="custom_patches",
        VLLM_CUSTOM_PATCHES="RankWitness",
        VLLM_CUSTOM_PATCHES_PATH=str(write_rank_witness(tmp / "patches")),
        VCP_RANK_WITNESS_FILE=str(tmp / "ranks.jsonl"),
        VCP_BREAK_IN_PROCESS="VllmWorker-1",
        **extra,
    )  # fmt: skip


def test_strict_a_patch_failing_in_rank_1_only_stops_the_server_naming_that_rank(
    vllm_workspace: Any, tmp_path: Path, tp2_lenient_launched: Cluster
) -> None:
    # tp2_lenient_launched: the next tests' server starts up meanwhile.
    log = tmp_path / "server.log"
    port = free_port()
    proc = launch_serve(str(vllm_workspace.model), _tp2_env(vllm_workspace, tmp_path),
                        log, ["--host", "127.0.0.1", "--port", str(port), "--tensor-parallel-size", "2"])  # fmt: skip
    try:
        proc.wait(timeout=600)  # it stops as soon as rank 1 starts; the bound only guards against a hang
    except subprocess.TimeoutExpired:
        _stop_group(proc)
        pytest.fail(f"the server kept running with a patch failed in rank 1:\n{tail(log)}")
    finally:
        _stop_group(proc)
    assert proc.returncode != 0
    text = log.read_text(errors="replace")
    assert "cannot be honoured in process" in text and "(VllmWorker-1):" in text, tail(log)
    assert "PatchConflictError" in text and "_original_execute_model" in text
    assert "(VllmWorker-0):" not in text  # rank 0 took the patch


@pytest.fixture(scope="module")
def tp2_lenient(tp2_lenient_launched: Cluster) -> Cluster:
    return _ready(tp2_lenient_launched, "tensor parallel 2")


@pytest.fixture(scope="module")
def tp2_lenient_launched(vllm_workspace: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("tp2")
    port = free_port()
    env = _tp2_env(vllm_workspace, tmp, VLLM_CUSTOM_PATCHES_STRICT="0")
    log = tmp / "server.log"
    proc = launch_serve(str(vllm_workspace.model), env, log,
                        ["--host", "127.0.0.1", "--port", str(port), "--tensor-parallel-size", "2", "--api-key", API_KEY])  # fmt: skip
    cluster = Cluster(port, str(vllm_workspace.model), {log: proc}, {"witness": tmp / "ranks.jsonl"})
    try:
        yield cluster
    finally:
        cluster.stop()


def test_lenient_the_server_serves_and_the_status_shows_which_rank_lacks_the_patch(tp2_lenient: Cluster) -> None:
    _complete(tp2_lenient, "served without the patch in rank 1")
    report = _status(tp2_lenient)
    workers = _by_role(report, "worker")
    assert [(w["dp_rank"], w["tp_rank"]) for w in workers] == [(0, 0), (0, 1)]
    assert [w["applied"] for w in workers] == [["RankWitness"], []]
    (failed,) = [p for p in workers[1]["patches"] if p["name"] == "RankWitness"]
    assert failed["state"] == "failed" and "_original_execute_model" in failed["reason"]
    assert report["consistent"] is False
    (issue,) = report["inconsistencies"]
    (missing,) = issue["missing_in"]
    assert (issue["role"], missing["tp_rank"], missing["pid"]) == ("worker", 1, workers[1]["pid"])
    assert missing["why"].startswith("failed: ")
    # Rank 0 ran the patched code, rank 1 did not.
    witnessed = {json.loads(line)["pid"] for line in tp2_lenient.files["witness"].read_text().splitlines()}
    assert witnessed == {workers[0]["pid"]}
    result = _run_cli("status", "--url", tp2_lenient.url, "--api-key", API_KEY)
    assert result.returncode == 1 and "worker dp_rank=0 tp_rank=1" in result.stdout, result.stdout + result.stderr
