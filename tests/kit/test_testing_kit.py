"""The patch authors' kit: the pytest plugin is installed and its ``vllm_patches`` fixture proves exact rollback."""

from __future__ import annotations

import importlib.metadata

import pytest

pytest_plugins = ["pytester"]

_TARGET_AND_PATCH = """
from vllm_custom_patches import VLLMPatch


class Engine:
    def step(self):
        return "original"


class Prefix(VLLMPatch[Engine]):
    name = "kit_prefix"

    def step(self):
        return "patched:" + Prefix.original("step")(self)
"""


def test_the_plugin_is_installed_as_a_pytest11_entry_point() -> None:
    (entry,) = [ep for ep in importlib.metadata.entry_points(group="pytest11") if ep.name == "vllm_custom_patches"]
    assert entry.value == "vllm_custom_patches.testing.pytest_plugin"


def test_vllm_patches_applies_for_one_test_and_rolls_back_exactly(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        target_mod=_TARGET_AND_PATCH,
        test_good="""
        from target_mod import Engine, Prefix

        def test_patched(vllm_patches):
            vllm_patches.apply(Prefix)
            assert Engine().step() == "patched:original"
            assert vllm_patches.applied == ["kit_prefix"]

        def test_after():
            assert Engine().step() == "original" and not Prefix.is_applied()
        """,
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)


def test_vllm_patches_fails_a_test_that_leaves_the_target_changed(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        target_mod=_TARGET_AND_PATCH,
        test_leaky="""
        from target_mod import Engine, Prefix

        def test_leaks(vllm_patches):
            vllm_patches.apply("kit_prefix")
            Engine.cache = {}  # an outside change the rollback cannot know about
        """,
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*vllm_patches: the rollback was not exact*", "*Engine: + cache = {}*"])


def test_vllm_patches_fails_a_test_whose_patch_cannot_be_rolled_back(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        target_mod=_TARGET_AND_PATCH,
        test_replaced="""
        from target_mod import Engine, Prefix

        def test_replaces_the_graft(vllm_patches):
            vllm_patches.apply(Prefix)
            Engine.step = lambda self: "someone else"  # outside code replaced the patched member
        """,
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(
        ["*rolling back 'kit_prefix' failed: PatchConflictError*", "*still applied after rollback: ?'kit_prefix'?*"]
    )
