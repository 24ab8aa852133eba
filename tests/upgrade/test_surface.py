"""The patch's dependency surface (``vllm_custom_patches._upgrade.surface``).

Hand-made vLLM trees (a tiny ``vllm`` package, version A and B) give each
kind of finding on its own; patches are written as files in a package of
their own, imported, as authors write them.  The tests at the end read the
real vLLM 0.33.0 and 0.34.0 wheels with the catalogue's patches.
"""

from __future__ import annotations

import importlib
import itertools
import json
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vllm_custom_patches._upgrade.static import SourceTree, load_tree, wheel_cache_dir
from vllm_custom_patches._upgrade.surface import (
    Surface,
    SurfaceFinding,
    check_surface_json,
    compare,
    compute_surface,
    surface_from_json,
    surface_to_json,
)
from vllm_custom_patches.testing import isolated_registry

TARGET = "vllm.sched.scheduler:Scheduler"

TREE_A = {
    "vllm/__init__.py": "",
    "vllm/sched/__init__.py": "",
    "vllm/sched/queue.py": """
        def create_queue(policy):
            return []
    """,
    "vllm/sched/output.py": """
        from dataclasses import dataclass, field


        @dataclass
        class NewReq:
            req_id: str
            prompt: list[int]


        @dataclass
        class Cached:
            req_ids: list[str]
            resumed_ids: set[str]


        @dataclass
        class Output:
            new_reqs: list[NewReq]
            cached: Cached
            num_tokens: dict[str, int]
            old_field: int = 0
            blocks: list[int] = field(default_factory=list)
    """,
    "vllm/sched/base.py": """
        class Base:
            def __init__(self):
                self.running = []
                self.counter = 0

            def count_running(self):
                return len(self.running)
    """,
    "vllm/sched/scheduler.py": """
        from .base import Base
        from .output import Cached, Output
        from .queue import create_queue


        class Scheduler(Base):
            def __init__(self, policy):
                super().__init__()
                self.policy = policy
                self.waiting = create_queue(policy)
                self.holding = create_queue(policy)
                self.legacy = 0

            def schedule(self) -> Output:
                new = []
                while self.waiting:
                    request = self.waiting.pop(0)
                    self.running.append(request)
                    new.append(request)
                output = Output(new, Cached([], set()), {})
                self._after(output)
                return output

            def _after(self, output: Output) -> None:
                self.counter += 1

            def add(self, request):
                self.waiting.append(request)

            def counts(self):
                return len(self.running), len(self.waiting)

            def helper_called(self):
                return 1

            def unrelated(self):
                return self.counter

            def gone_toucher(self):
                self.waiting.clear()

            def peek(self):
                return self.waiting[0] if self.waiting else None

            def tally(self):
                self.counter = len(self.waiting)
    """,
}


def _b(**changes: str) -> dict[str, str]:
    return {**TREE_A, **changes}


# Version B: a sibling queue, a new member that re-sorts the waiting queue (and one in the base
# class), one that newly reads it, one changed, one gone, a member the policy calls gone, an
# attribute gone, fields gone.
TREE_B = _b(**{
    "vllm/sched/output.py": """
        from dataclasses import dataclass, field


        @dataclass
        class NewReq:
            req_id: str
            prompt: list[int]


        @dataclass
        class Cached:
            req_ids: list[str]


        @dataclass
        class Output:
            new_reqs: list[NewReq]
            cached: Cached
            num_tokens: dict[str, int]
            blocks: list[int] = field(default_factory=list)
    """,
    "vllm/sched/base.py": """
        class Base:
            def __init__(self):
                self.running = []
                self.counter = 0

            def count_running(self):
                return len(self.running)

            def drain(self):
                self.waiting.clear()
    """,
    "vllm/sched/scheduler.py": """
        from .base import Base
        from .output import Cached, Output
        from .queue import create_queue


        class Scheduler(Base):
            def __init__(self, policy):
                super().__init__()
                self.policy = policy
                self.waiting = create_queue(policy)
                self.holding = create_queue(policy)
                self.side = create_queue(policy)

            def schedule(self) -> Output:
                new = []
                self._resort()
                while self.waiting:
                    request = self.waiting.pop(0)
                    self.running.append(request)
                    new.append(request)
                output = Output(new, Cached([]), {})
                self._after(output)
                return output

            def _after(self, output: Output) -> None:
                self.counter += 1

            def _resort(self):
                self.waiting.sort(key=len)

            def add(self, request):
                self.waiting.append(request)

            def counts(self):
                return len(self.running), len(self.waiting) + len(self.side)

            def unrelated(self):
                return self.counter + len(self.waiting)

            def peek(self):
                return self.waiting[0] if self.waiting else None

            def tally(self):
                self.counter = len(self.waiting)
    """,
})  # fmt: skip

PATCHES = {
    "_helpers.py": """
        def reorder(queue):
            queue.sort(key=len)


        def snapshot(scheduler):
            return len(scheduler.waiting) + len(getattr(scheduler, "holding", ())), scheduler.counter


        def ids(output):
            return [r.req_id for r in output.new_reqs] + list(output.cached.resumed_ids)
    """,
    "policy.py": """
        from vllm_custom_patches import VLLMPatch

        from ._helpers import reorder


        class Policy(VLLMPatch["vllm.sched.scheduler:Scheduler"]):
            name = "policy"

            def schedule(self):
                reorder(self.waiting)
                self.helper_called()
                if self.legacy:
                    pass
                output = Policy.original("schedule")(self)
                return output.old_field, output
    """,
    "observer.py": """
        from vllm_custom_patches import VLLMPatch

        from ._helpers import ids, snapshot


        class Observer(VLLMPatch["vllm.sched.scheduler:Scheduler"]):
            name = "observer"

            def _after(self, output):
                record = (snapshot(self), ids(output), len(self.running))
                Observer.original("_after")(self, output)
                return record
    """,
}

_counter = itertools.count()


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


@pytest.fixture
def patches(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """The patches of PATCHES (and any added by the test), imported from files of their own package."""
    package = f"surface_patches_{next(_counter)}"
    root = tmp_path / "patch_root"

    def load(extra: dict[str, str] | None = None) -> dict[str, Any]:
        files = {f"{package}/__init__.py": ""} | {f"{package}/{n}": t for n, t in {**PATCHES, **(extra or {})}.items()}
        _write(root, files)
        found = {}
        for name in files:
            stem = Path(name).stem
            if stem.startswith("_"):
                continue
            module = importlib.import_module(f"{package}.{stem}")
            found.update({c._vcp_spec.name: c for c in vars(module).values() if hasattr(c, "_vcp_spec")})
        return found

    sys.path.insert(0, str(root))
    try:
        with isolated_registry():
            yield {"load": load}
    finally:
        sys.path.remove(str(root))
        for name in [m for m in sys.modules if m == package or m.startswith(f"{package}.")]:
            del sys.modules[name]


@pytest.fixture
def trees(tmp_path: Path) -> tuple[SourceTree, SourceTree]:
    return SourceTree(_write(tmp_path / "a", TREE_A)), SourceTree(_write(tmp_path / "b", TREE_B))


def _compare(patch: Any, a: SourceTree, b: SourceTree, *, locked: bool = False) -> list[SurfaceFinding]:
    base = compute_surface(patch, a)
    assert base is not None
    surface = compute_surface(patch, b, keep=base.members)
    assert surface is not None
    return compare(base, surface, base_label="A", label="B", locked=locked)


def _about(findings: list[SurfaceFinding], member: str) -> SurfaceFinding:
    (found,) = [f for f in findings if f.member == member]
    return found


# -- what the surface holds -------------------------------------------------------------------


def test_the_state_is_what_the_patch_and_its_helpers_read_and_write(patches: dict[str, Any], trees: Any) -> None:
    found = patches["load"]()
    surface = compute_surface(found["policy"], trees[0])
    assert surface is not None
    # reorder() in the patch's package sorts the queue it is given: the policy writes self.waiting.
    assert surface.state["waiting"].mode == "write"
    assert set(surface.state["waiting"].where) == {"Policy.schedule", "reorder"}
    assert surface.state["legacy"].mode == "read" and surface.state["legacy"].exists
    # A member taken from self is a call, not state; the members the patch replaces are not in it.
    assert "helper_called" not in surface.state and surface.members["helper_called"].called
    assert "schedule" in surface.overridden and "schedule" not in surface.members
    observer = compute_surface(found["observer"], trees[0])
    assert observer is not None
    assert {a: (u.mode, u.optional) for a, u in observer.state.items()} == {
        "waiting": ("read", False),
        "holding": ("read", True),  # getattr with a default
        "running": ("read", False),
        "counter": ("read", False),
    }


def test_members_touching_the_state_follow_data_dependences(patches: dict[str, Any], trees: Any) -> None:
    found = patches["load"]()
    policy = compute_surface(found["policy"], trees[0])
    assert policy is not None
    # The policy writes self.waiting: every member reading or writing it, in the target or its bases.
    assert {n for n, m in policy.members.items() if "waiting" in m.touches} == {
        "__init__", "add", "counts", "gone_toucher", "peek", "tally",
    }  # fmt: skip
    assert policy.members["peek"].touches == {"waiting": "read"}  # a subscript and a test read it
    assert policy.members["add"].touches["waiting"] == "write"  # a method called on it
    observer = compute_surface(found["observer"], trees[0])
    assert observer is not None
    # The observer only reads: the members that only read what it reads are not in its surface.
    assert "peek" not in observer.members and "counts" not in observer.members
    assert {"add", "gone_toucher", "schedule", "__init__"} <= set(observer.members)


def test_a_member_is_resolved_through_the_bases(patches: dict[str, Any], trees: Any) -> None:
    found = patches["load"]()
    surface = compute_surface(found["observer"], trees[0])
    assert surface is not None
    assert surface.members["__init__"].defined_in == TARGET
    base = compute_surface(found["policy"], trees[1])
    assert base is not None and base.members["drain"].defined_in == "vllm.sched.base:Base"


# -- the findings, one kind at a time ------------------------------------------------------------


def test_a_member_that_newly_touches_what_the_patch_writes(patches: dict[str, Any], trees: Any) -> None:
    findings = _compare(patches["load"]()["policy"], *trees)
    resort = _about(findings, "_resort")
    assert resort.severity == "warning"
    assert resort.message == (
        "Scheduler._resort is new since A: it writes self.waiting (the patch writes self.waiting)"
    )
    assert "self.waiting.sort(key=len)" in resort.detail  # the new member's code
    # New in a base class: found through the MRO.
    assert _about(findings, "drain").message.startswith("Scheduler.drain is new since A: it writes self.waiting")
    # An existing member that did not touch the state and now reads it.
    unrelated = _about(findings, "unrelated")
    assert unrelated.message == (
        "Scheduler.unrelated now reads self.waiting (the patch writes self.waiting) (it did not on A)"
    )
    assert "return self.counter + len(self.waiting)" in unrelated.detail


def test_a_changed_member_comes_with_its_diff(patches: dict[str, Any], trees: Any) -> None:
    counts = _about(_compare(patches["load"]()["policy"], *trees), "counts")
    assert counts.severity == "warning"
    assert counts.message.startswith(
        "Scheduler.counts, which reads self.waiting (the patch writes self.waiting), changed"
    )
    assert counts.detail.startswith("--- counts (A)\n+++ counts (B)\n")
    assert "+    return len(self.running), len(self.waiting) + len(self.side)\n" in counts.detail


def test_a_removed_member_and_a_removed_member_the_patch_calls(patches: dict[str, Any], trees: Any) -> None:
    findings = _compare(patches["load"]()["policy"], *trees)
    gone = _about(findings, "gone_toucher")
    assert (gone.severity, gone.message) == (
        "warning",
        "Scheduler.gone_toucher, which writes self.waiting (the patch writes self.waiting) on A, is gone on B",
    )
    called = _about(findings, "helper_called")
    assert called.severity == "error" and called.message.endswith("the patch calls it on A, is gone on B")


def test_an_attribute_the_patch_uses_that_no_longer_exists_is_an_error(patches: dict[str, Any], trees: Any) -> None:
    legacy = _about(_compare(patches["load"]()["policy"], *trees), "legacy")
    assert legacy.severity == "error"
    assert legacy.message == (
        "self.legacy, which the patch reads (in Policy.schedule), is set nowhere in Scheduler or its bases on B "
        "(it was on A): renamed or removed"
    )


def test_an_attribute_the_patch_creates_itself_is_not_missing(patches: dict[str, Any], trees: Any) -> None:
    own = """
        from vllm_custom_patches import VLLMPatch


        class Own(VLLMPatch["vllm.sched.scheduler:Scheduler"]):
            name = "own"

            def add(self, request):
                self._own_count = getattr(self, "_own_count", 0) + 1
                return Own.original("add")(self, request)
    """
    patch = patches["load"]({"own.py": own})["own"]
    surface = compute_surface(patch, trees[0])
    assert surface is not None and not surface.state["_own_count"].exists
    assert [f for f in _compare(patch, *trees) if f.severity != "info"] == []


def test_a_sibling_created_like_a_used_attribute(patches: dict[str, Any], trees: Any) -> None:
    found = patches["load"]()
    side = _about(_compare(found["policy"], *trees), "side")
    assert side.severity == "warning"
    assert side.message == (
        "a sibling of self.waiting appeared: Scheduler creates self.side with create_queue(...) in __init__, as it "
        "does self.waiting (not on A); the patch writes self.waiting only, so what vLLM keeps in self.side escapes it"
    )
    # holding was already a sibling on A: not reported.  The observer reads both queues: one finding.
    observer_side = _about(_compare(found["observer"], *trees), "side")
    assert observer_side.severity == "warning" and "a sibling of self.holding and self.waiting" in observer_side.message


def test_a_sibling_the_patch_already_uses_is_only_noted(patches: dict[str, Any], trees: Any) -> None:
    both = """
        from vllm_custom_patches import VLLMPatch


        class Both(VLLMPatch["vllm.sched.scheduler:Scheduler"]):
            name = "both"

            def schedule(self):
                for queue in (self.waiting, getattr(self, "side", [])):
                    queue.sort(key=len)
                return Both.original("schedule")(self)
    """
    side = _about(_compare(patches["load"]({"both.py": both})["both"], *trees), "side")
    assert side.severity == "info" and side.message.endswith("the patch uses self.side too")


def test_a_field_of_an_annotated_value_that_is_gone_is_an_error(patches: dict[str, Any], trees: Any) -> None:
    found = patches["load"]()
    # The original's return annotation (-> Output) types what Policy.original("schedule") returns.
    old_field = _about(_compare(found["policy"], *trees), "old_field")
    assert old_field.severity == "error"
    assert old_field.message == (
        "the patch reads schedule().old_field (in Policy.schedule): Output has no field 'old_field' on B (it had on A)"
    )
    # The original's parameter annotation (_after(self, output: Output)) types the observer's
    # parameter, followed into a helper and through a field (cached: Cached).
    resumed = _about(_compare(found["observer"], *trees), "resumed_ids")
    assert resumed.severity == "error"
    assert resumed.message.startswith("the patch reads _after(output).cached.resumed_ids (in ids): Cached has no field")
    surface = compute_surface(found["observer"], trees[1])
    assert surface is not None
    # Iterating a list[NewReq] field types its items.
    assert surface.fields["_after(output).new_reqs[].req_id"].exists


def test_the_patchs_own_annotations_type_values(patches: dict[str, Any], trees: Any) -> None:
    annotated = """
        from __future__ import annotations

        from typing import TYPE_CHECKING

        from vllm_custom_patches import VLLMPatch

        if TYPE_CHECKING:
            from vllm.sched.output import Output


        class Annotated(VLLMPatch["vllm.sched.scheduler:Scheduler"]):
            name = "annotated"

            def counts(self):
                latest: Output | None = self.__dict__.get("latest")
                return latest.blocks if latest else Annotated.original("counts")(self), latest.old_field
    """
    patch = patches["load"]({"annotated.py": annotated})["annotated"]
    surface = compute_surface(patch, trees[0])
    assert surface is not None
    assert set(surface.fields) == {"Annotated.counts:latest.blocks", "Annotated.counts:latest.old_field"}
    assert [f.member for f in _compare(patch, *trees) if f.severity == "error"] == ["old_field"]


def test_locked_drift_is_an_error_and_missing_things_are_errors_either_way(patches: dict[str, Any], trees: Any) -> None:
    policy = patches["load"]()["policy"]
    unlocked = {f.member: f.severity for f in _compare(policy, *trees)}
    locked = {f.member: f.severity for f in _compare(policy, *trees, locked=True)}
    assert unlocked == {
        "_resort": "warning", "drain": "warning", "unrelated": "warning", "counts": "warning",
        "gone_toucher": "warning", "side": "warning", "__init__": "warning",
        "helper_called": "error", "legacy": "error", "old_field": "error",
    }  # fmt: skip
    assert locked == dict.fromkeys(unlocked, "error")


def test_an_observer_is_not_alarmed_by_changes_to_code_that_writes_what_it_reads(
    patches: dict[str, Any], tmp_path: Path
) -> None:
    # B: only the writers of what the observer reads changed (and its hooked member did not).
    changed = (
        TREE_A["vllm/sched/scheduler.py"]
        .replace("self.waiting.append(request)", "self.waiting.insert(0, request)")
        .replace("self.waiting.clear()", "del self.waiting[:]")
        .replace("self.counter = len(self.waiting)", "self.counter = len(self.waiting) + 1")
    )
    a = SourceTree(_write(tmp_path / "a", TREE_A))
    b = SourceTree(_write(tmp_path / "b", {**TREE_A, "vllm/sched/scheduler.py": changed}))
    findings = _compare(patches["load"]()["observer"], a, b)
    assert {f.member: f.severity for f in findings} == {"add": "info", "gone_toucher": "info", "tally": "info"}
    assert _about(findings, "add").message == (
        "Scheduler.add, which writes self.waiting (the patch reads self.waiting), changed since A"
    )
    # What tally reads of what the observer reads does not matter to it; what it writes does.
    assert _about(findings, "tally").message == (
        "Scheduler.tally, which writes self.counter (the patch reads self.counter), changed since A"
    )
    # The same change under a policy that writes the queue is a warning.
    policy = {f.member: f.severity for f in _compare(patches["load"]()["policy"], a, b)}
    assert policy == {"add": "warning", "gone_toucher": "warning", "tally": "warning"}


def test_a_patch_that_changed_since_its_lock_is_told_to_lock_again(patches: dict[str, Any], trees: Any) -> None:
    # Locked when it only read the queue; it now reorders it: peek (unchanged in vLLM) reads it.
    found = patches["load"]()
    locked = compute_surface(found["observer"], trees[0])
    now = compute_surface(found["policy"], trees[0])
    assert locked is not None and now is not None
    peek = _about(compare(locked, now, base_label="A", label="A", locked=True), "peek")
    assert (peek.severity, peek.message) == (
        "info",
        "Scheduler.peek reads self.waiting (the patch writes self.waiting): the patch's use of it is not in the "
        "surface of A (lock again to record it)",
    )


def test_nothing_changed_nothing_reported(patches: dict[str, Any], trees: Any) -> None:
    for patch in patches["load"]().values():
        assert _compare(patch, trees[0], trees[0], locked=True) == []


def test_helpers_outside_the_patchs_package_are_not_followed(patches: dict[str, Any], trees: Any) -> None:
    outside = """
        import random

        from vllm_custom_patches import VLLMPatch


        class Outside(VLLMPatch["vllm.sched.scheduler:Scheduler"]):
            name = "outside"

            def schedule(self):
                random.shuffle(self.waiting)  # out of the package: taken as a read
                return Outside.original("schedule")(self)
    """
    surface = compute_surface(patches["load"]({"outside.py": outside})["outside"], trees[0])
    assert surface is not None and surface.state["waiting"].mode == "read"


# -- the lock's part ---------------------------------------------------------------------------


def test_a_surface_survives_the_lock_file_round_trip(patches: dict[str, Any], trees: Any) -> None:
    for patch in patches["load"]().values():
        base = compute_surface(patch, trees[0])
        assert base is not None
        data = json.loads(json.dumps(surface_to_json(base)))
        check_surface_json(data, "surface", _bad)
        stored = surface_from_json(data, base.target)
        surface = compute_surface(patch, trees[1], keep=stored.members)
        assert surface is not None
        # From the lock, the same findings as from the tree (the lock keeps sources where it reports diffs).
        assert compare(stored, surface, base_label="A", label="B", locked=True) == compare(
            base, surface, base_label="A", label="B", locked=True
        )


class _Bad(Exception):
    pass


def _bad(key: str, problem: str) -> Exception:
    return _Bad(f"{key}: {problem}")


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda d: d.pop("known"), "surface: expected the keys complete, fields, known, members, overridden, siblings"),
        (lambda d: d["state"]["waiting"].update(mode="sorts"), "surface.state['waiting'].mode: 'sorts' is neither"),
        (lambda d: d["state"].update({"no good": d["state"]["waiting"]}), "surface.state['no good']: 'no good' is not"),
        (lambda d: d["members"]["add"].update(called="yes"), "surface.members['add'].called: expected a boolean"),
        (lambda d: d["members"]["add"].update(source="def (:"), "surface.members['add'].source: it does not parse"),
        (lambda d: d["members"]["add"].update(defined_in="Scheduler"), "surface.members['add'].defined_in: 'Sched"),
        (lambda d: d["members"]["add"]["touches"].update(waiting=1), "surface.members['add'].touches['waiting']: exp"),
        (lambda d: d["siblings"]["waiting"].update(attributes="side"), "surface.siblings['waiting'].attributes: exp"),
        (lambda d: d.update(fields=[]), "surface.fields: expected an object, found an array"),
        (lambda d: d.update(complete=None), "surface.complete: expected a boolean, found null"),
    ],
)
def test_a_malformed_surface_is_refused_naming_the_key(
    patches: dict[str, Any], trees: Any, mutate: Any, expected: str
) -> None:
    surface = compute_surface(patches["load"]()["policy"], trees[0])
    assert surface is not None
    data = json.loads(json.dumps(surface_to_json(surface)))
    check_surface_json(data, "surface", _bad)
    mutate(data)
    with pytest.raises(_Bad) as caught:
        check_surface_json(data, "surface", _bad)
    assert str(caught.value).startswith(expected)


def test_a_patch_without_source_on_disk_has_a_partial_surface(patches: dict[str, Any], trees: Any) -> None:
    with isolated_registry():
        namespace: dict[str, Any] = {}
        exec(
            "from vllm_custom_patches import VLLMPatch\n"
            "class NoSource(VLLMPatch['vllm.sched.scheduler:Scheduler']):\n"
            "    def schedule(self):\n"
            "        return self.waiting\n",
            namespace,
        )
        assert compute_surface(namespace["NoSource"], trees[0]) is None  # nothing to say
        helper = patches["load"]()["policy"]
        namespace["helper"] = helper
        exec(
            "class Mixed(VLLMPatch['vllm.sched.scheduler:Scheduler']):\n"
            "    def add(self, request):\n"
            "        return helper.original('add')(self, request)\n"
            "    schedule = helper.schedule\n",
            namespace,
        )
        surface = compute_surface(namespace["Mixed"], trees[0])
    # Some of its code read: a surface, marked partial, and doctor says so.
    assert surface is not None and not surface.complete and "waiting" in surface.state
    assert compare(surface, surface, base_label="A", label="A", locked=True) == [
        SurfaceFinding("info", "part of the patch's code has no source on disk: its surface is partial")
    ]
    assert compute_surface(helper, SourceTree(Path("/nonexistent"))) is None


# -- the real vLLM 0.33.0 and 0.34.0 -----------------------------------------------------------


def _wheel(version: str) -> SourceTree:
    found = sorted(wheel_cache_dir().glob(f"vllm-{version}-*.whl"))
    if not found:
        pytest.fail(
            f"the vLLM {version} wheel is not in {wheel_cache_dir()}: run scripts/fetch-vllm-wheel.sh .venv {version}"
        )
    return load_tree(found[-1])


@pytest.fixture(scope="module")
def real() -> tuple[SourceTree, SourceTree]:
    return _wheel("0.33.0"), _wheel("0.34.0")


def _catalogue(name: str) -> Any:
    module = importlib.import_module(f"vllm_custom_patches_catalogue.{name}")
    return next(c for c in vars(module).values() if getattr(c, "_vcp_spec", None) and c._vcp_spec.name == name)


def _real(name: str, real: tuple[SourceTree, SourceTree]) -> tuple[Surface, list[SurfaceFinding]]:
    base = compute_surface(_catalogue(name), real[0])
    assert base is not None
    surface = compute_surface(_catalogue(name), real[1], keep=base.members)
    assert surface is not None
    return surface, compare(base, surface, base_label="vLLM 0.33.0", label="vLLM 0.34.0", locked=False)


@pytest.mark.vllm
@pytest.mark.parametrize("name", ["shortest_prompt_first", "fair_share"])
def test_real_the_policies_hear_of_the_new_waiting_queue_and_reordering(
    name: str, real: tuple[SourceTree, SourceTree]
) -> None:
    surface, findings = _real(name, real)
    assert surface.state["waiting"].mode == "write"
    by_member = {f.member: f for f in findings}
    assert by_member["_reorder_waiting_by_cached_prefix"].severity == "warning"
    assert by_member["_reorder_waiting_by_cached_prefix"].message.startswith(
        "Scheduler._reorder_waiting_by_cached_prefix is new since vLLM 0.33.0: it writes self.waiting"
    )
    assert by_member["_next_waiting_queue"].message.startswith(
        "Scheduler._next_waiting_queue is new since vLLM 0.33.0: it reads self.waiting"
    )
    sibling = by_member["async_kv_waiting"]
    assert "creates self.async_kv_waiting with create_request_queue(...) in __init__" in sibling.message
    # A warning while the patch ignores the new queue; a note once it handles it.
    handled = "async_kv_waiting" in surface.state
    assert sibling.severity == ("info" if handled else "warning")
    assert not [f for f in findings if f.severity == "error"]


@pytest.mark.vllm
def test_real_the_trace_hears_of_the_sibling_queue_and_nothing_else(real: tuple[SourceTree, SourceTree]) -> None:
    surface, findings = _real("scheduler_trace", real)
    assert all(use.mode == "read" for use in surface.state.values())
    assert all(use.exists for path, use in surface.fields.items())
    loud = [f for f in findings if f.severity != "info"]
    # Its hooked member (_update_after_schedule) and what it reads did not change: the only
    # finding above info is the new sibling of the queues it counts, unless it counts it already.
    if "async_kv_waiting" in surface.state:
        assert loud == []
    else:
        assert [f.member for f in loud] == ["async_kv_waiting"]
    assert {f.member for f in findings if f.severity == "info"} >= {"schedule", "_reorder_waiting_by_cached_prefix"}


@pytest.mark.vllm
def test_real_removed_scheduler_output_fields_are_errors(
    patches: dict[str, Any], real: tuple[SourceTree, SourceTree]
) -> None:
    reader = """
        from vllm_custom_patches import VLLMPatch


        class Reader(VLLMPatch["vllm.v1.core.sched.scheduler:Scheduler"]):
            name = "reader"

            def _update_after_schedule(self, scheduler_output):
                cached = scheduler_output.scheduled_cached_reqs
                seen = (cached.req_ids, cached.resumed_req_ids, cached.all_token_ids,
                        scheduler_output.num_common_prefix_blocks, scheduler_output.ec_manager_metadata,
                        scheduler_output.num_scheduled_tokens)
                Reader.original("_update_after_schedule")(self, scheduler_output)
                return seen
    """
    patch = patches["load"]({"reader.py": reader})["reader"]
    base = compute_surface(patch, real[0])
    assert base is not None
    surface = compute_surface(patch, real[1], keep=base.members)
    assert surface is not None
    findings = compare(base, surface, base_label="vLLM 0.33.0", label="vLLM 0.34.0", locked=False)
    assert sorted(f.member for f in findings if f.severity == "error") == [
        "all_token_ids", "ec_manager_metadata", "num_common_prefix_blocks", "resumed_req_ids",
    ]  # fmt: skip
    (resumed,) = [f for f in findings if f.member == "resumed_req_ids"]
    assert resumed.message.startswith(
        "the patch reads _update_after_schedule(scheduler_output).scheduled_cached_reqs.resumed_req_ids "
        "(in Reader._update_after_schedule): CachedRequestData has no field 'resumed_req_ids' on vLLM 0.34.0"
    )


# -- through the command: lock records the surface, doctor compares with it -----------------------

POLICY_FILE = """
from vllm_custom_patches import VLLMPatch


def reorder(queue):
    queue.sort(key=len)


class Policy(VLLMPatch["vllm.sched.scheduler:Scheduler"]):
    name = "Policy"

    def schedule(self):
        reorder(self.waiting)
        if self.legacy:
            pass
        output = Policy.original("schedule")(self)
        return output.old_field, output
"""


@pytest.fixture
def command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path, Path]:
    """(vLLM 1.0.0 = TREE_A, vLLM 2.0.0 = TREE_B, the patch directory) for the command, run in this process;
    the installed vLLM's version is 2.0.0, so only a lock or --baseline is a baseline."""
    a = _write(tmp_path / "a", {**TREE_A, "vllm/_version.py": "__version__ = '1.0.0'\n"})
    b = _write(tmp_path / "b", {**TREE_B, "vllm/_version.py": "__version__ = '2.0.0'\n"})
    patches = _write(tmp_path / "patches", {"policy_file.py": POLICY_FILE})
    monkeypatch.setenv("VLLM_CUSTOM_PATCHES_PATH", str(patches))
    monkeypatch.setenv("VLLM_CUSTOM_PATCHES_VLLM_VERSION", "2.0.0")
    for name in ("VLLM_CUSTOM_PATCHES", "VLLM_CUSTOM_PATCHES_LOCK_DIR"):
        monkeypatch.delenv(name, raising=False)
    return a, b, patches


def _main(args: list[str]) -> int:
    from vllm_custom_patches._cli import main as cli

    for name in [
        n for n, m in sys.modules.items() if Path(getattr(m, "__file__", None) or "").name == "policy_file.py"
    ]:
        del sys.modules[name]  # a fresh process would import the patch file again
    return cli.main(args)


def _surface_findings(out: str) -> dict[str, str]:
    return {f["member"]: f["severity"] for f in json.loads(out)["findings"] if f["check"] == "surface" and f["member"]}


def test_lock_records_the_surface_and_doctor_holds_the_next_vllm_to_it(
    command: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    a, b, patches = command
    assert _main(["lock", "Policy", "--vllm-source", str(a)]) == 0
    assert "schedule and its dependency surface -> " in capsys.readouterr().out
    entry = json.loads((patches / "policy_file.lock.json").read_text())["patches"]["Policy"]["versions"]["1.0.0"]
    assert entry["surface"]["state"]["waiting"] == {"mode": "write", "optional": False, "exists": True}
    assert _main(["doctor", "Policy", "--vllm-source", str(b), "--json"]) == 1
    out = capsys.readouterr().out
    # Locked: drift of the surface is an error, like drift of a locked member.
    assert _surface_findings(out) == dict.fromkeys(
        ["__init__", "_resort", "counts", "drain", "gone_toucher", "legacy", "old_field", "side", "unrelated"], "error"
    )
    report = json.loads(out)
    assert "its dependency surface measured against vLLM 1.0.0 (locked)" in [f["message"] for f in report["findings"]]
    assert any("Scheduler._resort is new since vLLM 1.0.0 (locked)" in e for e in report["patches"]["Policy"]["errors"])
    assert _main(["doctor", "Policy", "--vllm-source", str(b)]) == 1
    text = capsys.readouterr().out
    assert "  ERROR   [surface] a sibling of self.waiting appeared: Scheduler creates self.side" in text
    assert "      +    return len(self.running), len(self.waiting) + len(self.side)" in text  # the diff, indented
    # The same vLLM as locked: nothing to say.
    _main(["doctor", "Policy", "--vllm-source", str(a), "--json"])
    same = capsys.readouterr().out
    assert _surface_findings(same) == {} and json.loads(same)["patches"]["Policy"]["errors"] == []


def test_against_a_baseline_vllm_surface_drift_is_a_warning(
    command: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    a, b, _ = command
    assert _main(["doctor", "Policy", "--vllm-source", str(b), "--baseline", str(a), "--json"]) == 1
    found = _surface_findings(capsys.readouterr().out)
    # What no longer exists is an error either way; the rest, unlocked, warnings.
    assert {m for m, s in found.items() if s == "error"} == {"legacy", "old_field"}
    assert {m for m, s in found.items() if s == "warning"} == {
        "__init__", "_resort", "counts", "drain", "gone_toucher", "side", "unrelated",
    }  # fmt: skip


def test_without_a_baseline_doctor_says_the_surface_was_not_checked(patches: dict[str, Any], trees: Any) -> None:
    from vllm_custom_patches._upgrade.doctor import check_patches
    from vllm_custom_patches._upgrade.fingerprint import PatchVersion, lock_entry, lock_path, write_lock
    from vllm_custom_patches._upgrade.vllm_views import StaticView

    policy = patches["load"]()["policy"]
    a, b = StaticView(trees[0].root, "1.0.0"), StaticView(trees[1].root, "2.0.0")

    def surface_findings(view: StaticView) -> list[tuple[str, str]]:
        return [(f.severity, f.message) for f in check_patches([policy], view, None) if f.check == "surface"]

    # Not locked, no baseline: the patch's warning that drift was not checked says it; the surface adds a note.
    ((severity, message),) = surface_findings(b)
    assert severity == "info" and message.startswith(
        "no baseline for its dependency surface: semantic drift not checked (not locked;"
    )
    # Locked by a lock that records no surface (written before there was one): a warning of its own.
    module_file = sys.modules[policy.__module__].__file__
    assert module_file is not None
    entry = lock_entry({}, vllm="1.0.0", patch=PatchVersion(None, "a test"))
    write_lock(lock_path(module_file), "policy", TARGET, "1.0.0", entry)
    ((severity, message),) = surface_findings(b)
    assert severity == "warning" and "(the lock at vLLM 1.0.0 records none;" in message
    # Checked on the release it was locked at: nothing can have drifted.
    assert surface_findings(a) == []
