"""Every process: children started with spawn and fork load vllm.general_plugins as vLLM does."""

from __future__ import annotations

import multiprocessing
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import _child
import pytest
from _helpers import clean_env, fresh_plugin, installed_dists, on_sys_path

from vllm_custom_patches import PatchManager, plugin


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    clean_env(monkeypatch)
    # Only this project's general plugin: vLLM's own ones would import vLLM.
    monkeypatch.setenv("VLLM_PLUGINS", "custom_patches")
    with fresh_plugin(), on_sys_path(installed_dists()):
        yield


def run_child(method: str, **kwargs: Any) -> dict[str, Any]:
    ctx = multiprocessing.get_context(method)
    queue = ctx.Queue()
    process = ctx.Process(target=_child.report, args=(queue,), kwargs=kwargs)
    process.start()
    try:
        result = queue.get(timeout=120)
    finally:
        process.join(timeout=60)
    assert process.exitcode == 0
    assert result["pid"] != os.getpid()
    return result


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_a_fresh_child_applies_the_selected_patch(monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    monkeypatch.setenv("VLLM_CUSTOM_PATCHES", "vcp_good")
    result = run_child(method)
    assert "error" not in result, result.get("error")
    assert result["plugins"] == ["custom_patches"]
    assert result["target_imported_by_plugins"] is False
    assert result["before_import"]["vcp_good"] == "pending"
    assert result["step"] == "patched:original"
    assert result["after_import"]["vcp_good"] == "applied"
    assert result["applied"] == ["vcp_good"]
    assert PatchManager.applied() == []  # the parent is untouched


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_star_in_a_child_skips_the_broken_distribution(monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    monkeypatch.setenv("VLLM_CUSTOM_PATCHES", "*,-vcp_misnamed")
    result = run_child(method)
    assert "error" not in result, result.get("error")
    assert result["step"] == "patched:original"
    assert result["before_import"]["vcp_good"] == "pending"
    assert "vcp_broken" not in result["before_import"]  # never became a patch class
    assert {"vcp_good", "vcp_second"} <= set(result["applied"])


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_a_misconfigured_child_fails_its_start_up(monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    monkeypatch.setenv("VLLM_CUSTOM_PATCHES", "vcp_good,vcp_broken")
    result = run_child(method)
    assert result["error"].startswith("PatchLoadError: vllm-custom-patches: VLLM_CUSTOM_PATCHES='vcp_good,vcp_broken'")
    assert "step" not in result


@pytest.mark.parametrize("target_imported", [True, False])
def test_a_forked_child_inherits_the_parents_patches(monkeypatch: pytest.MonkeyPatch, target_imported: bool) -> None:
    monkeypatch.setenv("VLLM_CUSTOM_PATCHES", "vcp_good")
    if target_imported:
        import vcp_testdist.target  # noqa: F401
    plugin.register()
    assert PatchManager.applied() == (["vcp_good"] if target_imported else [])
    result = run_child("fork", call_register_again=True)
    assert "error" not in result, result.get("error")
    # The child's register() changed nothing: inherited patch (or inherited
    # import hook), applied once.
    assert result["step"] == "patched:original"
    assert result["applied"] == ["vcp_good"]
    assert result["unchanged_by_second_register"] is True


@pytest.mark.parametrize("plugins", ["some_other_plugin", "some_other_plugin, custom_patches"])
def test_vllm_plugins_must_list_custom_patches_exactly(monkeypatch: pytest.MonkeyPatch, plugins: str) -> None:
    # As documented: vLLM matches VLLM_PLUGINS items exactly, without stripping spaces.
    monkeypatch.setenv("VLLM_PLUGINS", plugins)
    monkeypatch.setenv("VLLM_CUSTOM_PATCHES", "vcp_good")
    result = run_child("spawn")
    assert "error" not in result, result.get("error")
    assert result["plugins"] == []
    assert result["step"] == "original"


@pytest.mark.vllm
def test_inside_vllm_the_summary_is_in_vllms_log(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    if os.environ.get("VCP_SKIP_VLLM") == "1":
        pytest.skip("VCP_SKIP_VLLM=1")
    script = (
        "from vllm.plugins import load_general_plugins\n"
        "load_general_plugins()\n"
        "from vcp_testdist.target import Engine\n"
        "print('STEP', Engine().step(), flush=True)\n"
    )
    env = dict(os.environ)
    env.update(
        VLLM_CUSTOM_PATCHES="vcp_good",
        PYTHONPATH=str(installed_dists()),
        VLLM_CACHE_ROOT=str(tmp_path / "vllm-cache"),
        VLLM_LOGGING_COLOR="0",
    )
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert "STEP patched:original" in output
    # vLLM's own format (level, date, [file:line]) around our line: its handler wrote it.
    pid = r"\d+"
    assert re.search(
        rf"INFO \d\d-\d\d [\d:]+ \[activation\.py:\d+\] vllm-custom-patches \[pid {pid}\]: applied: none; "
        rf"pending: vcp_good \(waiting for import of vcp_testdist\.target\)",
        output,
    ), output[-3000:]
    assert re.search(rf"INFO .* vllm-custom-patches \[pid {pid}\]: applied pending patch 'vcp_good'", output)
