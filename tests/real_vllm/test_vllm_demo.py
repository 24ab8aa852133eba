"""The README's main job (``make demo``): examples/scheduler_demo.py end to end (slow: two engines).

The demo runs as an early job (``_early``): it starts with the session, in the
background, and the test reads what it printed.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from _early import JobContext, early_fixture

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

DEMO = Path(__file__).resolve().parents[2] / "examples" / "scheduler_demo.py"


@early_fixture
def demo_run(job: JobContext) -> subprocess.CompletedProcess[str]:
    """``python examples/scheduler_demo.py``, as ``make demo`` runs it."""
    return job.run([sys.executable, str(DEMO)], env=job.env(), timeout=400)


def test_the_demo_shows_the_policy_reordering_requests_inside_the_engine_core(
    demo_run: subprocess.CompletedProcess[str],
) -> None:
    done = demo_run
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    rows = re.findall(r"^\s+(\d+)  (\w+) \(.*?\)\s+(\w+) \(", out, re.MULTILINE)
    unpatched = [a for _, a, _ in rows]
    patched = [b for _, _, b in rows]
    assert unpatched == ["head", "long", "medium", "tiny", "short", "long2"]
    assert patched == ["head", "tiny", "short", "medium", "long2", "long"]
    assert "Output tokens identical in both runs: True" in out
    assert "PatchManager.applied() == []" in out
    assert re.search(r"trace lines, one per scheduler step, written by pid \d+ = VLLM::EngineCore", out), out
