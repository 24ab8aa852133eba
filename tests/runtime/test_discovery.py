"""Discovery: real installed entry points (imported only when selected) and VLLM_CUSTOM_PATCHES_PATH."""

from __future__ import annotations

import os
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import importlib_metadata
import pytest
from _helpers import captured_logs, clean_env, fresh_plugin, installed_dists, on_sys_path

from vllm_custom_patches import (
    PatchConfigError,
    PatchDefinitionError,
    PatchLoadError,
    PatchManager,
    PatchState,
    UnknownPatchError,
    plugin,
)
from vllm_custom_patches._runtime.discovery import (
    ENTRY_POINT_GROUP,
    PATH_PACKAGE,
    PatchEntryPoint,
    find_entry_points,
    load_path,
)


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    clean_env(monkeypatch)
    with fresh_plugin():
        yield


@pytest.fixture
def dists() -> Iterator[Path]:
    with on_sys_path(installed_dists()):
        yield installed_dists()


def imported(prefix: str) -> set[str]:
    return {name for name in sys.modules if name == prefix or name.startswith(prefix + ".")}


def state_of(name: str) -> tuple[PatchState, str]:
    (status,) = [s for s in PatchManager.status() if s.name == name]
    return status.state, status.reason


# -- entry points ------------------------------------------------------------------


def test_finding_entry_points_reads_metadata_and_imports_nothing(dists: Path) -> None:
    found = find_entry_points()
    assert {"vcp_good", "vcp_second", "vcp_misnamed", "vcp_not_a_patch", "vcp_broken"} <= set(found)
    assert found["vcp_good"].module == "vcp_testdist.good"
    assert imported("vcp_testdist") == set()
    assert imported("vcp_brokendist") == set()


def test_entry_points_are_invisible_without_the_distribution() -> None:
    assert "vcp_good" not in find_entry_points()


def test_loading_one_entry_point_imports_only_its_module(dists: Path) -> None:
    patch = find_entry_points()["vcp_good"].load()
    assert patch.name == "vcp_good"
    assert PatchManager.get("vcp_good") is patch
    # The patch's module, not its (string) target and no other patch module.
    assert imported("vcp_testdist") == {"vcp_testdist", "vcp_testdist.good"}
    assert imported("vcp_brokendist") == set()


def test_a_broken_entry_point_names_its_distribution_and_the_cause(dists: Path) -> None:
    with pytest.raises(PatchLoadError) as info:
        find_entry_points()["vcp_broken"].load()
    message = str(info.value)
    assert "'vcp_broken'" in message
    assert "vcp_brokendist.broken:BrokenPatch" in message
    assert "'vcp-brokendist'" in message
    assert "RuntimeError: vcp_brokendist.broken is broken on purpose" in message
    assert isinstance(info.value.__cause__, RuntimeError)
    assert not isinstance(info.value, ImportError)  # never swallowed as an optional import


def test_entry_point_name_must_be_the_patch_name(dists: Path) -> None:
    with pytest.raises(PatchDefinitionError, match=r"loads the patch named 'vcp_other_name'.*Rename the entry point"):
        find_entry_points()["vcp_misnamed"].load()


def test_entry_point_must_name_a_patch_class(dists: Path) -> None:
    expected = r"vcp_not_a_patch = 'vcp_testdist.notpatch:helper'.*not a patch class"
    with pytest.raises(PatchDefinitionError, match=expected):
        find_entry_points()["vcp_not_a_patch"].load()


def test_two_distributions_declaring_one_name_is_an_error() -> None:
    eps = tuple(importlib_metadata.EntryPoint("dup", value, ENTRY_POINT_GROUP) for value in ("a:P", "b:P"))
    with pytest.raises(PatchConfigError, match=r"'dup' is declared by several entry points.*\(a:P\), .*\(b:P\)"):
        PatchEntryPoint("dup", eps).load()


def test_register_imports_only_the_selected_entry_point(dists: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_CUSTOM_PATCHES", "vcp_good")
    plugin.register()
    assert imported("vcp_testdist") == {"vcp_testdist", "vcp_testdist.good"}
    assert imported("vcp_brokendist") == set()
    assert state_of("vcp_good") == (PatchState.PENDING, "waiting for import of vcp_testdist.target")
    from vcp_testdist.target import Engine

    assert Engine().step() == "patched:original"


def test_star_skips_what_cannot_load_and_applies_the_rest(dists: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_CUSTOM_PATCHES", "*")
    with captured_logs() as logs:
        plugin.register()
    (summary,) = [m for m in logs.messages() if m.startswith(f"vllm-custom-patches [pid {os.getpid()}]: applied:")]
    assert "vcp_broken (patch 'vcp_broken': cannot import entry point" in summary
    assert "vcp_misnamed (entry point vcp_misnamed = " in summary
    assert "vcp_not_a_patch (entry point vcp_not_a_patch = " in summary
    assert "failed: none" in summary
    for name in ("vcp_good", "vcp_second", "vcp_other_name"):  # the last one registered by vcp_misnamed's module
        assert state_of(name)[0] is PatchState.PENDING
    from vcp_testdist.target import Engine, Spare

    assert Engine().step() == "patched:original"
    assert Engine().describe() == "engine"
    assert Spare().value() == 2


def test_star_minus_never_imports_the_excluded(dists: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_CUSTOM_PATCHES", "*, -vcp_broken,-vcp_misnamed")
    plugin.register()
    assert imported("vcp_brokendist") == set()
    assert "vcp_testdist.misnamed" not in sys.modules
    assert "vcp_testdist.good" in sys.modules


def test_a_selected_broken_entry_point_fails_start_up_before_anything_is_applied(
    dists: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VLLM_CUSTOM_PATCHES", "vcp_good,vcp_broken")
    with pytest.raises(PatchLoadError) as info:
        plugin.register()
    message = str(info.value)
    assert message.startswith("vllm-custom-patches: VLLM_CUSTOM_PATCHES='vcp_good,vcp_broken' cannot be honoured")
    assert "  - vcp_broken: patch 'vcp_broken': cannot import entry point" in message
    assert "VLLM_CUSTOM_PATCHES_STRICT=0" in message
    assert isinstance(info.value.__cause__, PatchLoadError)
    assert state_of("vcp_good")[0] is PatchState.AVAILABLE  # resolved, but nothing was applied


def test_unknown_names_list_entry_points_and_suggest(dists: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_CUSTOM_PATCHES", "vcp_god")
    expected = r"no patch named 'vcp_god'\. Did you mean 'vcp_good'\? Available: .*vcp_broken"
    with pytest.raises(UnknownPatchError, match=expected):
        plugin.register()
    assert imported("vcp_testdist") == set()


# -- VLLM_CUSTOM_PATCHES_PATH --------------------------------------------------------

PATCH_FILE = """
from vllm_custom_patches import VLLMPatch


class Target{n}:
    def run(self):
        return "original"


class FilePatch{n}(VLLMPatch[Target{n}]):
    name = "file_patch_{n}"

    def run(self):
        return "patched"
"""


def write(path: Path, text: str, mode: int = 0o644) -> Path:
    path.write_text(textwrap.dedent(text))
    path.chmod(mode)
    return path


@pytest.fixture
def patch_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "patches"
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)
    write(directory / "one.py", PATCH_FILE.format(n=1))
    write(directory / "_helper.py", "raise RuntimeError('never imported')")
    write(directory / ".hidden.py", "raise RuntimeError('never imported')")
    write(directory / "notes.txt", "not python")
    return directory


def test_path_files_are_imported_under_a_stable_name(patch_dir: Path) -> None:
    result = load_path(str(patch_dir))
    assert result.refused == [] and result.failed == {}
    assert result.modules == {f"{PATH_PACKAGE}.one": str(patch_dir / "one.py")}
    module = sys.modules[f"{PATH_PACKAGE}.one"]
    assert PatchManager.get("file_patch_1").__module__ == module.__name__
    # A second load (e.g. register() after a test reset) does not run the file again.
    load_path(str(patch_dir))
    assert sys.modules[f"{PATH_PACKAGE}.one"] is module


def test_path_patches_are_selectable(patch_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_CUSTOM_PATCHES_PATH", f"{patch_dir}{os.pathsep}")
    monkeypatch.setenv("VLLM_CUSTOM_PATCHES", "file_patch_1")
    plugin.register()
    module = sys.modules[f"{PATH_PACKAGE}.one"]
    assert module.Target1().run() == "patched"
    assert PatchManager.applied() == ["file_patch_1"]


@pytest.mark.parametrize("mode", [0o775, 0o757, 0o777], ids=oct)
def test_a_directory_writable_by_others_is_refused(patch_dir: Path, monkeypatch: pytest.MonkeyPatch, mode: int) -> None:
    patch_dir.chmod(mode)
    result = load_path(str(patch_dir))
    assert result.modules == {}
    (error,) = result.refused
    assert f"refusing directory {patch_dir}: it is writable by" in str(error)
    assert f"chmod go-w {patch_dir}" in str(error)
    assert f"{PATH_PACKAGE}.one" not in sys.modules
    monkeypatch.setenv("VLLM_CUSTOM_PATCHES_PATH", str(patch_dir))
    monkeypatch.setenv("VLLM_CUSTOM_PATCHES", "*")
    with pytest.raises(PatchConfigError, match=r"\n  - VLLM_CUSTOM_PATCHES_PATH: refusing directory"):
        plugin.register()


def test_a_file_writable_by_group_is_refused_and_the_others_still_load(
    patch_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(patch_dir / "two.py", PATCH_FILE.format(n=2), mode=0o664)
    result = load_path(str(patch_dir))
    (error,) = result.refused
    assert f"refusing file {patch_dir / 'two.py'}: it is writable by group (mode -rw-rw-r--)" in str(error)
    assert list(result.modules) == [f"{PATH_PACKAGE}.one"]
    # Not strict: logged, and the selected patch from the safe file is applied.
    monkeypatch.setenv("VLLM_CUSTOM_PATCHES_PATH", str(patch_dir))
    monkeypatch.setenv("VLLM_CUSTOM_PATCHES", "file_patch_1")
    monkeypatch.setenv("VLLM_CUSTOM_PATCHES_STRICT", "0")
    with captured_logs() as logs:
        plugin.register()
    assert PatchManager.applied() == ["file_patch_1"]
    assert any("failed: VLLM_CUSTOM_PATCHES_PATH (refusing file" in m for m in logs.messages())


@pytest.mark.parametrize("problem", ["missing", "file"])
def test_a_path_entry_that_is_not_a_directory_is_an_error(tmp_path: Path, problem: str) -> None:
    entry = tmp_path / "nothing"
    if problem == "file":
        write(entry, "")
    (error,) = load_path(str(entry)).refused
    expected = "cannot read directory" if problem == "missing" else "is not a directory"
    assert "VLLM_CUSTOM_PATCHES_PATH: " in str(error) and expected in str(error)


def test_the_same_file_name_in_two_directories_is_refused(patch_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    other.chmod(0o755)
    write(other / "one.py", PATCH_FILE.format(n=3))
    result = load_path(os.pathsep.join([str(patch_dir), str(other)]))
    (error,) = result.refused
    assert "would both be module vllm_custom_patches_path.one; rename one of them" in str(error)
    assert "file_patch_3" not in PatchManager.names()


def test_a_file_name_that_is_no_module_name_is_refused(patch_dir: Path) -> None:
    write(patch_dir / "my-patch.py", PATCH_FILE.format(n=4))
    (error,) = load_path(str(patch_dir)).refused
    assert "'my-patch' is not a valid module name" in str(error)


def test_a_file_that_fails_to_import_names_the_file(patch_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = write(patch_dir / "bad.py", PATCH_FILE.format(n=5) + "\nraise ValueError('boom')\n")
    result = load_path(str(patch_dir))
    error = result.failed[f"{PATH_PACKAGE}.bad"]
    assert isinstance(error, PatchLoadError)
    assert str(error) == f"VLLM_CUSTOM_PATCHES_PATH: cannot import {bad}: ValueError: boom"
    assert f"{PATH_PACKAGE}.bad" not in sys.modules
    monkeypatch.setenv("VLLM_CUSTOM_PATCHES_PATH", str(patch_dir))
    # With '*', the broken file is skipped (its half-registered patch too) and the rest applies.
    monkeypatch.setenv("VLLM_CUSTOM_PATCHES", "*")
    with captured_logs() as logs:
        plugin.register()
    assert "file_patch_1" in PatchManager.applied()
    assert "file_patch_5" not in PatchManager.applied()
    (summary,) = [m for m in logs.messages() if ": applied:" in m]
    assert f"skipped: {bad} (VLLM_CUSTOM_PATCHES_PATH: cannot import {bad}: ValueError: boom)" in summary


def test_an_unknown_name_mentions_path_files_that_failed(patch_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = write(patch_dir / "bad.py", "raise ValueError('boom')\n")
    monkeypatch.setenv("VLLM_CUSTOM_PATCHES_PATH", str(patch_dir))
    monkeypatch.setenv("VLLM_CUSTOM_PATCHES", "file_patch_9")
    with pytest.raises(UnknownPatchError, match=rf"1 file\(s\) in VLLM_CUSTOM_PATCHES_PATH failed to import: {bad}"):
        plugin.register()
