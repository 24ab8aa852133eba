"""register(): selection, error policy, pending patches, re-entrancy and the summary line."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import importlib_metadata
import pytest
from _helpers import LogLines, captured_logs, clean_env, forget_modules, fresh_plugin
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vllm_custom_patches import (
    PatchConfigError,
    PatchConflictError,
    PatchError,
    PatchManager,
    PatchState,
    PatchTargetError,
    PatchVersionError,
    UnknownPatchError,
    VLLMPatch,
    plugin,
    vllm_versions,
)
from vllm_custom_patches._runtime import activation as _activation

LATE = "vcp_late_target"
"""A module that no test imports before register(): patches on it must wait."""


@pytest.fixture(autouse=True)
def _without_the_shipped_catalogue(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only this file's patches are known: the catalogue (and any patch package installed, such as
    examples/patch-package) would join every '*'; the throw-away test distributions are named vcp-*."""
    real = _activation.find_entry_points

    def without_catalogue() -> dict[str, Any]:
        return {
            name: entry
            for name, entry in real().items()
            if all(ep.dist is None or ep.dist.name.startswith("vcp-") for ep in entry.declared)
        }

    monkeypatch.setattr(_activation, "find_entry_points", without_catalogue)
    # Other test files may have imported the catalogue, which registered it; the
    # conftest's isolated_registry() puts these back after the test.
    registry = PatchManager._registry.patches
    for name in [n for n, cls in registry.items() if cls.__module__.startswith("vllm_custom_patches_catalogue")]:
        del registry[name]


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    clean_env(monkeypatch, VLLM_CUSTOM_PATCHES_VLLM_VERSION="0.32.0")
    (tmp_path / f"{LATE}.py").write_text(
        textwrap.dedent(
            """
            class Late:
                def run(self):
                    return "original"
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with fresh_plugin():
        yield
    forget_modules(LATE)


def select(monkeypatch: pytest.MonkeyPatch, value: str, *, strict: str | None = None) -> None:
    monkeypatch.setenv("VLLM_CUSTOM_PATCHES", value)
    if strict is not None:
        monkeypatch.setenv("VLLM_CUSTOM_PATCHES_STRICT", strict)


def states() -> dict[str, tuple[PatchState, str]]:
    return {s.name: (s.state, s.reason) for s in PatchManager.status()}


def summary_of(logs: LogLines) -> str:
    lines = [m for m in logs.messages() if m.startswith(f"vllm-custom-patches [pid {os.getpid()}]: applied: ")]
    assert len(lines) == 1, lines
    return lines[0]


class Engine:
    def step(self) -> str:
        return "original"

    def stop(self) -> str:
        return "stopped"


def define_patches() -> dict[str, type[VLLMPatch[Engine]]]:
    """Patches defined in the running program (registered with the manager when defined)."""

    class PA(VLLMPatch[Engine]):
        name = "pa"

        def step(self) -> str:
            return "a(" + self._original_step() + ")"

    class PB(VLLMPatch[Engine]):
        name = "pb"

        def stop(self) -> str:
            return "b(" + self._original_stop() + ")"

    class PConflict(VLLMPatch[Engine]):
        name = "pc_conflicts_with_pa"

        def step(self) -> str:
            return "c"

    @vllm_versions(">=999")
    class PGated(VLLMPatch[Engine]):
        name = "pd_gated"

        def extra(self) -> int:
            return 1

    class PLate(VLLMPatch[f"{LATE}:Late"]):  # type: ignore[misc]
        name = "pe_late"

        def run(self) -> str:
            return "late(" + self._original_run() + ")"

    class PAbsent(VLLMPatch["vcp_no_such_package.sub:Thing"]):  # type: ignore[misc]
        name = "pf_absent"

        def run(self) -> None:
            return None

    return {p.name: p for p in (PA, PB, PConflict, PGated, PLate, PAbsent)}


# -- nothing selected ----------------------------------------------------------------


@pytest.mark.parametrize("value", [None, "", "  ", "\t"])
def test_unset_or_empty_does_nothing_and_scans_nothing(monkeypatch: pytest.MonkeyPatch, value: str | None) -> None:
    define_patches()
    if value is not None:
        select(monkeypatch, value)
    monkeypatch.setenv("VLLM_CUSTOM_PATCHES_STRICT", "not-a-bool")  # not even read
    monkeypatch.setenv("VLLM_CUSTOM_PATCHES_PATH", "/nonexistent")  # not even read

    def no_scan(**_: object) -> None:
        raise AssertionError("entry points scanned")

    monkeypatch.setattr(importlib_metadata, "entry_points", no_scan)
    with captured_logs() as logs:
        plugin.register()
    assert PatchManager.applied() == []
    assert all(state is PatchState.AVAILABLE for state, _ in states().values())
    assert logs.messages(level=20) == []


def test_import_and_register_without_selection_never_import_vllm(tmp_path: Path) -> None:
    # A fake 'vllm' first on the path: importing it at all fails the script.
    fake = tmp_path / "fake" / "vllm"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise RuntimeError('vllm was imported')\n")
    script = (
        "import sys\n"
        "from vllm_custom_patches.plugin import register\n"
        "register(); register()\n"
        "bad = sorted(m for m in sys.modules if m == 'vllm' or m.startswith('vllm.') or m == 'wrapt')\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_CUSTOM_PATCHES")}
    env["PYTHONPATH"] = str(tmp_path / "fake")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


# -- selection and order -------------------------------------------------------------


def test_explicit_names_apply_in_the_order_given(monkeypatch: pytest.MonkeyPatch) -> None:
    define_patches()
    select(monkeypatch, " pb , pa ,pb")
    plugin.register()
    assert PatchManager.applied() == ["pb", "pa"]
    assert Engine().step() == "a(original)"
    assert Engine().stop() == "b(stopped)"


def test_star_applies_what_it_can_and_skips_the_rest_with_reasons(monkeypatch: pytest.MonkeyPatch) -> None:
    define_patches()
    select(monkeypatch, "*")
    with captured_logs() as logs:
        plugin.register()
    # Sorted by name: pa before pc_conflicts_with_pa, so the latter conflicts.
    assert PatchManager.applied() == ["pa", "pb"]
    got = states()
    assert got["pc_conflicts_with_pa"][0] is PatchState.SKIPPED
    assert "conflicts with applied patch 'pa'" in got["pc_conflicts_with_pa"][1]
    assert got["pd_gated"][0] is PatchState.SKIPPED
    assert "requires vLLM >=999" in got["pd_gated"][1]
    assert got["pe_late"] == (PatchState.PENDING, f"waiting for import of {LATE}")
    assert got["pf_absent"][0] is PatchState.SKIPPED
    assert "module 'vcp_no_such_package.sub' of its target" in got["pf_absent"][1]
    line = summary_of(logs)
    assert line.startswith(
        f"vllm-custom-patches [pid {os.getpid()}]: applied: pa, pb; "
        f"pending: pe_late (waiting for import of {LATE}); skipped: "
    )
    assert "pc_conflicts_with_pa (patch 'pc_conflicts_with_pa' conflicts" in line
    assert "pd_gated (patch 'pd_gated' requires vLLM >=999" in line
    assert line.endswith("failed: none")
    assert "\n" not in line


def test_star_minus_excludes(monkeypatch: pytest.MonkeyPatch) -> None:
    define_patches()
    select(monkeypatch, "*,-pa,-pe_late")
    plugin.register()
    assert PatchManager.applied() == ["pb", "pc_conflicts_with_pa"]
    assert states()["pa"][0] is PatchState.AVAILABLE
    assert states()["pe_late"][0] is PatchState.AVAILABLE


def test_a_name_next_to_star_is_explicit_and_goes_first(monkeypatch: pytest.MonkeyPatch) -> None:
    define_patches()
    select(monkeypatch, "*,pc_conflicts_with_pa,-pd_gated,-pf_absent")
    plugin.register()
    assert PatchManager.applied()[:2] == ["pc_conflicts_with_pa", "pb"]
    assert states()["pa"][0] is PatchState.SKIPPED
    select(monkeypatch, "*,pd_gated")
    plugin._reset_for_tests()
    with pytest.raises(PatchVersionError):
        plugin.register()


# -- errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "error", "says"),
    [
        ("pa,pbb", UnknownPatchError, "  - pbb: no patch named 'pbb'. Did you mean 'pb'? Available: pa, pb, "),
        ("*,-pq", UnknownPatchError, "  - -pq: no patch named 'pq'."),
        ("pd_gated", PatchVersionError, "  - pd_gated: patch 'pd_gated' requires vLLM >=999; installed is 0.32.0"),
        ("pf_absent", PatchTargetError, "  - pf_absent: patch 'pf_absent': module 'vcp_no_such_package.sub' of"),
        (
            "pa,pc_conflicts_with_pa",
            PatchConflictError,
            "  - pc_conflicts_with_pa: patch 'pc_conflicts_with_pa' conflicts",
        ),
        ("pa,-pb", PatchConfigError, "\n  - VLLM_CUSTOM_PATCHES='pa,-pb': '-pb' excludes from '*', but '*' is not in"),
    ],
)
def test_a_named_patch_that_cannot_apply_fails_start_up(
    monkeypatch: pytest.MonkeyPatch, value: str, error: type[PatchError], says: str
) -> None:
    define_patches()
    select(monkeypatch, value)
    with captured_logs() as logs, pytest.raises(error) as info:
        plugin.register()
    message = str(info.value)
    pid = os.getpid()
    assert message.startswith(
        f"vllm-custom-patches: VLLM_CUSTOM_PATCHES={value!r} cannot be honoured in process {pid}:\n"
    )
    assert says in message
    assert message.endswith("or set VLLM_CUSTOM_PATCHES_STRICT=0 to log such problems and start without those patches.")
    assert isinstance(info.value.__cause__, error)
    assert "failed: " in summary_of(logs) and "failed: none" not in summary_of(logs)


def test_one_error_lists_every_failed_patch_and_the_others_stay_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    define_patches()
    select(monkeypatch, "pd_gated,pa,pc_conflicts_with_pa,pb")
    with pytest.raises(PatchVersionError) as info:
        plugin.register()
    message = str(info.value)
    assert "  - pd_gated: " in message and "  - pc_conflicts_with_pa: " in message
    # The rest applied whole; the conflicting one left Engine untouched.
    assert PatchManager.applied() == ["pa", "pb"]
    assert Engine().step() == "a(original)"
    assert states()["pc_conflicts_with_pa"][0] is PatchState.FAILED


def test_unknown_names_fail_before_anything_is_applied(monkeypatch: pytest.MonkeyPatch) -> None:
    define_patches()
    select(monkeypatch, "pa,nope1,nope2")
    with pytest.raises(UnknownPatchError) as info:
        plugin.register()
    assert "  - nope1: " in str(info.value) and "  - nope2: " in str(info.value)
    assert PatchManager.applied() == []


def test_not_strict_logs_and_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    define_patches()
    select(monkeypatch, "pd_gated,pa,nope", strict=" off ")
    with captured_logs() as logs:
        plugin.register()
    assert PatchManager.applied() == ["pa"]
    assert states()["pd_gated"][0] is PatchState.FAILED
    line = summary_of(logs)
    assert "applied: pa;" in line
    # Unknown names are found before anything is tried.
    assert "failed: nope (no patch named 'nope'." in line
    assert ", pd_gated (patch 'pd_gated' requires vLLM >=999" in line
    assert any(
        "VLLM_CUSTOM_PATCHES_STRICT=0: starting without what failed: nope, pd_gated" in m
        for m in logs.messages(level=30)
    )


@pytest.mark.parametrize("value", ["*,*", "a b", "-x"])
def test_bad_selection_syntax(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    define_patches()
    select(monkeypatch, value)
    with pytest.raises(PatchConfigError, match=r"VLLM_CUSTOM_PATCHES="):
        plugin.register()
    plugin._reset_for_tests()
    select(monkeypatch, value, strict="0")
    with captured_logs() as logs:
        plugin.register()
    assert "applied: none;" in summary_of(logs)
    assert PatchManager.applied() == []


def test_bad_strict_value_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    select(monkeypatch, "pa", strict="sometimes")
    with pytest.raises(PatchConfigError, match=r"^VLLM_CUSTOM_PATCHES_STRICT='sometimes' is not a boolean"):
        plugin.register()


# -- pending patches --------------------------------------------------------------------


def test_a_patch_on_a_module_not_imported_yet_waits_for_it(monkeypatch: pytest.MonkeyPatch) -> None:
    define_patches()
    select(monkeypatch, "pe_late")
    with captured_logs() as logs:
        plugin.register()
        assert LATE not in sys.modules  # register() never imports a target
        assert states()["pe_late"] == (PatchState.PENDING, f"waiting for import of {LATE}")
        import vcp_late_target

    assert vcp_late_target.Late().run() == "late(original)"
    assert states()["pe_late"][0] is PatchState.APPLIED
    line = f"vllm-custom-patches [pid {os.getpid()}]: applied pending patch 'pe_late' on import of {LATE}"
    assert line in logs.messages()


def test_an_already_imported_target_is_patched_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    import vcp_late_target

    define_patches()
    select(monkeypatch, "pe_late")
    plugin.register()
    assert states()["pe_late"][0] is PatchState.APPLIED
    assert vcp_late_target.Late().run() == "late(original)"


def _patch_on_missing_class() -> None:
    class Broken(VLLMPatch[f"{LATE}:NoSuchClass"]):  # type: ignore[misc]
        name = "pg_missing_class"

        def run(self) -> None:
            return None


def test_strict_failure_when_the_target_is_imported_fails_that_import(monkeypatch: pytest.MonkeyPatch) -> None:
    _patch_on_missing_class()
    select(monkeypatch, "pg_missing_class")
    plugin.register()
    assert states()["pg_missing_class"][0] is PatchState.PENDING
    with pytest.raises(PatchTargetError, match=r"(?s)cannot be honoured.*has no attribute 'NoSuchClass'"):
        import vcp_late_target  # noqa: F401
    assert LATE not in sys.modules
    assert states()["pg_missing_class"][0] is PatchState.FAILED


def test_strict_failure_at_import_rolls_back_the_patches_that_waited_with_it(monkeypatch: pytest.MonkeyPatch) -> None:
    define_patches()
    _patch_on_missing_class()
    select(monkeypatch, "pe_late,pg_missing_class")
    plugin.register()
    with pytest.raises(PatchTargetError, match="NoSuchClass"):
        import vcp_late_target  # noqa: F401
    # The failed import took the module (and the class pe_late had patched) out of
    # sys.modules: nothing may still claim to be applied to it.
    assert LATE not in sys.modules
    assert PatchManager.applied() == []
    assert states()["pe_late"] == (PatchState.FAILED, "rolled back: patch 'pg_missing_class' failed on the same import")


@pytest.mark.parametrize(
    ("value", "strict", "state"), [("pg_missing_class", "0", PatchState.FAILED), ("*", "1", PatchState.SKIPPED)]
)
def test_non_fatal_failure_at_import_is_logged(
    monkeypatch: pytest.MonkeyPatch, value: str, strict: str, state: PatchState
) -> None:
    _patch_on_missing_class()
    select(monkeypatch, value, strict=strict)
    plugin.register()
    with captured_logs() as logs:
        import vcp_late_target

    assert vcp_late_target.Late().run() == "original"
    assert states()["pg_missing_class"][0] is state
    assert any("'pg_missing_class'" in m and "NoSuchClass" in m for m in logs.messages(level=30))


def test_hooks_left_by_a_reset_plugin_do_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    define_patches()
    select(monkeypatch, "pe_late")
    plugin.register()
    plugin._reset_for_tests()
    import vcp_late_target

    assert vcp_late_target.Late().run() == "original"


# -- re-entrancy -------------------------------------------------------------------------


def test_register_twice_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    define_patches()
    select(monkeypatch, "pa,pe_late")
    with captured_logs() as logs:
        plugin.register()
        before = states()
        monkeypatch.setenv("VLLM_CUSTOM_PATCHES", "pb")  # even a changed selection is not re-read
        plugin.register()
    assert states() == before
    assert PatchManager.applied() == ["pa"]
    summary_of(logs)  # exactly one summary line


def test_a_failed_register_fails_again_the_same_way(monkeypatch: pytest.MonkeyPatch) -> None:
    define_patches()
    select(monkeypatch, "nope")
    with pytest.raises(UnknownPatchError) as first:
        plugin.register()
    with pytest.raises(UnknownPatchError) as second:
        plugin.register()
    assert second.value is first.value


def test_register_called_again_while_it_runs_returns(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # A patch module whose import starts vLLM, which calls the plugin again.
    directory = tmp_path / "reentrant"
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)
    (directory / "inner.py").write_text(
        textwrap.dedent(
            """
            from vllm_custom_patches import VLLMPatch, plugin

            plugin.register()

            class Inner:
                def run(self):
                    return "original"

            class InnerPatch(VLLMPatch[Inner]):
                name = "inner"

                def run(self):
                    return "patched"
            """
        )
    )
    (directory / "inner.py").chmod(0o644)
    monkeypatch.setenv("VLLM_CUSTOM_PATCHES_PATH", str(directory))
    select(monkeypatch, "inner")
    plugin.register()
    assert sys.modules["vllm_custom_patches_path.inner"].Inner().run() == "patched"


# -- never an unexpected exception ---------------------------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    value=st.lists(st.sampled_from([*" ,*-", "pa", "pb", "pz", "pd_gated", "pe_late", "é"]), max_size=12).map("".join),
    strict=st.sampled_from(["1", "0", "maybe"]),
)
def test_register_raises_only_patch_errors(value: str, strict: str) -> None:
    saved = {k: os.environ.get(k) for k in ("VLLM_CUSTOM_PATCHES", "VLLM_CUSTOM_PATCHES_STRICT")}
    os.environ["VLLM_CUSTOM_PATCHES"] = value
    os.environ["VLLM_CUSTOM_PATCHES_STRICT"] = strict
    try:
        with fresh_plugin():
            define_patches()
            try:
                plugin.register()
            except PatchError:
                assert strict != "0"
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old
