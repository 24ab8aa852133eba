"""Rule: a patch class is checked when its class statement runs, and registers itself."""

from __future__ import annotations

import pytest

from vllm_custom_patches import PatchDefinitionError, PatchManager, UnknownPatchError, VLLMPatch


class Target:
    def m(self) -> int:
        return 1


def test_subclassing_without_subscript_is_a_type_error() -> None:
    with pytest.raises(TypeError, match=r"VLLMPatch\[TargetClass\]"):

        class NoTarget(VLLMPatch):  # type: ignore[type-arg]
            pass


def test_definition_errors_are_patch_errors_and_type_errors() -> None:
    assert issubclass(PatchDefinitionError, TypeError)


@pytest.mark.parametrize("bad", [42, None, Target(), "no_colon_here", "pkg.mod:", ":Cls", "pkg mod:Cls", "a:b:c"])
def test_bad_subscripts_are_rejected_with_the_expected_form(bad: object) -> None:
    with pytest.raises(PatchDefinitionError, match="VLLMPatch"):
        VLLMPatch[bad]  # type: ignore[index]


def test_dotted_string_without_colon_gets_a_suggestion() -> None:
    with pytest.raises(PatchDefinitionError, match=r"did you mean 'pkg.mod:Cls'"):
        VLLMPatch["pkg.mod.Cls"]


def test_bound_patch_cannot_be_subscripted_again() -> None:
    with pytest.raises(PatchDefinitionError, match="already bound"):
        VLLMPatch[Target][Target]  # type: ignore[index]


def test_patch_registers_itself_with_class_name_and_docstring() -> None:
    class Registered(VLLMPatch[Target]):
        """Makes m return 2.

        Longer text.
        """

        def m(self) -> int:
            return 2

    assert PatchManager.get("Registered") is Registered
    assert Registered.name == "Registered"
    (status,) = [s for s in PatchManager.status() if s.name == "Registered"]
    assert status.description == "Makes m return 2.\n\nLonger text."
    assert status.target == f"{__name__}:Target"


def test_explicit_name_is_used_and_not_grafted() -> None:
    class Named(VLLMPatch[Target]):
        name = "name_1.x"

    assert PatchManager.get("name_1.x") is Named
    assert Named.apply()
    assert "name" not in vars(Target)


@pytest.mark.parametrize("bad_name", ["", "has space", "a,b", "*", "-x", "1abc", 3])
def test_invalid_patch_names_are_rejected(bad_name: object) -> None:
    with pytest.raises(PatchDefinitionError, match="VLLM_CUSTOM_PATCHES"):

        class BadName(VLLMPatch[Target]):
            name = bad_name  # type: ignore[assignment]


def test_two_different_classes_with_one_name_is_an_error_naming_both() -> None:
    class First(VLLMPatch[Target]):
        name = "shared"

    namespace: dict[str, object] = {"VLLMPatch": VLLMPatch, "Target": Target, "__name__": "other_module"}
    with pytest.raises(PatchDefinitionError) as info:
        exec("class Second(VLLMPatch[Target]):\n    name = 'shared'\n", namespace)
    message = str(info.value)
    assert "shared" in message
    assert f"{__name__}.{First.__qualname__}" in message
    assert "other_module.Second" in message
    assert PatchManager.get("shared") is First


def test_redefinition_with_same_module_and_qualname_replaces_it() -> None:
    def define() -> type:
        class Reloaded(VLLMPatch[Target]):
            pass

        return Reloaded

    first, second = define(), define()
    assert first is not second
    assert PatchManager.get("Reloaded") is second


@pytest.mark.parametrize("reserved", ["apply", "rollback", "is_applied"])
def test_members_named_like_the_framework_api_are_rejected(reserved: str) -> None:
    with pytest.raises(PatchDefinitionError, match=reserved):
        type("Clash", (VLLMPatch[Target],), {reserved: lambda self: None})


def test_members_named_original_are_rejected() -> None:
    with pytest.raises(PatchDefinitionError, match="_original_"):

        class OwnOriginal(VLLMPatch[Target]):
            def _original_m(self) -> int:
                return 0


def test_slots_are_rejected() -> None:
    with pytest.raises(PatchDefinitionError, match="__slots__"):

        class Slotted(VLLMPatch[Target]):
            __slots__ = ("x",)


def test_using_an_original_the_patch_does_not_replace_is_rejected() -> None:
    with pytest.raises(PatchDefinitionError, match=r"self._original_other.*does not define 'other'"):

        class Dangling(VLLMPatch[Target]):
            def m(self) -> int:
                return self._original_other()  # type: ignore[attr-defined,no-any-return]


def test_original_reference_inside_nested_function_is_found() -> None:
    with pytest.raises(PatchDefinitionError, match="_original_zzz"):

        class Nested(VLLMPatch[Target]):
            def m(self) -> int:
                # The call inside a nested function is the subject (found in its code object).
                return (lambda: self._original_zzz())()  # type: ignore[attr-defined,no-any-return]  # noqa: PLC3002, PLW0108


def test_manager_is_not_instantiated_and_rejects_non_patches() -> None:
    with pytest.raises(TypeError):
        PatchManager()
    with pytest.raises(PatchDefinitionError):
        PatchManager.register(Target)  # type: ignore[arg-type]


def test_unknown_name_suggests_the_closest_and_lists_available() -> None:
    class SchedulerFairness(VLLMPatch[Target]):
        pass

    with pytest.raises(UnknownPatchError, match=r"Did you mean 'SchedulerFairness'.*Available: .*SchedulerFairness"):
        PatchManager.get("SchedulerFairnes")
    with pytest.raises(LookupError):
        PatchManager.apply("nope")


def test_patch_inheritance_collects_members_of_base_patches() -> None:
    class BasePatch(VLLMPatch[Target]):
        def helper(self) -> str:
            return "base-helper"

        def m(self) -> int:
            return 10

    class Derived(BasePatch):
        def m(self) -> int:
            return 20

    assert set(Derived._vcp_spec.members) == {"helper", "m"}
    assert Derived.apply()
    assert Target().m() == 20
    assert Target().helper() == "base-helper"  # type: ignore[attr-defined]
