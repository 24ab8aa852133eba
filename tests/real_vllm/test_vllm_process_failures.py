"""A patch that fails in one process of a real multiprocess vLLM engine (slow: two engine starts).

Which process imports the scheduler module (checked with vLLM 0.32 on the
tiny model, and asserted again below): only ``VLLM::EngineCore``.
``EngineCore.__init__`` resolves the scheduler class
(``SchedulerConfig.get_scheduler_cls()`` -> ``import
vllm.v1.core.sched.scheduler``) after it has started the executor, so its
``VLLM::Worker`` is already running; the main process (``vllm.LLM``) and
the worker never import that module.

So a patch on the string target ``vllm.v1.core.sched.scheduler:Scheduler`` is
*pending* in all three processes, and only the EngineCore ever applies it.
The broken patch below has an ``@override`` member that ``Scheduler`` lacks:
applying it raises ``PatchTargetError`` there, and only there.  A second,
good patch in the same file overrides ``schedule`` and, on its first call,
writes down which process it runs in and what the manager reports there, which
shows the EngineCore carried on (non-strict) with the broken patch not applied.

* strict (the default): the import raises inside the EngineCore, vLLM logs
  "EngineCore failed to start." with our error from the EngineCore's pid, and
  ``vllm.LLM(...)`` raises in the parent, which exits non-zero in bounded time;
* ``VLLM_CUSTOM_PATCHES_STRICT=0``: the engine starts and serves a request;
  the EngineCore logs that it runs without the broken patch, and why.
"""

from __future__ import annotations

import json
import os
import re
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from _early import JobContext, early_fixture
from _engine import Child, ChildFailed, start_child, write_patch_file

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

BROKEN = "broken_on_engine_core"
PROBE = "probe_schedule"
MISSING_MEMBER = "schedule_everything_at_once"
SELECTION = f"{BROKEN},{PROBE}"
ENV_PROBE = "VLLM_CUSTOM_PATCHES_TEST_PROBE_FILE"

PATCH_FILE = textwrap.dedent(
    f'''
    """Patches for test_vllm_process_failures: one that fails where it is applied, one probe."""

    import json
    import os
    import sys

    from vllm_custom_patches import PatchManager, VLLMPatch

    if sys.version_info >= (3, 12):
        from typing import override
    else:
        from typing_extensions import override


    class BrokenOnEngineCore(VLLMPatch["vllm.v1.core.sched.scheduler:Scheduler"]):
        """Fine to define and select anywhere; fails when applied, i.e. where the scheduler is imported."""

        name = "{BROKEN}"

        def schedule(self, *args, **kwargs):
            return self._original_schedule(*args, **kwargs)

        @override
        def {MISSING_MEMBER}(self):  # Scheduler has no such member
            raise AssertionError("never called")


    class ProbeSchedule(VLLMPatch["vllm.v1.core.sched.scheduler:Scheduler"]):
        """Pass-through ``schedule`` that records, once, where it runs and what the manager says there."""

        name = "{PROBE}"

        def schedule(self, *args, **kwargs):
            cls = type(self)
            path = os.environ.get("{ENV_PROBE}")
            if path and not cls.__dict__.get("_probe_written", False):
                cls._probe_written = True
                record = {{
                    "pid": os.getpid(),
                    "class": cls.__qualname__,
                    "has_missing_member": hasattr(cls, "{MISSING_MEMBER}"),
                    "schedule_from": cls.__dict__["schedule"].__qualname__,
                    "status": {{s.name: [s.state.value, s.reason] for s in PatchManager.status()}},
                }}
                with open(path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\\n")
            return self._original_schedule(*args, **kwargs)
    '''
).lstrip()

#: vLLM 0.32 prefixes each log line of a process with its name and pid, e.g.
#: ``(EngineCore pid=123) ERROR 11-22 20:32:29 [core.py:1510] ...``.
LINE = re.compile(r"^\((?P<proc>[\w-]+) pid=(?P<pid>\d+)\) (?P<level>[A-Z]+) [\d-]+ [\d:]+ \[[^\]]+\] (?P<text>.*)$")

SPEC_REQUESTS = [{"id": "r0", "len": 5, "max_tokens": 4}, {"id": "r1", "len": 9, "max_tokens": 4}]


def _engine_env(job: JobContext, workdir: Path, **extra: str) -> dict[str, str]:
    patch_dir = write_patch_file(workdir / "patches", "engine_core_only.py", PATCH_FILE)
    env = job.env(
        VLLM_CUSTOM_PATCHES=SELECTION,
        VLLM_CUSTOM_PATCHES_PATH=str(patch_dir),
        **{ENV_PROBE: str(workdir / "probe.jsonl")},
        **extra,
    )
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # vLLM's default: EngineCore and worker processes
    (workdir / "probe.jsonl").unlink(missing_ok=True)
    return env


def _lines(log: Path) -> list[dict[str, Any]]:
    """The log lines vLLM's formatter wrote, with process name, pid, level and text."""
    out = []
    for raw in log.read_text(errors="replace").splitlines():
        match = LINE.match(raw)
        if match:
            out.append({**match.groupdict(), "pid": int(match["pid"])})
    return out


def _summaries(lines: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """pid -> the plugin's one summary line of that process."""
    found = {}
    for line in lines:
        match = re.match(r"vllm-custom-patches \[pid (\d+)\]: applied: ", line["text"])
        if match:
            assert int(match[1]) == line["pid"], line
            found[line["pid"]] = line
    return found


def _session_processes(sid: int) -> list[str]:
    import psutil

    left = []
    for proc in psutil.process_iter(["pid", "name"]):
        try:
            if proc.pid != os.getpid() and os.getsid(proc.pid) == sid:
                left.append(f"{proc.pid} {proc.info['name']}")
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return left


def _assert_only_engine_core_applies(lines: list[dict[str, Any]], main_pid: int) -> int:
    """Every process selects both patches as pending; only the EngineCore imports the scheduler.

    Returns the EngineCore's pid.
    """
    summaries = _summaries(lines)
    by_proc = {line["proc"]: pid for pid, line in summaries.items()}
    assert set(by_proc) == {"MainProcess", "EngineCore", "VllmWorker-0"}, summaries
    assert by_proc["MainProcess"] == main_pid
    engine_core = by_proc["EngineCore"]
    assert len({main_pid, engine_core, by_proc["VllmWorker-0"]}) == 3
    for line in summaries.values():
        assert line["level"] == "INFO"
        assert f"pending: {BROKEN} (waiting for import of vllm.v1.core.sched.scheduler), " in line["text"]
        assert line["text"].endswith("skipped: none; failed: none"), line
    on_import = [line for line in lines if "on import of vllm.v1.core.sched.scheduler" in line["text"]]
    assert on_import, "no pending patch was applied anywhere"
    assert {(line["proc"], line["pid"]) for line in on_import} == {("EngineCore", engine_core)}, on_import
    return engine_core


@early_fixture
def strict_engine_run(job: JobContext) -> dict[str, Any]:
    """The strict engine, started until it fails: its child, how it failed, and what of its session outlived it."""
    workdir = job.workspace.dir("process-failure-strict")
    env = _engine_env(job, workdir)
    spec = {"model": str(job.workspace.model), "phases": [{"name": "never", "requests": SPEC_REQUESTS}]}
    child: Child = start_child("engine", spec, env, workdir)
    job.track(child.proc)
    try:
        child.result(timeout=600)  # on timeout it stops the child's session and says "timed out"
        failure = None
    except ChildFailed as exc:
        failure = str(exc)
    # Nothing the child started may outlive it: measured as it ends (a guard against a hang: they go within seconds).
    deadline = time.monotonic() + 60
    while (left := _session_processes(child.proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return {"child": child, "workdir": workdir, "failure": failure, "left": left}


def test_strict_a_patch_failing_in_the_engine_core_fails_engine_start_up(strict_engine_run: dict[str, Any]) -> None:
    child, workdir = strict_engine_run["child"], strict_engine_run["workdir"]
    failure = strict_engine_run["failure"]
    assert failure is not None, "the engine started, with a patch failing in its EngineCore"
    assert "timed out" not in failure, failure
    assert child.proc.returncode not in (0, None)
    assert not (workdir / "result.json").exists()
    text = child.log.read_text(errors="replace")
    lines = _lines(child.log)
    engine_core = _assert_only_engine_core_applies(lines, child.proc.pid)

    # The error, logged by vLLM from the EngineCore (not the parent), names the patch and the member.
    header = (
        f"vllm_custom_patches._core.errors.PatchTargetError: vllm-custom-patches: "
        f"VLLM_CUSTOM_PATCHES='{SELECTION}' cannot be honoured in process {engine_core} (EngineCore):"
    )
    reason = (
        f"  - {BROKEN}: patch '{BROKEN}': '{MISSING_MEMBER}' is marked @override but Scheduler "
        f"has no member '{MISSING_MEMBER}'"
    )
    errors = [line for line in lines if line["level"] == "ERROR"]
    assert any(line["text"] == "EngineCore failed to start." and line["pid"] == engine_core for line in errors)
    at = next(i for i, line in enumerate(errors) if line["text"] == header)
    assert (errors[at]["proc"], errors[at]["pid"]) == ("EngineCore", engine_core)
    assert errors[at + 1]["pid"] == engine_core and errors[at + 1]["text"].startswith(reason), errors[at + 1]
    assert not [line for line in lines if "cannot be honoured" in line["text"] and line["pid"] != engine_core]
    # The parent gave up on the engine, with vLLM's own error pointing at the cause above.
    assert "RuntimeError: Engine core initialization failed. See root cause above." in text
    # Nothing was served, and nothing the child started outlived it.
    assert not (workdir / "probe.jsonl").exists()
    assert not strict_engine_run["left"], f"processes of the failed engine still running: {strict_engine_run['left']}"


@early_fixture
def lenient_engine_run(job: JobContext) -> dict[str, Any]:
    """The engine with ``VLLM_CUSTOM_PATCHES_STRICT=0``, run to the end of its requests; its child's result."""
    workdir = job.workspace.dir("process-failure-lax")
    env = _engine_env(job, workdir, VLLM_CUSTOM_PATCHES_STRICT="0")
    spec = {"model": str(job.workspace.model), "phases": [{"name": "served", "requests": SPEC_REQUESTS}]}
    child = start_child("engine", spec, env, workdir)
    job.track(child.proc)
    return {**child.result(timeout=600), "workdir": str(workdir)}


def test_non_strict_the_engine_serves_and_the_engine_core_logs_the_failed_patch(
    lenient_engine_run: dict[str, Any],
) -> None:
    result, workdir = lenient_engine_run, Path(lenient_engine_run["workdir"])
    # Served normally.
    served = result["phases"]["served"]
    assert sorted(served["finished"]) == ["r0", "r1"]
    assert [len(served["outputs"][rid]) for rid in ("r0", "r1")] == [4, 4]
    assert all(0 <= token < 1000 for rid in ("r0", "r1") for token in served["outputs"][rid])
    # The main process never imported the scheduler: both patches are still pending there.
    assert {name: s["state"] for name, s in result["status"].items() if name in (BROKEN, PROBE)} == {
        BROKEN: "pending",
        PROBE: "pending",
    }

    lines = _lines(Path(result["log"]))
    engine_core = _assert_only_engine_core_applies(lines, result["pid"])
    assert [p["pid"] for p in result["processes"] if p["name"] == "VLLM::EngineCore"] == [engine_core]

    # Logged loudly (vllm-custom-patches logs it at ERROR level) by the EngineCore, with the reason.
    expected = (
        f"vllm-custom-patches [pid {engine_core}]: VLLM_CUSTOM_PATCHES_STRICT=0: running without patch "
        f"'{BROKEN}': patch '{BROKEN}': '{MISSING_MEMBER}' is marked @override but Scheduler has no "
        f"member '{MISSING_MEMBER}'"
    )
    failures = [line for line in lines if "running without patch" in line["text"]]
    assert len(failures) == 1, failures
    assert failures[0]["proc"] == "EngineCore" and failures[0]["pid"] == engine_core
    assert failures[0]["level"] in ("WARNING", "ERROR")
    assert failures[0]["text"].startswith(expected), failures[0]
    assert not [line for line in lines if "cannot be honoured" in line["text"]]

    # The EngineCore carried on: the good patch ran its schedule() there, and the broken one left
    # Scheduler untouched (no member added; schedule is the probe's graft over vLLM's own).
    probes = [json.loads(line) for line in (workdir / "probe.jsonl").read_text().splitlines()]
    assert len(probes) == 1, probes
    probe = probes[0]
    assert probe["pid"] == engine_core
    assert probe["class"] == "Scheduler"
    assert probe["has_missing_member"] is False
    assert probe["schedule_from"] == "ProbeSchedule.schedule"
    assert probe["status"][PROBE] == ["applied", ""]
    state, reason = probe["status"][BROKEN]
    assert state == "failed"
    assert f"'{MISSING_MEMBER}' is marked @override but Scheduler has no member" in reason
