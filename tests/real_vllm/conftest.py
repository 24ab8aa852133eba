"""Fixtures for the tests that run real vLLM (the CPU build CI installs).

vLLM missing is a failure, not a skip: CI installs it (``make test`` depends on
``make vllm``), so a broken install must not turn into a green run.  A
developer without vLLM sets ``VCP_SKIP_VLLM=1`` to skip these tests; ``-m "not
slow"`` leaves out the ones that start engines and servers.

The order of the modules, and the work that starts ahead of its tests, are
about the 2 cores of the machine CI runs on: see :data:`SEVERAL_AT_ONCE` and
``_early.py``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import _early
import pytest

SKIP_ENV = "VCP_SKIP_VLLM"


def _vllm_missing() -> str | None:
    try:
        spec = importlib.util.find_spec("vllm")
    except (ImportError, ValueError) as exc:
        return f"vLLM cannot be found: {exc}"
    # A directory named vllm on sys.path without __init__.py is a namespace
    # package, not vLLM.
    if spec is None or spec.origin is None or spec.loader is None:
        return "vLLM is not installed"
    return None


def _check_vllm() -> None:
    missing = _vllm_missing()
    if missing is None:
        return
    if os.environ.get(SKIP_ENV, "").strip() == "1":
        pytest.skip(f"{missing}; skipped because {SKIP_ENV}=1")
    pytest.fail(
        f"{missing}, and these tests need it: run 'make vllm' (scripts/install-vllm.sh .venv), "
        f"or set {SKIP_ENV}=1 to skip the real-vLLM tests.",
        pytrace=False,
    )


@pytest.fixture(autouse=True)
def _require_vllm() -> None:
    _check_vllm()


@dataclass(frozen=True)
class VllmWorkspace:
    root: Path
    """A short path (vLLM puts Unix sockets under VLLM_RPC_BASE_PATH; keep it under ~70 chars)."""
    model: Path
    """The tiny model, with its offline tokenizer."""

    def env(self, base: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
        """An environment for a process that starts vLLM: no patch selected unless ``extra`` says so.

        Built on ``base`` (default: ``os.environ`` as it is now).
        """
        from _engine import clean_env

        from vllm_custom_patches.testing import ENGINE_ENV

        return clean_env(
            os.environ if base is None else base,
            {
                **ENGINE_ENV,
                "VLLM_CACHE_ROOT": str(self.root / "cache"),
                "VLLM_RPC_BASE_PATH": str(self.root / "rpc"),
                "VLLM_NO_USAGE_STATS": "1",
                "VLLM_DO_NOT_TRACK": "1",
                "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false",
                **extra,
            },
        )

    def dir(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path


_workspace: VllmWorkspace | None = None
_workspace_lock = threading.Lock()


def _session_workspace() -> VllmWorkspace:
    """The session's workspace, made at its first use (by a test, or by the background lane's first job)."""
    global _workspace
    with _workspace_lock:
        if _workspace is None:
            from vllm_custom_patches.testing import write_tiny_model

            root = Path(tempfile.mkdtemp(prefix="vcp-"))
            (root / "rpc").mkdir()
            _workspace = VllmWorkspace(root=root, model=write_tiny_model(root / "model", tokenizer=True))
        return _workspace


@pytest.fixture(scope="session")
def vllm_workspace() -> VllmWorkspace:
    _check_vllm()
    return _session_workspace()


# -- order and early work ---------------------------------------------------------------

SEVERAL_AT_ONCE = ("test_vllm_control.py", "test_vllm_fleet.py")
"""Modules that keep both cores busy by themselves (servers of several processes started together).

The others, apart from those using early jobs, mostly run one vLLM process at a
time: they come first, while the background lane (``_early``) runs the jobs on
the other core; these come next; the modules whose tests read a job's result
come last, when their jobs are done.  Each module's tests stay together, in
their order (module-scoped servers start once).
"""


@pytest.hookimpl(trylast=True)  # after tests/conftest.py's sort: the unit tests stay first
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def real_vllm(item: pytest.Item) -> bool:
        return "real_vllm" in item.path.parts

    with_jobs = {item.path for item in items if real_vllm(item) and any(map(_early.is_job, item.fixturenames))}

    def rank(item: pytest.Item) -> tuple[int, int]:
        if not real_vllm(item):
            return 0, 0
        return 1, 2 if item.path in with_jobs else 1 if item.path.name in SEVERAL_AT_ONCE else 0

    items.sort(key=rank)
    _early.plan(name for item in items for name in item.fixturenames)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtestloop(session: pytest.Session) -> Iterator[None]:
    if not session.config.option.collectonly and _vllm_missing() is None and _early.planned():
        workspace = _session_workspace()  # here, before any test can change os.environ (tempfile reads TMPDIR)
        _early.start(lambda: workspace)
    try:
        yield
    finally:
        _early.stop()


def pytest_sessionfinish() -> None:
    global _workspace
    _early.stop()
    if _workspace is not None:
        shutil.rmtree(_workspace.root, ignore_errors=True)
        _workspace = None


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    lines = _early.report()
    if lines:
        terminalreporter.write_sep("-", "real-vLLM jobs run ahead of their tests")
        for line in lines:
            terminalreporter.write_line(line)
