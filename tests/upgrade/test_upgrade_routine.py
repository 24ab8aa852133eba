"""The upgrade routine of docs/upgrading.md, run end to end as written, where vLLM is not installed.

The commands are parsed from the page's block (``export`` lines set the
environment, each other line is a command) and run in order by the real
console script of an environment without vLLM (``tests/_novllm.py``), in an
empty directory standing for the ops team's repository, against the real
0.33.0 and 0.34.0 wheels (``make vllm-next``).  What each step must show is
below; a change to the page's commands fails here until both agree.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import _novllm
import pytest

PAGE = Path(__file__).resolve().parents[2] / "docs" / "upgrading.md"
COMMANDS = [
    "lock --vllm 0.33.0",
    "doctor --vllm 0.34.0",
    "doctor --matrix 0.33.0,0.34.0",
    "lock --vllm 0.34.0",
    "doctor --vllm 0.34.0",
]


def routine() -> tuple[dict[str, str], list[list[str]]]:
    """The environment the page's routine exports, and its commands (each after ``vllm-custom-patches``)."""
    text = PAGE.read_text()
    section = re.split(r"\n#{2,3} ", text.split("\n### The upgrade routine\n", 1)[1], maxsplit=1)[0]
    match = re.search(r"^```bash\n(.*?)^```$", section, re.DOTALL | re.MULTILINE)
    assert match, "docs/upgrading.md: the upgrade routine has no ```bash block"
    env: dict[str, str] = {}
    commands = []
    for line in match.group(1).splitlines():
        words = shlex.split(line, comments=True)
        if not words:
            continue
        if words[0] == "export":
            name, _, value = words[1].partition("=")
            env[name] = value
        else:
            assert words[0] == "vllm-custom-patches", line
            commands.append(words[1:])
    return env, commands


@pytest.mark.vllm
def test_the_upgrade_routine_runs_as_written_without_vllm(no_vllm: Path, tmp_path: Path) -> None:
    _novllm.need_wheels("0.33.0", "0.34.0")
    exported, commands = routine()
    assert [" ".join(c) for c in commands] == COMMANDS, "the page's routine changed: update this test with it"
    assert exported["VLLM_CUSTOM_PATCHES_LOCK_DIR"] == "./vllm-locks"
    selected = exported["VLLM_CUSTOM_PATCHES"].split(",")
    locks = tmp_path / "vllm-locks"

    def run(args: list[str]) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([str(no_vllm), *args], capture_output=True, text=True, cwd=tmp_path,
                                env=_novllm.environ(exported), timeout=600, check=False)  # fmt: skip
        assert "Traceback" not in result.stderr, result.stderr
        return result

    def versions(patch: str) -> list[str]:
        return sorted(json.loads((locks / f"{patch}.lock.json").read_text())["patches"][patch]["versions"])

    # 1. Lock what the patches rely on, in the team's own directory (not in site-packages).
    result = run(commands[0])
    assert result.returncode == 0, result.stdout + result.stderr
    assert all(versions(name) == ["0.33.0"] for name in selected)

    # 2. 0.34.0 against that lock: fair_share's schedule changed (an error, with its diff), the lock named.
    result = run(commands[1])
    assert result.returncode == 1, result.stdout + result.stderr
    assert "fair_share: ERROR" in result.stdout
    assert f"measured against vLLM 0.33.0 as locked in {locks / 'fair_share.lock.json'}" in result.stdout
    assert "ERROR   [drift] the original Scheduler.schedule changed since vLLM 0.33.0 (locked)" in result.stdout
    diff_line = r"^      \+ +request_queue = self\._next_waiting_queue\(take_async_kv\)$"
    assert re.search(diff_line, result.stdout, re.MULTILINE), result.stdout  # the diff, under its finding
    result = run(commands[2])
    assert result.returncode == 1, result.stdout + result.stderr
    (row,) = [line for line in result.stdout.splitlines() if line.startswith("| `fair_share` |")]
    cells = row.split(" | ")
    assert not cells[1].startswith("error") and cells[2].startswith("error: "), row

    # 3. Accepted: 0.34.0 locked beside 0.33.0, and doctor is clean against it.
    result = run(commands[3])
    assert result.returncode == 0, result.stdout + result.stderr
    assert all(versions(name) == ["0.33.0", "0.34.0"] for name in selected)
    result = run(commands[4])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"measured against vLLM 0.34.0 as locked in {locks / 'fair_share.lock.json'}" in result.stdout
