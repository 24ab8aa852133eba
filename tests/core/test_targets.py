"""String targets in a module with a lazy module ``__getattr__`` (PEP 562), as ``vllm/__init__.py`` has.

status() (and the plugin's look before it applies) must never run such code:
it imports.  apply() runs it, and whatever it raises becomes a PatchTargetError.
"""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from _helpers import captured_logs, clean_env, forget_modules, fresh_plugin

from vllm_custom_patches import PatchManager, PatchState, PatchStatus, PatchTargetError, VLLMPatch, plugin

LAZY = "vcp_lazy_target"
"""The throw-away module with a PEP 562 ``__getattr__``."""
IMPL = "vcp_lazy_target_impl"
"""What its ``__getattr__`` imports for ``Engine``."""
ABSENT = "vcp_lazy_target_absent_dependency"
"""What its ``__getattr__`` imports for ``NeedsAbsent``; never installed."""

_LAZY_SOURCE = f'''
    """Stands in for vllm/__init__.py: names imported on first access."""

    CALLS = []
    """Every run of code that a static lookup must not trigger."""


    def __getattr__(name):
        CALLS.append(name)
        if name == "Engine":
            from {IMPL} import Engine

            return Engine
        if name == "NeedsAbsent":
            import {ABSENT}  # raises ModuleNotFoundError
        if name == "Exploding":
            raise RuntimeError("lazy import exploded")
        raise AttributeError(f"module {{__name__!r}} has no attribute {{name!r}}")


    class _Meta(type):
        def __getattr__(cls, name):
            CALLS.append(cls.__name__ + "." + name)
            raise RuntimeError("metaclass __getattr__ ran")


    class MetaHolder(metaclass=_Meta):
        """A class whose metaclass makes up attributes."""


    class _Computed:
        def __get__(self, obj, owner):
            CALLS.append("Holder.Inner")
            raise RuntimeError("descriptor ran")


    class DescriptorHolder:
        Inner = _Computed()


    class Plain:
        class Inner:
            def step(self):
                return "original"
'''

_IMPL_SOURCE = """
    class Engine:
        def step(self):
            return "original"
"""


@pytest.fixture
def lazy(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[ModuleType]:
    """The lazy module, imported; it and what it imported are dropped from sys.modules after."""
    (tmp_path / f"{LAZY}.py").write_text(textwrap.dedent(_LAZY_SOURCE))
    (tmp_path / f"{IMPL}.py").write_text(textwrap.dedent(_IMPL_SOURCE))
    monkeypatch.syspath_prepend(str(tmp_path))
    import vcp_lazy_target

    yield vcp_lazy_target
    forget_modules(LAZY, IMPL, ABSENT)


def _patch_on(qualname: str) -> type[VLLMPatch[type]]:
    class OnLazy(VLLMPatch[f"{LAZY}:{qualname}"]):  # type: ignore[misc]
        name = "on_lazy"

        def step(self) -> str:
            return "patched(" + self._original_step() + ")"

    return OnLazy


def _status() -> PatchStatus:
    (status,) = [s for s in PatchManager.status() if s.name == "on_lazy"]
    return status


# -- status() runs no code -----------------------------------------------------------------


@pytest.mark.parametrize(
    "qualname", ["Engine", "NeedsAbsent", "Exploding", "Unknown", "MetaHolder.Inner", "DescriptorHolder.Inner"]
)
def test_status_never_runs_a_lazy_getattr_or_a_descriptor(lazy: ModuleType, qualname: str) -> None:
    _patch_on(qualname)
    status = _status()  # must neither raise nor import
    assert lazy.CALLS == []
    assert IMPL not in sys.modules and ABSENT not in sys.modules
    assert (status.state, status.overrides, status.additions) == (PatchState.AVAILABLE, (), ())


def test_status_still_previews_a_target_found_without_running_code(lazy: ModuleType) -> None:
    _patch_on("Plain.Inner")
    assert _status().overrides == ("step",)
    assert lazy.CALLS == []


# -- apply() -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("qualname", "cause", "says"),
    [
        ("NeedsAbsent", ModuleNotFoundError, f"No module named {ABSENT!r}"),
        ("Exploding", RuntimeError, "lazy import exploded"),
        ("MetaHolder.Inner", RuntimeError, "metaclass __getattr__ ran"),
        ("DescriptorHolder.Inner", RuntimeError, "descriptor ran"),
    ],
)
def test_apply_turns_whatever_the_lookup_raises_into_a_target_error(
    lazy: ModuleType, qualname: str, cause: type[Exception], says: str
) -> None:
    patch = _patch_on(qualname)
    with pytest.raises(PatchTargetError) as info:
        patch.apply()
    message = str(info.value)
    assert message.startswith("patch 'on_lazy': ")
    assert f"'{LAZY}:{qualname}'" in message and f"{cause.__name__}: {says}" in message
    assert isinstance(info.value.__cause__, cause)
    status = _status()
    assert status.state == "failed" and says in status.reason
    assert PatchManager.applied() == []


def test_a_lazy_attribute_that_resolves_is_patched(lazy: ModuleType) -> None:
    patch = _patch_on("Engine")
    assert _status().state == "available" and IMPL not in sys.modules
    assert patch.apply()
    assert lazy.Engine().step() == "patched(original)"
    status = _status()
    assert (status.state, status.overrides) == (PatchState.APPLIED, ("step",))
    patch.rollback()
    assert lazy.Engine().step() == "original"


def test_a_missing_name_without_a_lazy_getattr_is_still_reported_as_missing(lazy: ModuleType) -> None:
    patch = _patch_on("Plain.Nope")
    with pytest.raises(PatchTargetError, match=r"has no attribute 'Nope'\. Check the target name"):
        patch.apply()


# -- through the plugin, lenient ----------------------------------------------------------


@pytest.fixture
def plugin_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    clean_env(monkeypatch, VLLM_CUSTOM_PATCHES="on_lazy", VLLM_CUSTOM_PATCHES_STRICT="0")
    with fresh_plugin():
        yield monkeypatch


@pytest.mark.parametrize("imported_first", [True, False], ids=["module-imported", "module-imported-later"])
def test_lenient_start_up_survives_a_failing_lazy_getattr(
    lazy: ModuleType, plugin_env: pytest.MonkeyPatch, imported_first: bool
) -> None:
    _patch_on("NeedsAbsent")
    if not imported_first:
        del sys.modules[LAZY]  # register() must wait for it; its import then applies the patch
    with captured_logs() as logs:
        plugin.register()  # must not raise
        if not imported_first:
            import vcp_lazy_target  # noqa: F401  (must not raise either)
    status = _status()
    assert status.state is PatchState.FAILED and f"No module named {ABSENT!r}" in status.reason
    if imported_first:
        # Applied (and failed) within register(): the summary says so, never "pending".
        (summary,) = [m for m in logs.messages(level=20) if "applied:" in m]
        assert "pending: none" in summary and "failed: on_lazy" in summary and ABSENT in summary
        assert any("starting without what failed: on_lazy" in m for m in logs.messages(level=30))
    else:
        assert any("running without patch 'on_lazy'" in m and ABSENT in m for m in logs.messages(level=40))


def test_strict_start_up_fails_with_a_target_error(lazy: ModuleType, plugin_env: pytest.MonkeyPatch) -> None:
    plugin_env.setenv("VLLM_CUSTOM_PATCHES_STRICT", "1")
    _patch_on("NeedsAbsent")
    with pytest.raises(PatchTargetError, match=f"No module named {ABSENT!r}") as info:
        plugin.register()
    assert isinstance(info.value.__cause__, PatchTargetError)
    assert isinstance(info.value.__cause__.__cause__, ModuleNotFoundError)


def test_start_up_applies_a_lazy_attribute_that_resolves(lazy: ModuleType, plugin_env: pytest.MonkeyPatch) -> None:
    _patch_on("Engine")
    with captured_logs() as logs:
        plugin.register()
    assert _status().state is PatchState.APPLIED
    assert lazy.Engine().step() == "patched(original)"
    (summary,) = [m for m in logs.messages(level=20) if "applied:" in m]
    assert "applied: on_lazy" in summary and "pending: none" in summary
