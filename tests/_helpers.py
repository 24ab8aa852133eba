"""Shared helpers for the plugin tests: throw-away distributions, isolation, log capture.

The distributions are built and installed for real (``pip install --target``
into a temporary directory, put on ``sys.path`` by the tests that need it), so
discovery reads genuine ``entry_points.txt`` metadata, as it would for a
patch package installed next to vLLM.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

from vllm_custom_patches import plugin
from vllm_custom_patches.testing import isolated_registry

# -- the throw-away distributions ---------------------------------------------

TESTDIST_PACKAGES = ("vcp_testdist", "vcp_brokendist")
"""Top-level packages the two distributions install."""

_TESTDIST = {
    "pyproject.toml": """
        [build-system]
        requires = ["setuptools>=61"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "vcp-testdist"
        version = "0.0.1"

        [tool.setuptools]
        packages = ["vcp_testdist"]

        [project.entry-points.vllm_custom_patches]
        vcp_good = "vcp_testdist.good:GoodPatch"
        vcp_second = "vcp_testdist.second:SecondPatch"
        vcp_misnamed = "vcp_testdist.misnamed:Misnamed"
        vcp_not_a_patch = "vcp_testdist.notpatch:helper"
    """,
    "vcp_testdist/__init__.py": "",
    "vcp_testdist/target.py": '''
        """Stands in for a vLLM module: patch modules name it as a string target."""


        class Engine:
            def step(self):
                return "original"


        class Spare:
            def value(self):
                return 1
    ''',
    "vcp_testdist/notpatch.py": """
        def helper():
            return None
    """,
    "vcp_testdist/good.py": '''
        from vllm_custom_patches import VLLMPatch


        class GoodPatch(VLLMPatch["vcp_testdist.target:Engine"]):
            """Prefixes Engine.step's result."""

            name = "vcp_good"

            def step(self):
                return "patched:" + self._original_step()
    ''',
    "vcp_testdist/second.py": """
        from vllm_custom_patches import VLLMPatch


        class SecondPatch(VLLMPatch["vcp_testdist.target:Engine"]):
            name = "vcp_second"

            def describe(self):
                return "engine"
    """,
    "vcp_testdist/misnamed.py": """
        from vllm_custom_patches import VLLMPatch


        class Misnamed(VLLMPatch["vcp_testdist.target:Spare"]):
            name = "vcp_other_name"

            def value(self):
                return 2
    """,
}

_BROKENDIST = {
    "pyproject.toml": """
        [build-system]
        requires = ["setuptools>=61"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "vcp-brokendist"
        version = "0.0.1"

        [tool.setuptools]
        packages = ["vcp_brokendist"]

        [project.entry-points.vllm_custom_patches]
        vcp_broken = "vcp_brokendist.broken:BrokenPatch"
    """,
    "vcp_brokendist/__init__.py": "",
    "vcp_brokendist/broken.py": """
        raise RuntimeError("vcp_brokendist.broken is broken on purpose")
    """,
}


@functools.cache
def installed_dists() -> Path:
    """A directory holding both distributions, installed by pip; built once per test session."""
    root = Path(tempfile.mkdtemp(prefix="vcp-testdists-"))
    atexit.register(shutil.rmtree, root, True)
    projects = []
    for project, files in (("vcp-testdist", _TESTDIST), ("vcp-brokendist", _BROKENDIST)):
        for relative, text in files.items():
            path = root / "src" / project / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(textwrap.dedent(text).lstrip())
        projects.append(str(root / "src" / project))
    site = root / "site"
    command = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-input", "--disable-pip-version-check"]
    command += ["--target", str(site)]
    if _can_build_offline():
        command.append("--no-build-isolation")
    # Otherwise pip fetches setuptools from the package index into an
    # isolated build environment (this one cannot build wheels by itself).
    proc = subprocess.run([*command, *projects], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"installing the test distributions failed:\n{proc.stdout}\n{proc.stderr}")
    return site


def _can_build_offline() -> bool:
    # setuptools builds wheels without the separate 'wheel' package from 70.1 on.
    if importlib.util.find_spec("setuptools") is None:
        return False
    if importlib.util.find_spec("wheel") is not None:
        return True
    from importlib.metadata import version

    from packaging.version import Version

    return Version(version("setuptools")) >= Version("70.1")


@contextlib.contextmanager
def on_sys_path(directory: Path) -> Iterator[None]:
    """``directory`` first on ``sys.path`` (so its distributions are installed), and gone after."""
    entry = str(directory)
    sys.path.insert(0, entry)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(entry)
        forget_modules(*TESTDIST_PACKAGES)


def forget_modules(*packages: str) -> None:
    """Drop ``packages`` and their submodules from ``sys.modules``."""
    for name in list(sys.modules):
        if name.split(".")[0] in packages:
            del sys.modules[name]


# -- isolation ------------------------------------------------------------------


@contextlib.contextmanager
def fresh_plugin() -> Iterator[None]:
    """Run a test as in a fresh process: plugin not yet registered, registry restored after.

    Patches applied inside are rolled back, patches registered inside are
    forgotten, the import hooks left by ``register()`` are silenced and the
    modules loaded from ``VLLM_CUSTOM_PATCHES_PATH`` are dropped.
    """
    plugin._reset_for_tests()
    try:
        with isolated_registry():
            yield
    finally:
        plugin._reset_for_tests()
        forget_modules("vllm_custom_patches_path")


# -- logs -------------------------------------------------------------------------


class LogLines(logging.Handler):
    """Collects the framework's log lines, whatever vLLM did to logging."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self, level: int = logging.DEBUG) -> list[str]:
        return [record.getMessage() for record in self.records if record.levelno >= level]


@contextlib.contextmanager
def captured_logs() -> Iterator[LogLines]:
    # Attached to the framework's logger itself: pytest's caplog sits on the
    # root logger, which vLLM (if imported by another test) cuts off.
    target = logging.getLogger("vllm.custom_patches")
    handler = LogLines()
    old_level = target.level
    target.addHandler(handler)
    target.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        target.removeHandler(handler)
        target.setLevel(old_level)


def clean_env(monkeypatch: object, **values: str) -> None:
    """Unset every VLLM_CUSTOM_PATCHES* variable, then set ``values``."""
    for name in list(os.environ):
        if name.startswith("VLLM_CUSTOM_PATCHES"):
            monkeypatch.delenv(name)  # type: ignore[attr-defined]
    for name, value in values.items():
        monkeypatch.setenv(name, value)  # type: ignore[attr-defined]
