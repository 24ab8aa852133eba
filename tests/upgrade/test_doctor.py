"""``doctor``'s rules on small synthetic "vLLM" source trees, read statically (no vLLM needed).

The same checks against the real vLLM 0.32.0 and 0.33.0 are in
``tests/real_vllm/test_vllm_doctor.py``.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from vllm_custom_patches import VLLMPatch
from vllm_custom_patches._upgrade.doctor import DoctorReport, cell_of, check_environment, check_patches, summary_of
from vllm_custom_patches._upgrade.fingerprint import (
    LockedMember,
    PatchVersion,
    fingerprint,
    lock_entry,
    lock_path,
    pick_version,
    read_lock,
    read_locks,
    user_lock_path,
    write_lock,
)
from vllm_custom_patches._upgrade.vllm_views import StaticView
from vllm_custom_patches.testing import isolated_registry

V1 = {
    "fakevllm/__init__.py": "",
    "fakevllm/sched/__init__.py": "",
    "fakevllm/sched/base.py": """
        class Base:
            def step(self, budget):
                return budget
    """,
    "fakevllm/sched/scheduler.py": """
        from .base import Base

        class Scheduler(Base):
            def schedule(self, throttle=False):
                \"\"\"Pick requests.\"\"\"
                return [throttle]

            def step(self, budget):
                return budget * 2
    """,
    "fakevllm/sched/fast.py": """
        from fakevllm.sched.scheduler import Scheduler

        class Fast(Scheduler):
            def schedule(self, throttle=False):
                return super().schedule(throttle)

        class Rogue(Scheduler):
            def schedule(self, throttle=False):
                return []
    """,
}


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


@pytest.fixture
def v1(tmp_path: Path) -> StaticView:
    return StaticView(_tree(tmp_path / "v1", V1), "1.0.0")


@pytest.fixture
def v2(tmp_path: Path) -> StaticView:
    files = dict(V1)
    # 2.0: schedule's body changed (the docstring and formatting alone would not count), and
    # Scheduler.step is gone: the member is now only inherited from Base.
    files["fakevllm/sched/scheduler.py"] = """
        from .base import Base

        class Scheduler(Base):
            def schedule(self, throttle=False, priority=None):
                return [throttle, priority]
    """
    return StaticView(_tree(tmp_path / "v2", files), "2.0.0")


def _patch(body: str, name: str = "probe") -> Any:
    namespace: dict[str, Any] = {"VLLMPatch": VLLMPatch}
    source = f"class Probe(VLLMPatch['fakevllm.sched.scheduler:Scheduler']):\n    name = {name!r}\n" + textwrap.indent(
        textwrap.dedent(body), "    "
    )
    exec(compile(source, f"<{name}>", "exec"), namespace)
    return namespace["Probe"]


def _by_check(findings: list[Any]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for finding in findings:
        out.setdefault(finding.check, []).append(finding)
    return out


def test_reach_is_an_error_for_a_subclass_that_never_calls_the_patched_member(v1: StaticView) -> None:
    with isolated_registry():
        probe = _patch("def schedule(self, *args, **kwargs):\n    return []\n")
        found = _by_check(check_patches([probe], v1, None))
    reach = {(f.severity, f.message.split(" ")[0]) for f in found["reach"]}
    assert reach == {("info", "fakevllm.sched.fast:Fast"), ("error", "fakevllm.sched.fast:Rogue")}
    assert "signature" not in found and "member" not in found


def test_an_override_missing_a_parameter_is_an_error_and_a_gained_one_is_named(v1: StaticView, v2: StaticView) -> None:
    with isolated_registry():
        probe = _patch("def schedule(self, throttle=False):\n    return []\n")
        assert "signature" not in _by_check(check_patches([probe], v1, None))
        errors = _by_check(check_patches([probe], v2, None))["signature"]
    (error,) = errors
    assert error.severity == "error" and "'priority'" in error.message


def test_against_a_lock_a_moved_member_and_a_changed_locked_original_are_errors(
    v1: StaticView, v2: StaticView, tmp_path: Path
) -> None:
    module_file = tmp_path / "probe_patch.py"
    module_file.write_text("# the patch's module\n")
    with isolated_registry():
        probe = _patch("def schedule(self, *args, **kwargs):\n    return []\n\ndef step(self, budget):\n    return 0\n")
        import sys
        import types

        module = types.ModuleType("probe_patch")
        module.__file__ = str(module_file)
        probe.__module__ = "probe_patch"
        sys.modules["probe_patch"] = module
        try:
            locked = {}
            for member in ("schedule", "step"):
                original = v1.member("fakevllm.sched.scheduler:Scheduler", "probe", member)
                assert original is not None and original.source is not None
                locked[member] = LockedMember(fingerprint(original.source), original.defined_in, original.source)
            entry = lock_entry(locked, vllm="1.0.0", patch=PatchVersion("0.1", "a test"))
            write_lock(lock_path(module_file), "probe", "fakevllm.sched.scheduler:Scheduler", "1.0.0", entry)
            assert set(read_lock(module_file, "probe")["1.0.0"]) == {"schedule", "step"}
            same = _by_check(check_patches([probe], v1, None))
            assert not {"drift", "moved", "signature", "member"} & same.keys(), same  # the lock matches 1.0
            (baseline,) = same["baseline"]  # named: the lock, for both members
            assert baseline.severity == "info" and baseline.members == ("schedule", "step")
            assert baseline.baseline == "vLLM 1.0.0 as locked in probe_patch.lock.json, shipped with the patch"
            found = _by_check(check_patches([probe], v2, None))
        finally:
            del sys.modules["probe_patch"]
    (moved,) = found["moved"]
    assert moved.member == "step" and moved.severity == "error"
    assert (
        "defined in the target itself on vLLM 1.0.0 (locked), inherited from fakevllm.sched.base:Base here"
        in moved.message
    )
    drift = {f.member: f for f in found["drift"]}
    assert (
        drift["schedule"].severity == "error"
        and "+def schedule(self, throttle=False, priority=None):\n" in drift["schedule"].detail
    )
    assert "-    return [throttle]\n+" in drift["schedule"].detail


def test_the_fingerprint_ignores_docstrings_comments_and_formatting() -> None:
    a = 'def f(self, x):\n    """Doc."""\n    # why\n    return x  +  1\n'
    b = "def f(self, x):\n    return (x + 1)\n"
    assert fingerprint(a) == fingerprint(b)
    assert fingerprint(b) != fingerprint("def f(self, x):\n    return x + 2\n")


def test_two_selected_patches_on_one_member_conflict_when_read_statically(v1: StaticView) -> None:
    with isolated_registry():
        first = _patch("def schedule(self, *a, **k):\n    return []\n", "first")
        second = _patch("def schedule(self, *a, **k):\n    return []\n", "second")
        conflicts = _by_check(check_patches([first, second], v1, None))["conflict"]
        assert "conflict" not in _by_check(check_patches([first, second], v1, None, together=False))
    (conflict,) = conflicts
    assert conflict.patch == "second" and "'first'" in conflict.message


def test_a_missing_target_is_an_error(v1: StaticView) -> None:
    with isolated_registry():
        namespace: dict[str, Any] = {"VLLMPatch": VLLMPatch}
        exec("class Lost(VLLMPatch['fakevllm.sched.scheduler:Gone']):\n    def f(self):\n        pass\n", namespace)
        (finding,) = check_patches([namespace["Lost"]], v1, None)
    assert (finding.severity, finding.check) == ("error", "target")
    assert "fakevllm.sched.scheduler:Gone is not defined" in finding.message


@pytest.mark.parametrize(
    ("plugins", "expected"),
    [
        (None, None),
        ("custom_patches", None),
        ("a,custom_patches", None),
        ("a, custom_patches", "with a space, which vLLM does not strip; write VLLM_PLUGINS=a,custom_patches"),
        ("a", "add it: VLLM_PLUGINS=a,custom_patches"),
        ("", "add it: VLLM_PLUGINS=custom_patches"),
    ],
)
def test_vllm_plugins_must_list_the_plugin_exactly(plugins: str | None, expected: str | None) -> None:
    environ = {} if plugins is None else {"VLLM_PLUGINS": plugins}
    messages = [f.message for f in check_environment(environ) if f.check == "plugin"]
    if expected is None:
        assert messages == []
    else:
        (message,) = messages
        assert expected in message


# -- baselines (issue 18 item 2) and locks of one's own (item 4) ------------------------------------


def test_pick_version_takes_the_same_release_else_the_one_it_comes_from_else_the_oldest() -> None:
    locked = dict.fromkeys(["0.32.0", "0.33.0"])
    assert pick_version(locked, "0.33.0") == "0.33.0"
    assert pick_version(locked, "0.34.0") == "0.33.0"  # an upgrade: compared with the newest before it
    assert pick_version(locked, "0.32.5") == "0.32.0"
    assert pick_version(locked, "0.31.0") == "0.32.0"  # an older vLLM: the oldest lock
    assert pick_version({}, "1.0") is None


def _lock(path: Path, version: str, member: str, source: str, patch: str = "probe") -> None:
    locked = {member: LockedMember(fingerprint(source), "fakevllm.sched.scheduler:Scheduler", source)}
    entry = lock_entry(locked, vllm=version, patch=PatchVersion(None, "a test"))
    write_lock(path, patch, "fakevllm.sched.scheduler:Scheduler", version, entry)


def test_a_lock_dir_entry_wins_over_the_shipped_one(tmp_path: Path) -> None:
    module_file = tmp_path / "pkg" / "probe_patch.py"
    module_file.parent.mkdir()
    _lock(lock_path(module_file), "1.0.0", "schedule", "def schedule(self):\n    return 1\n")
    _lock(lock_path(module_file), "2.0.0", "schedule", "def schedule(self):\n    return 2\n")
    ops = tmp_path / "ops"
    _lock(user_lock_path(ops, "probe"), "2.0.0", "step", "def step(self):\n    return 3\n")
    locks = read_locks("probe", module_file, ops)
    assert {v: (lv.owner, sorted(lv.members)) for v, lv in locks.items()} == {
        "1.0.0": ("package", ["schedule"]),
        "2.0.0": ("user", ["step"]),  # whole: the shipped 2.0.0 entry is not mixed in
    }
    assert locks["2.0.0"].where() == str(ops / "probe.lock.json")
    assert locks["1.0.0"].where() == "probe_patch.lock.json, shipped with the patch"
    assert set(read_locks("probe", module_file)) == {"1.0.0", "2.0.0"}  # without the lock dir: the shipped ones
    _lock(user_lock_path(tmp_path / "ops-1.0", "probe"), "1.0.0", "step", "def step(self):\n    return 3\n")
    # The baseline: what the ops team reviewed (1.0.0), not the author's newer lock (2.0.0), even for 2.0.0.
    assert pick_version(read_locks("probe", module_file, tmp_path / "ops-1.0"), "2.0.0") == "1.0.0"
    assert pick_version(read_locks("probe", module_file), "2.0.0") == "2.0.0"


def test_the_baseline_of_each_member_is_named_and_a_member_without_one_is_a_warning(
    v1: StaticView, v2: StaticView
) -> None:
    with isolated_registry():
        probe = _patch("def schedule(self, *a, **k):\n    return []\n\ndef step(self, budget):\n    return 0\n")
        alone = _by_check(check_patches([probe], v2, None))["baseline"]
        against_v1 = _by_check(check_patches([probe], v2, v1))
        same = _by_check(check_patches([probe], v1, v1))
    (warning,) = alone
    assert warning.severity == "warning" and warning.members == ("schedule", "step")
    assert warning.message.startswith("no baseline: drift not checked for schedule, step (")
    (named,) = against_v1["baseline"]
    assert (named.severity, named.members, named.baseline) == ("info", ("schedule", "step"), v1.label)
    assert {f.member for f in against_v1["drift"]} == {"schedule", "step"}
    assert [f.member for f in against_v1["moved"]] == ["step"]  # now inherited from Base
    (nothing,) = same["baseline"]
    assert nothing.severity == "info" and nothing.baseline.endswith("the same release: nothing to compare")
    assert "drift" not in same


def test_a_gate_exclusion_is_an_error_when_named_and_a_skip_otherwise(v2: StaticView) -> None:
    from vllm_custom_patches import vllm_versions

    with isolated_registry():
        probe = vllm_versions("<2")(_patch("def schedule(self):\n    return []\n"))
        skipped = check_patches([probe], v2, None, together=False)
        named = check_patches([probe], v2, None)
    (gate,) = skipped  # nothing else is checked: the plugin skips it there
    assert (gate.severity, gate.check) == ("warning", "gate") and "excluded by its gate (<2)" in gate.message
    report = DoctorReport("v2", ["probe"], skipped, gates={"probe": "<2"})
    assert summary_of(report, "probe")["verdict"] == "excluded" and cell_of(report, "probe") == "excluded by gate <2"
    checks = {f.check: f.severity for f in named}
    assert checks["gate"] == "error" and checks["signature"] == "error"  # named: checked anyway
    report = DoctorReport("v2", ["probe"], named, gates={"probe": "<2"})
    cell = cell_of(report, "probe")
    assert cell.startswith("error: excluded by gate <2; error: schedule(self) cannot take every call"), cell
    assert summary_of(report, "probe")["errors"][1].startswith("schedule(self) cannot take every call")
