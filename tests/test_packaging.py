"""What users install: the sdist and the wheel, built from this tree and checked as PyPI would.

The wheel must carry every module of the framework (a subpackage missing from
``pyproject.toml`` would import in the editable checkout and fail for users),
the catalogue with its lock files, ``py.typed``, and the entry points vLLM and
pytest look up.  Built without isolation (the venv's setuptools, no download).
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    out = tmp_path_factory.mktemp("dist")
    build = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--sdist", "--wheel", "--outdir", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    yield out


def _wheel(dist: Path) -> zipfile.ZipFile:
    (wheel,) = dist.glob("vllm_custom_patches-*.whl")
    return zipfile.ZipFile(wheel)


def test_twine_check_passes_on_the_sdist_and_the_wheel(dist: Path) -> None:
    files = sorted(str(p) for p in dist.iterdir())
    check = subprocess.run(
        [sys.executable, "-m", "twine", "check", "--strict", *files], capture_output=True, text=True, timeout=300
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.count("PASSED") == 2, check.stdout


def test_the_wheel_carries_every_module_the_catalogue_its_locks_and_py_typed(dist: Path) -> None:
    names = set(_wheel(dist).namelist())
    source = ROOT / "src"
    expected = {str(p.relative_to(source)) for p in (source / "vllm_custom_patches").rglob("*.py")}
    missing = sorted(expected - names)
    assert missing == [], f"modules missing from the wheel (add their package to pyproject.toml): {missing}"
    assert "vllm_custom_patches/py.typed" in names
    catalogue = {
        f"vllm_custom_patches_catalogue/{p.name}" for p in (ROOT / "patches").iterdir() if p.suffix in (".py", ".json")
    }
    assert any(name.endswith(".lock.json") for name in catalogue)  # the check below covers the lock files
    assert sorted(catalogue - names) == []


def test_the_wheel_declares_the_entry_points_vllm_and_pytest_look_up(dist: Path) -> None:
    wheel = _wheel(dist)
    (entry_points,) = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    text = wheel.read(entry_points).decode()
    for line in (
        "[vllm.general_plugins]\ncustom_patches = vllm_custom_patches.plugin:register",
        "[vllm.endpoint_plugins]\ncustom_patches = vllm_custom_patches.endpoint:CustomPatchesEndpoint",
        "[pytest11]\nvllm_custom_patches = vllm_custom_patches.testing.pytest_plugin",
    ):
        assert line in text, f"{line!r} not in entry_points.txt:\n{text}"
    assert "vllm-custom-patches = vllm_custom_patches." in text  # the console script


def test_the_sdist_carries_the_project_files_and_the_catalogue(dist: Path) -> None:
    import tarfile

    (sdist,) = dist.glob("vllm_custom_patches-*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    assert "pyproject.toml" in names and "README.md" in names
    assert {"patches/shortest_prompt_first.py", "patches/shortest_prompt_first.lock.json"} <= names
