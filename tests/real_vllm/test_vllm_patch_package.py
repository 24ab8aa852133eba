"""The example third-party patch package (examples/patch-package/), installed next to this one.

``make test`` installs it into the venv (``pip install -e examples/patch-package``).
These tests check what a user of such a package relies on: its entry point is
seen in the group ``vllm_custom_patches``, ``vllm-custom-patches list`` shows
the patch as coming from that distribution, and the package's own test-suite,
written with the testing kit only, passes against the installed real vLLM.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _early import JobContext, early_fixture
from _inprocess import run_cli
from conftest import VllmWorkspace

pytestmark = pytest.mark.vllm

ROOT = Path(__file__).resolve().parents[2]
PACKAGE_DIR = ROOT / "examples" / "patch-package"
DISTRIBUTION = "vllm-patches-example"
PATCH = "lifo_admission"
ENTRY_POINT = "vllm_patches_example.lifo_admission:LifoAdmission"
PACKAGE_TESTS = 6
"""How many tests examples/patch-package/tests holds (all of them pass)."""


@pytest.fixture(autouse=True)
def _require_the_package() -> None:
    # Missing is a failure, as for vLLM itself: make test installs it.
    if importlib.util.find_spec("vllm_patches_example") is None:
        pytest.fail(
            f"{DISTRIBUTION} is not installed in this environment: run 'make test' (which installs it), "
            f"or '{sys.executable} -m pip install -e {PACKAGE_DIR.relative_to(ROOT)} --no-deps'.",
            pytrace=False,
        )


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_the_entry_point_is_visible_in_the_group() -> None:
    found = [ep for ep in importlib.metadata.entry_points(group="vllm_custom_patches") if ep.name == PATCH]
    assert found, f"no entry point {PATCH!r} in group 'vllm_custom_patches'"
    assert {ep.value for ep in found} == {ENTRY_POINT}
    assert {_normalized(ep.dist.name) for ep in found if ep.dist is not None} == {DISTRIBUTION}


def test_list_shows_the_patch_from_its_distribution(vllm_workspace: VllmWorkspace) -> None:
    done = run_cli(["list", "--json"], vllm_workspace.env())  # in this process: one vLLM import for all such tests
    assert done.returncode == 0, done.stdout + done.stderr
    rows = {row["name"]: row for row in json.loads(done.stdout)["patches"]}
    row = rows[PATCH]
    assert row["source"] == f"entry point ({DISTRIBUTION})"
    assert row["target"] == "vllm.v1.core.sched.scheduler:Scheduler"
    assert row["result"] == "loaded", row["reason"]
    assert row["description"] == "Admit waiting requests newest first (last in, first out)."


@early_fixture
def package_suite_run(job: JobContext) -> tuple[subprocess.CompletedProcess[str], float]:
    """The package's own test suite, as its authors run it (their pytest, their settings); and how long it took.

    About 100 s on 2 cores (two in-process engines side by side, then one
    multiprocess engine): an early job, run in the background from the start.
    """
    env = {k: v for k, v in job.env().items() if not k.startswith("PYTEST_")}
    started = time.monotonic()
    done = job.run(
        [sys.executable, "-m", "pytest", str(PACKAGE_DIR.relative_to(ROOT) / "tests"), "-q", "-p", "no:cacheprovider",
         f"--basetemp={job.workspace.dir('patch-package') / 'basetemp'}"],
        env=env, cwd=ROOT, timeout=600,
    )  # fmt: skip
    return done, time.monotonic() - started


@pytest.mark.slow
def test_the_package_s_own_test_suite_passes(
    package_suite_run: tuple[subprocess.CompletedProcess[str], float],
) -> None:
    done, elapsed = package_suite_run
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"exit {done.returncode} after {elapsed:.0f} s:\n{output[-6000:]}"
    summary = done.stdout.strip().splitlines()[-1]
    assert re.fullmatch(rf"{PACKAGE_TESTS} passed in [\d.]+s( \(\d+:\d\d:\d\d\))?", summary), summary
