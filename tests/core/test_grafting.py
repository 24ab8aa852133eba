"""Rules 1-3: members grafted in place; raw originals; zero-argument super()."""

from __future__ import annotations

import functools
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from vllm_custom_patches import PatchManager, VLLMPatch
from vllm_custom_patches.testing import snapshot_namespace


class Root:
    def hello(self) -> str:
        return "root"

    @classmethod
    def kind(cls) -> str:
        return f"root-kind:{cls.__name__}"


class Target(Root):
    counter = 0

    def __init__(self, value: int = 1) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"Target({self.value})"

    def double(self, x: int) -> int:
        return 2 * x

    @staticmethod
    def static(x: int) -> int:
        return x + 1000

    @classmethod
    def make(cls, value: int) -> Any:
        return cls(value)

    @property
    def prop(self) -> int:
        return self.value * 10

    def hello(self) -> str:
        return "target>" + super().hello()


class SubTarget(Target):
    pass


def test_grafted_in_place_reaches_existing_instances_references_and_subclasses() -> None:
    existing, alias, sub = Target(3), Target, SubTarget(4)

    class Times(VLLMPatch[Target]):
        def double(self, x: int) -> int:
            return 3 * x

    Times.apply()
    assert existing.double(2) == 6
    assert alias(1).double(2) == 6
    assert sub.double(2) == 6
    assert "double" not in vars(SubTarget)


def test_self_is_the_target_instance() -> None:
    seen: list[object] = []

    class Spy(VLLMPatch[Target]):
        def double(self, x: int) -> int:
            seen.append(self)
            return self._original_double(x)  # type: ignore[attr-defined,no-any-return]

    Spy.apply()
    obj = Target(5)
    assert obj.double(4) == 8
    assert seen == [obj]
    assert isinstance(seen[0], Target) and not isinstance(seen[0], Spy)


def test_original_of_own_method_and_its_bound_call() -> None:
    raw = vars(Target)["double"]

    class Wrap(VLLMPatch[Target]):
        def double(self, x: int) -> int:
            return self._original_double(x) + 1  # type: ignore[attr-defined,no-any-return]

    Wrap.apply()
    assert vars(Target)["_original_double"] is raw
    assert Target().double(5) == 11


def test_original_of_an_inherited_method_is_the_raw_base_function() -> None:
    class Greets(VLLMPatch[SubTarget]):
        def hello(self) -> str:
            return "sub>" + self._original_hello()  # type: ignore[attr-defined,no-any-return]

    Greets.apply()
    assert vars(SubTarget)["_original_hello"] is vars(Target)["hello"]
    assert SubTarget().hello() == "sub>target>root"
    assert Target().hello() == "target>root"


def test_original_staticmethod_stays_a_staticmethod() -> None:
    raw = vars(Target)["static"]

    class Static(VLLMPatch[Target]):
        @staticmethod
        def static(x: int) -> int:
            return Target._original_static(x) * 2  # type: ignore[attr-defined,no-any-return]

    Static.apply()
    assert vars(Target)["_original_static"] is raw
    assert isinstance(vars(Target)["static"], staticmethod)
    assert Target.static(1) == 2002
    assert Target().static(1) == 2002
    assert Target()._original_static(1) == 1001  # type: ignore[attr-defined]


def test_original_classmethod_binds_to_the_target_and_its_subclasses() -> None:
    class Make(VLLMPatch[Target]):
        @classmethod
        def make(cls, value: int) -> Any:
            obj = cls._original_make(value + 1)  # type: ignore[attr-defined]
            obj.made_by = cls
            return obj

    Make.apply()
    made = Target.make(1)
    assert type(made) is Target and made.value == 2 and made.made_by is Target
    sub = SubTarget.make(1)
    assert type(sub) is SubTarget and sub.made_by is SubTarget
    assert Target._original_make.__self__ is Target  # type: ignore[attr-defined]


def test_original_inherited_classmethod() -> None:
    class Kind(VLLMPatch[Target]):
        @classmethod
        def kind(cls) -> str:
            return "patched/" + cls._original_kind()  # type: ignore[attr-defined,no-any-return]

    Kind.apply()
    assert Target.kind() == "patched/root-kind:Target"
    assert SubTarget.kind() == "patched/root-kind:SubTarget"


def test_original_property_behaves_as_before() -> None:
    class Prop(VLLMPatch[Target]):
        @property
        def prop(self) -> int:
            return self._original_prop + 1  # type: ignore[attr-defined,no-any-return]

        @prop.setter
        def prop(self, v: int) -> None:
            self.value = v // 10

    Prop.apply()
    obj = Target(2)
    assert obj.prop == 21
    assert obj._original_prop == 20  # type: ignore[attr-defined]
    obj.prop = 70
    assert obj.value == 7


def test_dunder_members_and_their_originals() -> None:
    class Dunders(VLLMPatch[Target]):
        def __init__(self, value: int = 1) -> None:
            self._original___init__(value * 100)  # type: ignore[attr-defined]

        def __repr__(self) -> str:
            return "patched " + self._original___repr__()  # type: ignore[attr-defined,no-any-return]

        def __eq__(self, other: object) -> bool:
            return isinstance(other, Target) and other.value == self.value

        __hash__ = None  # type: ignore[assignment]

    Dunders.apply()
    assert repr(Target(2)) == "patched Target(200)"
    assert Target(1) == Target(1)
    assert vars(Target)["_original___eq__"] is object.__dict__["__eq__"]
    with pytest.raises(TypeError):
        hash(Target())


def test_class_attributes_and_new_members_are_added() -> None:
    class Adds(VLLMPatch[Target]):
        counter = 5
        LIMIT = 7

        def extra(self) -> int:
            return self.LIMIT + self.counter  # type: ignore[attr-defined,no-any-return]

    Adds.apply()
    assert Target.counter == 5 and Target.LIMIT == 7  # type: ignore[attr-defined]
    assert Target().extra() == 12  # type: ignore[attr-defined]
    assert Target._original_counter == 0  # type: ignore[attr-defined]
    (status,) = [s for s in PatchManager.status() if s.name == "Adds"]
    assert status.overrides == ("counter",)
    assert set(status.additions) == {"LIMIT", "extra"}


def test_zero_argument_super_resolves_against_the_target() -> None:
    class Super(VLLMPatch[Target]):
        def hello(self) -> str:
            return "patched>" + super().hello()

        @classmethod
        def kind(cls) -> str:
            return "K>" + super().kind()

        @property
        def prop(self) -> int:
            return -1 if __class__ is Target else -2  # type: ignore[name-defined]

        def nested(self) -> str:
            inner = lambda: super(__class__, self).hello()  # type: ignore[name-defined]  # noqa: E731
            return inner()  # type: ignore[no-any-return]

    Super.apply()
    assert Target().hello() == "patched>root"
    assert SubTarget().hello() == "patched>root"
    assert Target.kind() == "K>root-kind:Target"
    assert Target().prop == -1
    assert Target().nested() == "root"  # type: ignore[attr-defined]


def test_super_in_a_grafted_function_keeps_the_patch_class_untouched() -> None:
    class Super2(VLLMPatch[Target]):
        def hello(self) -> str:
            return "p>" + super().hello()

    Super2.apply()
    # The patch class's own function still has its own cell: it was copied, not mutated.
    assert vars(Super2)["hello"].__closure__[0].cell_contents is Super2
    assert vars(Target)["hello"].__closure__[0].cell_contents is Target


def test_descriptor_set_name_is_called_for_the_target() -> None:
    class Cached(VLLMPatch[Target]):
        @functools.cached_property
        def expensive(self) -> int:
            return self.value + 1

    Cached.apply()
    obj = Target(41)
    assert obj.expensive == 42  # type: ignore[attr-defined]
    assert obj.__dict__["expensive"] == 42


def test_string_target_is_imported_only_on_apply(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "lazy_target_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "mod.py").write_text(
        textwrap.dedent(
            """
            class Outer:
                class Inner:
                    def f(self):
                        return "inner"
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "lazy_target_pkg.mod", raising=False)

    class Lazy(VLLMPatch["lazy_target_pkg.mod:Outer.Inner"]):
        def f(self) -> str:
            return "patched " + self._original_f()  # type: ignore[attr-defined,no-any-return]

    assert "lazy_target_pkg.mod" not in sys.modules
    (status,) = [s for s in PatchManager.status() if s.name == "Lazy"]
    assert status.overrides == () and status.target == "lazy_target_pkg.mod:Outer.Inner"
    assert "lazy_target_pkg.mod" not in sys.modules
    assert Lazy.apply()
    from lazy_target_pkg.mod import Outer  # type: ignore[import-not-found]

    assert Outer.Inner().f() == "patched inner"
    before = snapshot_namespace(Outer.Inner)
    Lazy.rollback()
    assert Outer.Inner().f() == "inner"
    assert before.changes()  # it was patched at snapshot time
    monkeypatch.delitem(sys.modules, "lazy_target_pkg.mod")
    monkeypatch.delitem(sys.modules, "lazy_target_pkg")
