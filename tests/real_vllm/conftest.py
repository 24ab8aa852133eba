"""Fixtures for the tests that run real vLLM (the CPU build CI installs).

vLLM missing is a failure, not a skip: CI installs it (``make test`` depends on
``make vllm``), so a broken install must not turn into a green run.  A
developer without vLLM sets ``VCP_SKIP_VLLM=1`` to skip these tests; ``-m "not
slow"`` leaves out the ones that start engines and servers.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SKIP_ENV = "VCP_SKIP_VLLM"


def _vllm_missing() -> str | None:
    try:
        spec = importlib.util.find_spec("vllm")
    except (ImportError, ValueError) as exc:
        return f"vLLM cannot be found: {exc}"
    # A directory named vllm on sys.path without __init__.py is a namespace
    # package, not vLLM.
    if spec is None or spec.origin is None or spec.loader is None:
        return "vLLM is not installed"
    return None


def _check_vllm() -> None:
    missing = _vllm_missing()
    if missing is None:
        return
    if os.environ.get(SKIP_ENV, "").strip() == "1":
        pytest.skip(f"{missing}; skipped because {SKIP_ENV}=1")
    pytest.fail(
        f"{missing}, and these tests need it: run 'make vllm' (scripts/install-vllm.sh .venv), "
        f"or set {SKIP_ENV}=1 to skip the real-vLLM tests.",
        pytrace=False,
    )


@pytest.fixture(autouse=True)
def _require_vllm() -> None:
    _check_vllm()


@dataclass(frozen=True)
class VllmWorkspace:
    root: Path
    """A short path (vLLM puts Unix sockets under VLLM_RPC_BASE_PATH; keep it under ~70 chars)."""
    model: Path
    """The tiny model, with its offline tokenizer."""

    def env(self, **extra: str) -> dict[str, str]:
        """An environment for a process that starts vLLM: no patch selected unless ``extra`` says so."""
        from _engine import clean_env

        from vllm_custom_patches.testing import ENGINE_ENV

        return clean_env(
            os.environ,
            {
                **ENGINE_ENV,
                "VLLM_CACHE_ROOT": str(self.root / "cache"),
                "VLLM_RPC_BASE_PATH": str(self.root / "rpc"),
                "VLLM_NO_USAGE_STATS": "1",
                "VLLM_DO_NOT_TRACK": "1",
                "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false",
                **extra,
            },
        )

    def dir(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path


@pytest.fixture(scope="session")
def vllm_workspace() -> Iterator[VllmWorkspace]:
    _check_vllm()
    from vllm_custom_patches.testing import write_tiny_model

    root = Path(tempfile.mkdtemp(prefix="vcp-"))
    (root / "rpc").mkdir()
    try:
        yield VllmWorkspace(root=root, model=write_tiny_model(root / "model", tokenizer=True))
    finally:
        shutil.rmtree(root, ignore_errors=True)
