"""Bad input in patch classes: always a PatchError subclass with a useful message, never a half-patched target."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vllm_custom_patches import (
    PatchApplyError,
    PatchDefinitionError,
    PatchError,
    PatchTargetError,
    VLLMPatch,
    max_vllm_version,
    min_vllm_version,
    vllm_versions,
)
from vllm_custom_patches.testing import snapshot_namespace


class Target:
    def m(self) -> int:
        return 1


_anything = st.one_of(
    st.text(max_size=40),
    st.integers(),
    st.none(),
    st.floats(allow_nan=False),
    st.lists(st.integers(), max_size=2),
    st.sampled_from([Target, int, object, Target(), len, "pkg.mod:Cls", "a.b:C.D"]),
)


@given(subscript=_anything)
def test_any_subscript_is_accepted_or_a_definition_error(subscript: object) -> None:
    try:
        VLLMPatch[subscript]  # type: ignore[index]
    except PatchDefinitionError as exc:
        assert "VLLMPatch[" in str(exc)


@given(name=_anything)
def test_any_name_is_accepted_or_a_definition_error(name: object) -> None:
    try:
        patch = type("Fuzzed", (VLLMPatch[Target],), {"name": name})
    except PatchDefinitionError as exc:
        assert "patch name" in str(exc) or "two patch classes" in str(exc)
    else:
        assert patch.name == name


@given(version=_anything, decorator=st.sampled_from([min_vllm_version, max_vllm_version, vllm_versions]))
def test_any_gate_argument_is_accepted_or_a_definition_error(version: object, decorator: object) -> None:
    try:
        decorator(version)  # type: ignore[operator]
    except PatchDefinitionError as exc:
        assert "version" in str(exc)


@pytest.mark.parametrize("builtin", [int, dict, type])
def test_immutable_builtin_target_fails_cleanly(builtin: type) -> None:
    before = snapshot_namespace(builtin)
    patch = type("OnBuiltin", (VLLMPatch[builtin],), {"__repr__": lambda self: "x", "extra": lambda self: 1})
    with pytest.raises(PatchApplyError, match=rf"setting {builtin.__qualname__}\.\w+ failed: TypeError") as info:
        patch.apply()
    assert isinstance(info.value.__cause__, TypeError)
    before.assert_unchanged()


def test_string_target_naming_a_module_attribute_that_is_not_a_class() -> None:
    patch = type("NotClass", (VLLMPatch["os.path:join"],), {})
    with pytest.raises(PatchTargetError, match=r"'os\.path:join' is a function, not a class"):
        patch.apply()


def test_target_module_raising_on_import_names_the_cause(tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    from pathlib import Path

    root = Path(str(tmp_path))
    (root / "vcp_explodes_on_import.py").write_text("raise RuntimeError('module body failed')\n")
    monkeypatch.syspath_prepend(str(root))
    patch = type("Explodes", (VLLMPatch["vcp_explodes_on_import:Cls"],), {})
    with pytest.raises(PatchTargetError, match="RuntimeError: module body failed") as info:
        patch.apply()
    assert isinstance(info.value.__cause__, RuntimeError)
    assert "vcp_explodes_on_import" not in sys.modules


def test_every_framework_error_is_a_patch_error() -> None:
    import vllm_custom_patches as vcp

    errors = [getattr(vcp, name) for name in vcp.__all__ if name.endswith("Error")]
    assert len(errors) >= 7
    assert all(issubclass(err, PatchError) for err in errors)
