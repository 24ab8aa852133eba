"""doctor and stacks (issue 19): stackable patches of one member are no conflict, exclusive tokens are, and
each stack the selection forms on the checked vLLM is reported (an ``info`` finding ``stack``), read
statically and on the installed vLLM alike."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from vllm_custom_patches import VLLMPatch
from vllm_custom_patches._upgrade.doctor import check_patches
from vllm_custom_patches._upgrade.vllm_views import InstalledView, StaticView
from vllm_custom_patches.testing import isolated_registry

SCHEDULER = """
class Scheduler:
    def schedule(self, budget):
        return budget
"""


@pytest.fixture
def view(tmp_path: Path) -> StaticView:
    root = tmp_path / "tree"
    (root / "fakevllm").mkdir(parents=True)
    (root / "fakevllm/__init__.py").write_text("")
    (root / "fakevllm/sched.py").write_text(textwrap.dedent(SCHEDULER))
    return StaticView(root, "1.0.0")


def _patch(name: str, target: str = "fakevllm.sched:Scheduler", helper_name: str = "", **keywords: Any) -> Any:
    def schedule(self: Any, budget: Any) -> Any:
        return patch.original("schedule")(self, budget)

    def helper(self: Any) -> int:
        return 1

    patch: Any = type(VLLMPatch)(
        name, (VLLMPatch[target],), {"schedule": schedule, helper_name or f"helper_{name}": helper}, **keywords
    )
    return patch


def _findings(found: list[Any], check: str) -> list[tuple[str, str]]:
    return [(f.patch, f.message) for f in found if f.check == check]


def test_stackable_patches_are_no_conflict_and_their_stack_is_reported(view: StaticView) -> None:
    with isolated_registry():
        outer = _patch("admission_log", stackable=True, order=10)
        inner = _patch("shortest_first", stackable=True)
        found = check_patches([inner, outer], view, None)
    assert _findings(found, "conflict") == []
    chain = "stack Scheduler.schedule: admission_log (order 10) \u2192 shortest_first \u2192 original"
    # helper is no override of the checked vLLM's: it is in no stack.
    assert sorted(_findings(found, "stack")) == [("admission_log", chain), ("shortest_first", chain)]


def test_stackable_patches_adding_one_helper_conflict(view: StaticView) -> None:
    with isolated_registry():
        found = check_patches(
            [_patch("one", helper_name="helper", stackable=True), _patch("two", helper_name="helper", stackable=True)],
            view,
            None,
        )
    ((patch, message),) = _findings(found, "conflict")
    assert patch == "two" and "fakevllm.sched:Scheduler.helper (owned by 'one')" in message


def test_a_plain_and_a_stackable_patch_on_one_member_still_conflict(view: StaticView) -> None:
    with isolated_registry():
        found = check_patches([_patch("plain"), _patch("layer", stackable=True)], view, None)
    ((patch, message),) = _findings(found, "conflict")
    assert patch == "layer" and "only overrides of stackable=True patches stack" in message


def test_patches_sharing_an_exclusive_token_conflict(view: StaticView) -> None:
    with isolated_registry():
        first = _patch("first", stackable=True, exclusive={"queue-sort"})
        other = type(VLLMPatch)("Other", (VLLMPatch["fakevllm.sched:Scheduler"],), {"x": 1}, exclusive={"queue-sort"})
        found = check_patches([first, other], view, None)
    ((patch, message),) = _findings(found, "conflict")
    assert patch == "Other" and "exclusive={'queue-sort'}" in message and "'first'" in message


class Local:
    def schedule(self, budget: int) -> int:
        return budget


def test_on_the_installed_vllm_the_stack_is_what_applying_the_selection_forms() -> None:
    target = f"{__name__}:Local"
    with isolated_registry():
        found = check_patches(
            [_patch("b_layer", target, stackable=True), _patch("a_layer", target, stackable=True)],
            InstalledView("0.32.0"),
            None,
        )
    chain = "stack Local.schedule: a_layer \u2192 b_layer \u2192 original"
    assert sorted(_findings(found, "stack")) == [("a_layer", chain), ("b_layer", chain)]
    assert _findings(found, "conflict") == []
