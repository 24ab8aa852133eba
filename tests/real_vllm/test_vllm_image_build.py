"""``scripts/image-build.sh`` -- the build steps of both Docker images -- run in CI.

CI has no Docker engine, so the script runs here as the images run it, with
``--python`` pointing at a fresh virtual environment instead of the image's
Python, and it must install this package from the source tree, install the
patch files with the right permissions, and pass or fail the fit check against
real vLLM as an image build would.

How the fresh environment gets vLLM, honestly and cheaply: installing vLLM
into it (scripts/install-vllm.sh, ~2 GB) would take minutes. Instead the
fresh venv (its own interpreter, pip and site-packages, no
``--system-site-packages``: the base Python has no vLLM anyway) gets one
``.pth`` line naming a directory of symlinks to the packages *already
installed* next to vLLM in the environment running the tests -- every entry
except this project's own (its dist-info, the editable-install finder and
every ``.pth`` file are left out). So vLLM and its dependencies are the real,
already-installed ones (read-only; pip will not uninstall outside the venv),
while vllm-custom-patches is absent until the script builds and installs it
from the source tree, as in an image. The fixture checks that it is absent.
Cost: ~6 s for the venv, ~20 s per script run (a wheel build, and a check
that imports vLLM's scheduler).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import VllmWorkspace

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "image-build.sh"
IMAGE_PATCHES = ROOT / "examples" / "image-patches"

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def _own_entry(name: str) -> bool:
    """Entries of this project (or of site start-up) that the fresh venv must not see."""
    return (
        name.startswith(("vllm_custom_patches", "vllm-custom-patches", "__editable__"))
        or name.endswith(".pth")
        or name == "__pycache__"
    )


@pytest.fixture(scope="module")
def fresh_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = importlib.util.find_spec("vllm")
    assert spec is not None and spec.origin is not None
    installed = Path(spec.origin).resolve().parents[1]  # the site-packages that holds vLLM

    root = tmp_path_factory.mktemp("image-build")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    reuse = root / "installed"
    reuse.mkdir()
    for entry in installed.iterdir():
        if not _own_entry(entry.name):
            (reuse / entry.name).symlink_to(entry)
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.strip()
    (Path(purelib) / "_vcp_installed_vllm.pth").write_text(f"{reuse}\n")

    probe = subprocess.run(
        [
            str(python),
            "-c",
            "import importlib.util as u; print(bool(u.find_spec('vllm')), bool(u.find_spec('vllm_custom_patches')))",
        ],
        capture_output=True,
        text=True,
        env=_env_without_project(),
        timeout=60,
    )
    assert probe.stdout.split() == ["True", "False"], (
        "the fresh venv must see vLLM but not vllm-custom-patches: " + probe.stdout + probe.stderr
    )
    return python


def _env_without_project(base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env.pop("PYTHONPATH", None)  # might point at src/; the fresh venv must not see it
    env.pop("VIRTUAL_ENV", None)
    return env


def _build_outputs() -> set[Path]:
    """What a wheel build in the source tree would leave there."""
    return {*ROOT.glob("build"), *ROOT.glob("*.egg-info"), *ROOT.glob("src/*.egg-info")}


def _build(workspace: VllmWorkspace, python: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    env = _env_without_project(workspace.env(PIP_DISABLE_PIP_VERSION_CHECK="1"))
    started = time.monotonic()
    result = subprocess.run(
        ["bash", str(SCRIPT), "--python", str(python), *args, str(ROOT)],
        capture_output=True,
        text=True,
        env=env,
        cwd=workspace.root,
        timeout=300,
    )
    return result, time.monotonic() - started


def test_build_script_installs_into_a_fresh_venv_and_passes_patches_that_fit(
    vllm_workspace: VllmWorkspace, fresh_python: Path, tmp_path: Path
) -> None:
    dest = tmp_path / "opt" / "vllm-patches"
    before = _build_outputs()
    result, _ = _build(
        vllm_workspace,
        fresh_python,
        "--patch-dir",
        str(IMAGE_PATCHES),
        "--patch-dest",
        str(dest),
        # A file patch from the image's directory and two catalogue patches, one
        # of them needing a setting, given for the check as a build would.
        "--select",
        "AdmissionLog,shortest_prompt_first,scheduler_trace",
        "--check-env",
        f"VLLM_CUSTOM_PATCHES_TRACE_FILE={tmp_path / 'trace.jsonl'}",
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    for name in ("AdmissionLog", "shortest_prompt_first", "scheduler_trace"):
        assert any(line.split()[:2] == [name, "OK"] for line in result.stdout.splitlines()), output
    assert "vLLM 0.32.0" in result.stdout

    # Installed from the source tree into the fresh venv: a real install, not the checkout.
    where = subprocess.run(
        [str(fresh_python), "-c", "import vllm_custom_patches, sys; print(vllm_custom_patches.__file__)"],
        capture_output=True,
        text=True,
        env=_env_without_project(),
        timeout=60,
        check=True,
    ).stdout.strip()
    assert Path(where).is_relative_to(fresh_python.parents[1]), where
    assert _build_outputs() == before, "the script must build from a copy, not write into the source tree"

    # The patch files, as the plugin accepts them: nothing writable by group or others.
    assert (dest / "admission_log.py").is_file()
    for path in [dest, *dest.rglob("*")]:
        mode = path.stat().st_mode & 0o777
        assert mode == (0o755 if path.is_dir() else 0o644), f"{path}: {oct(mode)}"


MISFIT = '''
from typing import Any

from typing_extensions import override

from vllm_custom_patches import VLLMPatch, vllm_versions


@vllm_versions(">=0.32,<0.34")
class Misfit(VLLMPatch["vllm.v1.core.sched.scheduler:Scheduler"]):
    """Overrides a Scheduler method this vLLM does not have."""

    @override
    def schedule_v2(self) -> Any:
        return self._original_schedule_v2()
'''


def test_build_script_fails_on_a_patch_that_does_not_fit_and_names_it(
    vllm_workspace: VllmWorkspace, fresh_python: Path, tmp_path: Path
) -> None:
    patch_dir = tmp_path / "my-patches"
    patch_dir.mkdir()
    (patch_dir / "misfit.py").write_text(textwrap.dedent(MISFIT))
    shutil.copy(IMAGE_PATCHES / "admission_log.py", patch_dir)
    result, _ = _build(
        vllm_workspace,
        fresh_python,
        "--patch-dir",
        str(patch_dir),
        "--patch-dest",
        str(tmp_path / "dest"),
        "--select",
        "AdmissionLog,Misfit",
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert any(line.split()[:2] == ["AdmissionLog", "OK"] for line in result.stdout.splitlines()), output
    assert "FAILED: patch 'Misfit' would not apply to this image's vLLM 0.32.0" in result.stderr, output
    assert "'schedule_v2' is marked @override but Scheduler has no member" in result.stderr, output
    assert "drop 'Misfit' from VLLM_CUSTOM_PATCHES" in result.stderr, output
    assert "AdmissionLog' would not apply" not in output
