"""Every rank: the settings Ray copies to remote workers.

(That a worker-side patch applies and runs in both tensor-parallel ranks and
the scheduler patch in the engine core only is checked on the tensor-parallel
server of tests/real_vllm/test_vllm_control.py, which serves with exactly
that selection.)
"""

from __future__ import annotations

import importlib

import pytest

import vllm_custom_patches._env as project_env

pytestmark = pytest.mark.vllm


def _settings() -> set[str]:
    """Every variable this project and its catalogue read: the ENV_* constants of their modules."""
    modules = [project_env] + [
        importlib.import_module(f"vllm_custom_patches_catalogue.{name}")
        for name in ("shortest_prompt_first", "fair_share", "scheduler_trace")
    ]
    names = {
        value
        for module in modules
        for key, value in vars(module).items()
        if key.startswith("ENV_") and isinstance(value, str)
    }
    assert len(names) >= 9, names  # five of the plugin's, four of the catalogue's
    return names


def test_ray_copies_every_setting_of_the_project_and_the_catalogue_to_its_workers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from vllm.ray.ray_env import get_env_vars_to_copy

    settings = _settings()
    for name in settings:
        monkeypatch.setenv(name, "set-on-the-driver")
    monkeypatch.setenv("VCP_NOT_A_VLLM_NAME", "x")  # the control: not copied
    copied = get_env_vars_to_copy(destination="the test")
    assert settings <= copied, sorted(settings - copied)
    assert "VCP_NOT_A_VLLM_NAME" not in copied
