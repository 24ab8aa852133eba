"""Fixtures of the upgrade tests: an environment without vLLM (``tests/_novllm.py``), made once per session."""

from __future__ import annotations

from pathlib import Path

import _novllm
import pytest


@pytest.fixture(scope="session")
def no_vllm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``vllm-custom-patches`` console script of a venv where vLLM is not installed."""
    return _novllm.make(tmp_path_factory.mktemp("no-vllm"))
