"""Work a test module starts ahead of its tests, in one background lane, while the other modules' tests run.

The machine has 2 cores, and most real-vLLM work keeps one of them busy at a
time: an engine or a server starts one process after another, each mostly
importing vLLM.  So the long subprocess runs whose results some tests only
read (the demo, the example package's own test suite, engines that must fail
or carry on, the plugin-loading children) are *jobs*: from the start of the
test loop they run in a background thread, one after another, in the order
of their tests, while the foreground runs the other modules on the other
core.  ``conftest`` puts the modules that use jobs last, so their tests find
the results ready (or wait for them).  A job's test passes or fails on its
own result as before: only the time it ran at moves.

Rules for a job: it starts subprocesses only (never vLLM, patches or the
patch registry in this process: those belong to the foreground tests), it
builds their environment from :data:`SESSION_ENV` (the foreground may be
inside a test that changed ``os.environ``), and it registers each process it
starts (:meth:`JobContext.track`), so that the end of the session stops what
a job left running.  A job selected alone (``-k``) still runs: in the lane as
the loop starts, or in the test that asks for it first.

A module declares a job with :func:`early_fixture`: a fixture of the
function's name whose value is the job's result (the job's exception,
re-raised, if it failed).
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Generic, TypeVar

import pytest
from _engine import _stop_group

__all__ = ["SESSION_ENV", "JobContext", "early_fixture", "is_job", "plan", "planned", "report", "start", "stop"]

T = TypeVar("T")

SESSION_ENV: Mapping[str, str] = dict(os.environ)
"""The environment as the session started (this module is imported while tests are collected, before any runs)."""

HANG_GUARD_S = 1800.0
"""How long a test waits for its job at most: far longer than any job takes, only against a hang."""


class JobContext:
    """What a job gets: the session's vLLM workspace, the session's environment, and a register of its processes."""

    def __init__(self, job: Job[Any], workspace: Any) -> None:
        self._job = job
        self.workspace = workspace
        """conftest's ``VllmWorkspace`` (the tiny model, the short socket directory)."""

    def env(self, **extra: str) -> dict[str, str]:
        """``workspace.env(**extra)`` built from :data:`SESSION_ENV`, not from ``os.environ`` as it is now."""
        env: dict[str, str] = self.workspace.env(base=SESSION_ENV, **extra)
        return env

    def track(self, proc: subprocess.Popen[Any]) -> subprocess.Popen[Any]:
        """Register a process (started in its own session) that the session's end must stop if it still runs."""
        self._job.procs.append(proc)
        return proc

    def run(
        self, cmd: Sequence[str], *, env: Mapping[str, str], timeout: float, cwd: Any = None
    ) -> subprocess.CompletedProcess[str]:
        """``subprocess.run(cmd, capture_output=True, text=True)`` in its own session, tracked; stopped on time-out."""
        popen = subprocess.Popen(
            list(cmd), env=dict(env), cwd=cwd, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
        )  # fmt: skip
        proc = self.track(popen)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop_group(proc)
            out, err = proc.communicate()
            raise AssertionError(
                f"{' '.join(cmd[:4])} ... did not finish within {timeout:.0f} s:\n{out[-3000:]}{err[-3000:]}"
            ) from None
        return subprocess.CompletedProcess(list(cmd), proc.returncode, out, err)


class Job(Generic[T]):
    """One job: run once, by the lane or by the first test that needs it, whichever comes first."""

    def __init__(self, name: str, work: Callable[[JobContext], T]) -> None:
        self.name = name
        self._work = work
        self._claim = threading.Lock()
        self._claimed = False
        self._done = threading.Event()
        self._value: T | None = None
        self._error: BaseException | None = None
        self.procs: list[subprocess.Popen[Any]] = []
        self.started_at: float | None = None
        self.elapsed_s: float | None = None
        self.where = ""

    def claim(self) -> bool:
        with self._claim:
            if self._claimed:
                return False
            self._claimed = True
            return True

    def execute(self, workspace: Any, where: str) -> None:
        """Run the job here (the caller has claimed it)."""
        self.where, self.started_at = where, time.monotonic()
        try:
            self._value = self._work(JobContext(self, workspace))
        except BaseException as exc:  # the test that reads the result raises it
            self._error = exc
        finally:
            self.elapsed_s = time.monotonic() - self.started_at
            self._done.set()

    def result(self, workspace: Any) -> T:
        if self.claim():  # not started by the lane (it was not planned, or stopped): run it now
            self.execute(workspace, "in its test")
        if not self._done.wait(HANG_GUARD_S):
            raise AssertionError(f"job {self.name!r} did not finish within {HANG_GUARD_S:.0f} s")
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]

    def stop(self) -> None:
        for proc in self.procs:
            _stop_group(proc)


_JOBS: dict[str, Job[Any]] = {}
_planned: list[Job[Any]] = []
_lane: threading.Thread | None = None
_stopping = threading.Event()
_lane_started_at = 0.0


def early_fixture(work: Callable[[JobContext], T]) -> Any:
    """Make ``work`` a job, and a fixture of its name whose value is the job's result."""
    name = work.__name__
    if name in _JOBS:
        raise ValueError(f"two jobs named {name!r}: a job's name is its fixture's, unique in tests/real_vllm")
    job: Job[T] = Job(name, work)
    _JOBS[name] = job

    @pytest.fixture(name=name)
    def fixture(vllm_workspace: Any) -> T:
        return job.result(vllm_workspace)

    fixture.__doc__ = work.__doc__
    return fixture


def is_job(fixture_name: str) -> bool:
    return fixture_name in _JOBS


def plan(fixture_names: Iterable[str]) -> None:
    """The jobs the selected tests use, in the order their first test comes."""
    _planned.clear()
    for name in fixture_names:
        job = _JOBS.get(name)
        if job is not None and job not in _planned:
            _planned.append(job)


def planned() -> bool:
    return bool(_planned)


def start(workspace: Callable[[], Any]) -> None:
    """Run the planned jobs one after another in a background thread."""
    global _lane, _lane_started_at
    if not _planned or _lane is not None:
        return
    _stopping.clear()
    _lane_started_at = time.monotonic()

    def lane() -> None:
        for job in _planned:
            if _stopping.is_set():
                return
            if job.claim():
                job.execute(workspace(), "in the background")

    _lane = threading.Thread(target=lane, name="early jobs", daemon=True)
    _lane.start()


def stop() -> None:
    """At the session's end: start no further job, stop the processes the jobs left."""
    global _lane
    _stopping.set()
    for job in _JOBS.values():
        job.stop()
    if _lane is not None:
        _lane.join(timeout=60)
        _lane = None


def report() -> list[str]:
    """One line per job that ran: where, when it started (from the start of the lane) and how long it took."""
    lines = []
    for job in _JOBS.values():
        if job.started_at is None:
            continue
        took = f"{job.elapsed_s:.1f} s" if job.elapsed_s is not None else "unfinished"
        when = f"+{job.started_at - _lane_started_at:.0f} s" if _lane_started_at else "-"
        lines.append(f"{job.name}: {took} {job.where} (started at {when})")
    return lines
