"""The ``vllm-custom-patches`` command: list, check, version; tables for people, --json for machines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest


@pytest.fixture
def patch_dir(tmp_path: Path) -> Path:
    """A VLLM_CUSTOM_PATCHES_PATH directory with a good, a misspelt and a broken patch file."""
    (tmp_path / "cli_target_mod.py").write_text("class Engine:\n    def step(self):\n        return 1\n")
    patches = tmp_path / "patches"
    patches.mkdir(mode=0o755)
    (patches / "good.py").write_text(
        textwrap.dedent(
            '''
            from vllm_custom_patches import VLLMPatch, vllm_versions

            @vllm_versions(">=0.1")
            class GoodStep(VLLMPatch["cli_target_mod:Engine"]):
                """Makes step return 2."""
                def step(self):
                    return self._original_step() + 1

                def extra(self):
                    return "x"
            '''
        )
    )
    (patches / "misspelt.py").write_text(
        textwrap.dedent(
            """
            from typing_extensions import override
            from vllm_custom_patches import VLLMPatch

            class Misspelt(VLLMPatch["cli_target_mod:Engine"]):
                @override
                def stpe(self):
                    return 0
            """
        )
    )
    (patches / "broken.py").write_text("raise RuntimeError('broken patch file')\n")
    for path in patches.iterdir():
        path.chmod(0o644)
    return tmp_path


def _run(args: list[str], root: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_CUSTOM_PATCHES")}
    environ.update(PYTHONPATH=str(root), VLLM_CUSTOM_PATCHES_PATH=str(root / "patches"), **env)
    return subprocess.run(
        [sys.executable, "-m", "vllm_custom_patches", *args], capture_output=True, text=True, env=environ, timeout=120
    )


def test_list_json_shows_each_patch_with_its_target_and_load_failures(patch_dir: Path) -> None:
    result = _run(["list", "--json"], patch_dir, VLLM_CUSTOM_PATCHES_VLLM_VERSION="0.32.0")
    assert result.returncode == 1, result.stderr  # the broken file is a failure
    rows = {row["name"]: row for row in json.loads(result.stdout)["patches"]}
    assert rows["GoodStep"]["result"] == "loaded"
    assert rows["GoodStep"]["target"] == "cli_target_mod:Engine"
    assert rows["GoodStep"]["versions"] == ">=0.1"
    assert rows["GoodStep"]["description"] == "Makes step return 2."
    broken = [row for row in rows.values() if row["result"] == "failed"]
    assert len(broken) == 1 and "broken patch file" in broken[0]["reason"]


def test_check_reports_ok_and_the_reason_of_a_failure(patch_dir: Path) -> None:
    result = _run(["check", "GoodStep", "Misspelt", "--json"], patch_dir, VLLM_CUSTOM_PATCHES_VLLM_VERSION="0.32.0")
    assert result.returncode == 1
    rows = {row["name"]: row for row in json.loads(result.stdout)["patches"]}
    assert rows["GoodStep"]["result"] == "ok"
    assert rows["GoodStep"]["overrides"] == ["step"] and rows["GoodStep"]["additions"] == ["extra"]
    assert rows["Misspelt"]["result"] == "failed"
    assert "'stpe' is marked @override but Engine has no member 'stpe'" in rows["Misspelt"]["reason"]


def test_check_defaults_to_the_env_selection_and_succeeds(patch_dir: Path) -> None:
    result = _run(["check"], patch_dir, VLLM_CUSTOM_PATCHES="GoodStep", VLLM_CUSTOM_PATCHES_VLLM_VERSION="0.32.0")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "GoodStep" in result.stdout and "OK" in result.stdout and "overrides step" in result.stdout
    assert "1 patch(es), 0 failed" in result.stdout


def test_version_gate_fails_a_named_patch_and_skips_one_taken_in_by_star(patch_dir: Path) -> None:
    named = _run(["check", "GoodStep", "--json"], patch_dir, VLLM_CUSTOM_PATCHES_VLLM_VERSION="0.0.9")
    (row,) = json.loads(named.stdout)["patches"]
    assert named.returncode == 1
    assert row["result"] == "failed" and "requires vLLM >=0.1" in row["reason"]
    star = _run(["check", "--json"], patch_dir, VLLM_CUSTOM_PATCHES="*", VLLM_CUSTOM_PATCHES_VLLM_VERSION="0.0.9")
    rows = {row["name"]: row for row in json.loads(star.stdout)["patches"]}
    assert rows["GoodStep"]["result"] == "skipped"
    assert rows["Misspelt"]["result"] == "skipped" and "@override" in rows["Misspelt"]["reason"]


def test_unknown_name_in_check_suggests_the_closest(patch_dir: Path) -> None:
    result = _run(["check", "GoodStpe"], patch_dir)
    assert result.returncode == 1
    assert "Did you mean 'GoodStep'?" in result.stdout


def test_version_json_uses_the_override(patch_dir: Path) -> None:
    result = _run(["version", "--json"], patch_dir, VLLM_CUSTOM_PATCHES_VLLM_VERSION="0.11.1.dev5+gabc")
    assert result.returncode == 0
    assert json.loads(result.stdout) == {
        "version": "0.11.1.dev5+gabc",
        "source": "$VLLM_CUSTOM_PATCHES_VLLM_VERSION",
        "release": "0.11.1",
    }


def test_bad_selection_is_a_clear_error_not_a_traceback(patch_dir: Path) -> None:
    result = _run(["check"], patch_dir, VLLM_CUSTOM_PATCHES="-GoodStep")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "VLLM_CUSTOM_PATCHES='-GoodStep'" in result.stderr
