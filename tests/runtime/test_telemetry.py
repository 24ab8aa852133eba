"""Per-patch telemetry's figures (issue 20, part 1): counts, own and total time, errors and their log line, the setting.

Times are exact where a test drives the clock (``Clock``: each piece of code
advances it by a known amount, so a figure is a sum the test can write down);
with the real clock only lower bounds are asserted, never upper ones.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import pytest

from vllm_custom_patches import PatchConfigError, VLLMPatch, plugin
from vllm_custom_patches._core import instrument
from vllm_custom_patches._runtime import telemetry
from vllm_custom_patches._runtime.activation import Epoch, activate, enable_telemetry
from vllm_custom_patches._runtime.selection import parse_telemetry

ENV = "VLLM_CUSTOM_PATCHES_TELEMETRY"


class Clock:
    """Nanoseconds that pass only when the code under test says so."""

    def __init__(self) -> None:
        self.now = 0

    def __call__(self) -> int:
        return self.now

    def spend(self, ns: int) -> None:
        self.now += ns


@pytest.fixture
def clock() -> Iterator[Clock]:
    fake = Clock()
    telemetry.enable(telemetry.Telemetry(fake))
    yield fake
    telemetry._reset_for_tests()


@pytest.fixture(autouse=True)
def _telemetry_off_after() -> Iterator[None]:
    yield
    telemetry._reset_for_tests()


def figures(patch: str, member: str) -> tuple[int, int, int, int]:
    """(calls, own ns, total ns, errors) of one row; times rounded back to whole ns."""
    row = next(r for r in telemetry.rows() if (r["patch"], r["member"]) == (patch, member))
    return row["calls"], round(row["own_s"] * 1e9), round(row["total_s"] * 1e9), row["errors"]


# -- the figures --------------------------------------------------------------------------------


def test_a_single_patch_own_time_excludes_the_original_it_calls(clock: Clock) -> None:
    class Target:
        def step(self, n: int) -> int:
            clock.spend(100)  # vLLM's work
            return n

    class Timed(VLLMPatch[Target]):
        def step(self, n: int) -> int:
            clock.spend(5)
            result = self._original_step(n)
            clock.spend(2)
            return result + 1  # type: ignore[no-any-return]

    Timed.apply()
    obj = Target()
    assert [obj.step(i) for i in range(3)] == [1, 2, 3]
    assert figures("Timed", "step") == (3, 3 * 7, 3 * 107, 0)


def test_in_a_stack_each_layer_is_its_own_patch(clock: Clock) -> None:
    class Target:
        def step(self) -> str:
            clock.spend(100)
            return "T"

    class Outer(VLLMPatch[Target], stackable=True, order=1):
        def step(self) -> str:
            clock.spend(3)
            return "O>" + Outer.original("step")(self)  # type: ignore[no-any-return]

    class Inner(VLLMPatch[Target], stackable=True):
        def step(self) -> str:
            clock.spend(20)
            return "I>" + Inner.original("step")(self)  # type: ignore[no-any-return]

    Outer.apply()
    Inner.apply()
    assert Target().step() == "O>I>T"
    assert figures("Outer", "step") == (1, 3, 123, 0)  # own: not the inner layer, not vLLM's
    assert figures("Inner", "step") == (1, 20, 120, 0)
    Outer.rollback()  # the inner layer alone: still timed as itself
    assert Target().step() == "I>T"
    assert figures("Inner", "step") == (2, 40, 240, 0)
    assert figures("Outer", "step") == (1, 3, 123, 0)  # rolled back: kept, no longer growing


def test_what_the_original_calls_through_another_patch_is_that_patchs_time(clock: Clock) -> None:
    class Helper:
        def work(self) -> None:
            clock.spend(1000)

    class Target:
        def step(self) -> None:
            clock.spend(100)
            Helper().work()  # vLLM's code calling a member another patch replaces

    class HelperPatch(VLLMPatch[Helper]):
        def work(self) -> None:
            clock.spend(10)
            self._original_work()

    class StepPatch(VLLMPatch[Target]):
        def step(self) -> None:
            clock.spend(1)
            self._original_step()

    HelperPatch.apply()
    StepPatch.apply()
    Target().step()
    assert figures("StepPatch", "step") == (1, 1, 1111, 0)
    assert figures("HelperPatch", "work") == (1, 10, 1010, 0)


def test_a_member_of_the_patch_calling_another_of_its_members(clock: Clock) -> None:
    class Target:
        def step(self) -> None:
            clock.spend(100)

    class TwoMembers(VLLMPatch[Target]):
        def step(self) -> None:
            clock.spend(1)
            self.helper()  # an addition: timed as its own member
            self._original_step()

        def helper(self) -> None:
            clock.spend(30)

    TwoMembers.apply()
    Target().step()
    assert figures("TwoMembers", "step") == (1, 1, 131, 0)
    assert figures("TwoMembers", "helper") == (1, 30, 30, 0)


def test_static_class_methods_and_properties(clock: Clock) -> None:
    class Target:
        @staticmethod
        def s(x: int) -> int:
            clock.spend(100)
            return x

        @classmethod
        def c(cls) -> str:
            clock.spend(100)
            return cls.__name__

        @property
        def p(self) -> int:
            clock.spend(100)
            return 1

        @p.setter
        def p(self, value: int) -> None:
            clock.spend(100)

    class Kinds(VLLMPatch[Target]):
        @staticmethod
        def s(x: int) -> int:
            clock.spend(1)
            return Target._original_s(x) + 1  # type: ignore[no-any-return]

        @classmethod
        def c(cls) -> str:
            clock.spend(2)
            return "c:" + cls._original_c()  # type: ignore[no-any-return]

        @property
        def p(self) -> int:
            clock.spend(3)
            return Kinds.original("p").fget(self) + 1  # type: ignore[no-any-return]

        @p.setter
        def p(self, value: int) -> None:
            clock.spend(4)
            Kinds.original("p").fset(self, value)

    Kinds.apply()
    obj = Target()
    assert Target.s(1) == 2 and obj.s(1) == 2
    assert obj.c() == "c:Target"
    assert obj.p == 2
    obj.p = 5
    assert figures("Kinds", "s") == (2, 2, 202, 0)
    assert figures("Kinds", "c") == (1, 2, 102, 0)
    assert figures("Kinds", "p") == (2, 7, 207, 0)  # one row: the read and the write


def test_with_the_real_clock_the_figures_are_at_least_what_was_slept() -> None:
    class Target:
        def step(self) -> None:
            time.sleep(0.02)

    class Sleepy(VLLMPatch[Target]):
        def step(self) -> None:
            time.sleep(0.01)
            self._original_step()

    telemetry.enable()
    Sleepy.apply()
    Target().step()
    calls, own, total, errors = figures("Sleepy", "step")
    assert (calls, errors) == (1, 0)
    assert own >= 0.01e9 and total >= 0.03e9 and own <= total


# -- errors -------------------------------------------------------------------------------------


def test_an_error_of_the_patch_is_counted_and_logged_naming_it_at_most_once_a_minute(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [1000.0]
    telemetry.enable(telemetry.Telemetry(log_clock=lambda: now[0]))

    class Target:
        def step(self, fail: str) -> str:
            if fail == "original":
                raise KeyError("vLLM's own")
            return "T"

    class Failing(VLLMPatch[Target]):
        def step(self, fail: str) -> str:
            if fail == "patch":
                raise ValueError(f"bad\nthing {now[0]:.0f}")
            return self._original_step(fail)  # type: ignore[no-any-return]

    Failing.apply()
    obj = Target()
    with caplog.at_level(logging.WARNING, logger="vllm.custom_patches"):
        for _ in range(3):
            with pytest.raises(ValueError):
                obj.step("patch")
        with pytest.raises(KeyError):
            obj.step("original")  # passes through: not the patch's
        now[0] += telemetry.LOG_INTERVAL_S
        with pytest.raises(ValueError):
            obj.step("patch")
    lines = [r.getMessage() for r in caplog.records if "raised in" in r.getMessage()]
    assert len(lines) == 2, lines
    assert f"vllm-custom-patches [pid {os.getpid()}]: patch 'Failing' raised in " in lines[0]
    assert "Target.step: ValueError: bad thing 1000 (error 1 of this member; at most one line per 60 s)" in lines[0]
    assert "error 4 of this member; 2 more not logged since the last line" in lines[1]
    assert all("\n" not in line for line in lines)
    row = next(r for r in telemetry.rows() if r["patch"] == "Failing")
    assert (row["calls"], row["errors"], row["last_error"]) == (5, 4, "ValueError: bad thing 1060")


def test_an_exception_with_a_broken_str_is_still_counted() -> None:
    class Broken(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no")

    class Target:
        def step(self) -> None:
            pass

    class Raises(VLLMPatch[Target]):
        def step(self) -> None:
            raise Broken

    telemetry.enable()
    Raises.apply()
    with pytest.raises(Broken):
        Target().step()
    row = telemetry.rows()[0]
    assert (row["errors"], row["last_error"]) == (1, "Broken: <message unavailable>")


# -- per process --------------------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_counts_from_zero(clock: Clock) -> None:
    class Target:
        def step(self) -> None:
            pass

    class Counted(VLLMPatch[Target]):
        def step(self) -> None:
            self._original_step()

    Counted.apply()
    for _ in range(5):
        Target().step()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its figures and leave at once
        try:
            Target().step()
            os.write(write, json.dumps(telemetry.rows()).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        rows = json.loads(pipe.read())
    os.waitpid(pid, 0)
    assert [r["calls"] for r in rows] == [1]
    assert figures("Counted", "step")[0] == 5


# -- the setting --------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "on"), [(None, False), ("", False), (" 0 ", False), ("off", False),
                                           ("1", True), ("TRUE", True), ("yes", True), ("on", True)])  # fmt: skip
def test_the_setting_is_a_boolean(value: str | None, on: bool) -> None:
    assert parse_telemetry(value) is on


def test_a_setting_that_is_not_a_boolean_names_the_variable_and_the_fix() -> None:
    with pytest.raises(PatchConfigError, match=r"VLLM_CUSTOM_PATCHES_TELEMETRY='2' is not a boolean. Set it to 1"):
        parse_telemetry("2")
    failed: list[Any] = []
    assert enable_telemetry({ENV: "maybe"}, failed) is False
    assert [label for label, _ in failed] == [ENV] and instrument.installed() is None


def _patch_dir(tmp_path: Any) -> dict[str, str]:
    patches = tmp_path / "patches"
    patches.mkdir()
    patches.chmod(0o755)
    (patches / "timed_at_start.py").write_text(
        textwrap.dedent(
            """
            from vllm_custom_patches import VLLMPatch

            class Target:
                def step(self):
                    return 1

            class TimedAtStart(VLLMPatch[Target]):
                def step(self):
                    return self._original_step() + 1
            """
        )
    )
    return {"VLLM_CUSTOM_PATCHES": "TimedAtStart", "VLLM_CUSTOM_PATCHES_PATH": str(patches)}


def test_activation_turns_telemetry_on_before_it_applies_anything(tmp_path: Any) -> None:
    report = activate({**_patch_dir(tmp_path), ENV: "1"}, Epoch())
    assert report.applied == ["TimedAtStart"] and telemetry.enabled()
    module = sys.modules["vllm_custom_patches_path.timed_at_start"]
    assert module.Target().step() == 2
    assert [(r["patch"], r["member"], r["calls"]) for r in telemetry.rows()] == [("TimedAtStart", "step", 1)]


def test_activation_refuses_a_bad_setting_in_strict_mode_before_applying(tmp_path: Any) -> None:
    environ = {**_patch_dir(tmp_path), ENV: "sometimes"}
    with pytest.raises(PatchConfigError, match="VLLM_CUSTOM_PATCHES_TELEMETRY='sometimes' is not a boolean"):
        activate(environ, Epoch())
    module = sys.modules["vllm_custom_patches_path.timed_at_start"]
    assert "_original_step" not in vars(module.Target)  # nothing applied
    report = activate({**environ, "VLLM_CUSTOM_PATCHES_STRICT": "0"}, Epoch())
    assert [label for label, _ in report.failed] == [ENV] and report.applied == ["TimedAtStart"]
    assert not telemetry.enabled() and vars(module.Target)["step"] is module.TimedAtStart._vcp_spec.members["step"]


def test_with_nothing_selected_the_plugin_still_turns_telemetry_on_for_the_kill_switch(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("VLLM_CUSTOM_PATCHES", raising=False)
    monkeypatch.setenv(ENV, "1")
    plugin._reset_for_tests()
    try:
        plugin.register()
        assert telemetry.enabled()
        telemetry._reset_for_tests()
        plugin._reset_for_tests()
        monkeypatch.setenv(ENV, "lots")
        with caplog.at_level(logging.ERROR, logger="vllm.custom_patches"):
            plugin.register()  # nothing selected that a bad value could stop: logged
        assert not telemetry.enabled()
        assert "VLLM_CUSTOM_PATCHES_TELEMETRY='lots' is not a boolean" in caplog.text
        assert "Telemetry stays off." in caplog.text
    finally:
        plugin._reset_for_tests()


_OFF_CHILD = """
import json, os, sys, tempfile
from pathlib import Path
d = Path(tempfile.mkdtemp()); d.chmod(0o755)
(d / "p.py").write_text("from vllm_custom_patches import VLLMPatch\\nclass T:\\n    def m(self): return 1\\n"
                        "class P(VLLMPatch[T]):\\n    def m(self): return self._original_m()\\n")
os.environ.update({"VLLM_CUSTOM_PATCHES": "P", "VLLM_CUSTOM_PATCHES_PATH": str(d)})
if sys.argv[1]:
    os.environ["VLLM_CUSTOM_PATCHES_TELEMETRY"] = sys.argv[1]
from vllm_custom_patches.plugin import register
register()
from vllm_custom_patches._ops.agent import process_record
record = process_record("api_server")
mod = sys.modules["vllm_custom_patches_path.p"]
print(json.dumps({"imported": [m for m in ("vllm_custom_patches._runtime.telemetry", "prometheus_client")
                               if m in sys.modules],
                  "graft_is_the_patch": vars(mod.T)["m"] is mod.P._vcp_spec.members["m"],
                  "record_has_telemetry": "telemetry" in record, "applied": record["applied"]}))
"""


@pytest.mark.parametrize("value", ["", "0", "1"])
def test_off_telemetry_is_never_imported_and_the_graft_is_the_patch_itself(value: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_CUSTOM_PATCHES")}
    out = subprocess.run(
        [sys.executable, "-c", _OFF_CHILD, value], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if value == "1":  # the contrast: on, it is imported, the graft is a stand-in, the record has rows
        assert result == {"imported": ["vllm_custom_patches._runtime.telemetry"], "graft_is_the_patch": False,
                          "record_has_telemetry": True, "applied": ["P"]}  # fmt: skip
    else:
        assert result == {"imported": [], "graft_is_the_patch": True, "record_has_telemetry": False, "applied": ["P"]}
