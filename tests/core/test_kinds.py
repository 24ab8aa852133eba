"""A patch member must be called as the member it replaces: the same kind (method, static method,
class method, property, plain attribute), unless it is marked ``@changes_kind``.

Apply refuses a kind change (``PatchTargetError``, nothing applied); ``doctor`` reports it as an error
against the installed classes and against source read statically.
"""

from __future__ import annotations

import functools
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from vllm_custom_patches import PatchDefinitionError, PatchManager, PatchTargetError, VLLMPatch, changes_kind
from vllm_custom_patches._upgrade.doctor import check_patches
from vllm_custom_patches._upgrade.vllm_views import InstalledView, StaticView
from vllm_custom_patches.testing import snapshot_namespace

# -- apply ------------------------------------------------------------------------------

KINDS = ["method", "staticmethod", "classmethod", "property", "cached_property", "value"]
CALLED_AS = {"method": "plain method", "staticmethod": "@staticmethod", "classmethod": "@classmethod",
             "property": "property", "cached_property": "property", "value": "plain attribute"}  # fmt: skip


def _make(kind: str, result: str) -> Any:
    def func(*args: Any) -> str:
        return result

    return {
        "method": lambda: func,
        "staticmethod": lambda: staticmethod(func),
        "classmethod": lambda: classmethod(func),
        "property": lambda: property(func),
        "cached_property": lambda: functools.cached_property(func),
        "value": lambda: result,
    }[kind]()


def _target(kind: str) -> type:
    return type("Target", (), {"member": _make(kind, "original")})


def _read(cls: type) -> Any:
    """``obj.member`` the way a caller of that kind would use it."""
    value = cls().member
    return value() if callable(value) else value


@pytest.mark.parametrize("patch_kind", KINDS)
@pytest.mark.parametrize("original_kind", KINDS)
def test_apply_refuses_a_member_of_another_kind_and_changes_nothing(original_kind: str, patch_kind: str) -> None:
    target = _target(original_kind)
    before = snapshot_namespace(target)
    patch = type("KindProbe", (VLLMPatch[target],), {"member": _make(patch_kind, "patched")})

    if CALLED_AS[original_kind] == CALLED_AS[patch_kind]:
        assert patch.apply() is True
        assert _read(target) == "patched"
        patch.rollback()
        before.assert_unchanged()
        return
    with pytest.raises(PatchTargetError) as info:
        patch.apply()
    message = str(info.value)
    assert message.startswith("patch 'KindProbe': 'member' is ")
    assert CALLED_AS[patch_kind] in message.split(" in the patch", maxsplit=1)[0]
    assert f"but a {CALLED_AS[original_kind]}" in message or f"but {CALLED_AS[original_kind]}" in message
    assert "@changes_kind" in message
    before.assert_unchanged()
    assert not patch.is_applied() and PatchManager.applied() == []
    assert target not in PatchManager._registry.owners
    assert _read(target) == "original"


def _marked_variants() -> list[tuple[str, Callable[[], Any]]]:
    def plain(self: Any) -> str:
        return "patched"

    def static() -> str:
        return "patched"

    return [
        ("method over staticmethod", lambda: changes_kind(plain)),
        ("mark above @staticmethod", lambda: changes_kind(staticmethod(static))),
        ("mark below @staticmethod", lambda: staticmethod(changes_kind(static))),
        ("property, marked through its getter", lambda: changes_kind(property(plain))),
    ]


@pytest.mark.parametrize(("label", "make"), _marked_variants(), ids=[label for label, _ in _marked_variants()])
def test_a_member_marked_changes_kind_applies(label: str, make: Callable[[], Any]) -> None:
    class Target:
        @classmethod
        def member(cls) -> str:
            return "original"

    before = snapshot_namespace(Target)
    patch = type("Marked", (VLLMPatch[Target],), {"member": make()})
    assert patch.apply() is True
    assert _read(Target) == "patched"
    patch.rollback()
    before.assert_unchanged()


def test_the_kind_is_the_one_the_inherited_original_has() -> None:
    class Base:
        @staticmethod
        def helper(x: int) -> int:
            return x

    class Target(Base):
        pass

    class Wrong(VLLMPatch[Target]):
        def helper(self, x: int) -> int:
            return x + 1

    with pytest.raises(
        PatchTargetError, match=r"'helper' is a plain method \(def\) in the patch but a @staticmethod in \S*Base:"
    ):
        Wrong.apply()
    assert "helper" not in vars(Target)

    class Right(VLLMPatch[Target]):
        @staticmethod
        def helper(x: int) -> int:
            return Right.original("helper")(x) + 1

    Right.apply()
    assert Target().helper(1) == 2 and Target.helper(1) == 2
    Right.rollback()


def test_blocked_protocols_and_implicit_dunders_are_not_kind_changes() -> None:
    class Target:  # noqa: PLW1641 - the implicit __hash__ = None is the subject
        def __eq__(self, other: object) -> bool:  # Python sets __hash__ = None beside it
            return True

        def __new__(cls, *args: Any) -> Target:  # an implicit staticmethod
            return super().__new__(cls)

        def method(self) -> int:
            return 1

    assert vars(Target)["__hash__"] is None

    class Hashable(VLLMPatch[Target]):
        def __hash__(self) -> int:  # makes a blocked protocol work: nothing called it before
            return 7

        def __new__(cls, *args: Any) -> Any:  # implicit staticmethod over implicit staticmethod
            return Hashable.original("__new__")(cls)

        def __init_subclass__(cls, **kwargs: Any) -> None:  # implicit classmethod over object's
            super().__init_subclass__(**kwargs)

    Hashable.apply()
    assert hash(Target()) == 7
    Hashable.rollback()

    class Unhashable(VLLMPatch[Target]):
        method = None  # blocks it: None is never judged

    Unhashable.apply()
    Unhashable.rollback()


def test_a_c_types_class_method_is_a_class_method() -> None:
    class Table(dict):  # type: ignore[type-arg]
        pass

    class Wrong(VLLMPatch[Table]):
        def fromkeys(self, keys: Any) -> Any:
            return {}

    with pytest.raises(PatchTargetError, match="in the patch but a @classmethod in dict"):
        Wrong.apply()

    class Right(VLLMPatch[Table]):
        @classmethod
        def fromkeys(cls, keys: Any, value: Any = None) -> Any:
            return Right.original("fromkeys")(keys, "patched")

    Right.apply()
    assert Table.fromkeys(["a"]) == {"a": "patched"}
    Right.rollback()


def test_a_plain_value_cannot_be_marked() -> None:
    with pytest.raises(
        PatchDefinitionError, match="@changes_kind marks functions, static and class methods and properties"
    ):
        changes_kind(5)


# -- doctor: the installed classes and their source read statically -----------------------

SOURCE = """
    def _get_budget(self):
        return 1


    class Base:
        @staticmethod
        def inherited_static(x):
            return x


    class Scheduler(Base):
        @staticmethod
        def static(x):
            return x

        @classmethod
        def build(cls, config):
            return cls()

        @property
        def budget(self):
            return 1

        old_budget = property(_get_budget)
        limit = 4
        aliased = _get_budget  # a function at run time; statically unknown

        def schedule(self, throttle=False):
            return []
"""

PROBES = {
    # member written in the patch -> (finding expected?, what the message names)
    "def static(self, x):\n    return x\n": ("static", "a plain method (def) in the patch but a @staticmethod"),
    "def inherited_static(self, x):\n    return x\n": ("inherited_static", "a @staticmethod in fakekinds.sched:Base"),
    "def build(self, config):\n    return self\n": ("build", "but a @classmethod"),
    "def budget(self):\n    return 2\n": ("budget", "but a property (or other data descriptor)"),
    "def old_budget(self):\n    return 2\n": ("old_budget", "but a property (or other data descriptor)"),
    "@property\ndef limit(self):\n    return 8\n": (
        "limit",
        "a property (or other data descriptor) in the patch but a plain attribute",
    ),
    "@staticmethod\ndef schedule(throttle=False):\n    return []\n": (
        "schedule",
        "a @staticmethod in the patch but a plain method",
    ),
}


@pytest.fixture
def stand_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    root = tmp_path / "src"
    (root / "fakekinds").mkdir(parents=True)
    (root / "fakekinds" / "__init__.py").write_text("")
    (root / "fakekinds" / "sched.py").write_text(textwrap.dedent(SOURCE))
    monkeypatch.syspath_prepend(str(root))
    yield root
    for name in [m for m in sys.modules if m == "fakekinds" or m.startswith("fakekinds.")]:
        del sys.modules[name]


def _probe(body: str) -> Any:
    namespace: dict[str, Any] = {"VLLMPatch": VLLMPatch, "changes_kind": changes_kind}
    source = "class Probe(VLLMPatch['fakekinds.sched:Scheduler']):\n    name = 'probe'\n" + textwrap.indent(
        body, "    "
    )
    exec(compile(source, "<probe>", "exec"), namespace)
    return namespace["Probe"]


def _views(root: Path) -> list[Any]:
    return [InstalledView("1.0.0"), StaticView(root, "1.0.0")]


@pytest.mark.parametrize("body", list(PROBES), ids=[member for member, _ in PROBES.values()])
def test_doctor_reports_a_kind_change_as_an_error_in_both_views(stand_in: Path, body: str) -> None:
    member, text = PROBES[body]
    for view in _views(stand_in):
        findings = check_patches([_probe(body)], view, None)
        kinds = [f for f in findings if f.check == "kind"]
        assert [(f.severity, f.member) for f in kinds] == [("error", member)], (view.label, findings)
        assert text in kinds[0].message and "@changes_kind" in kinds[0].message
        # Called differently, the two signatures do not compare: no second, confusing finding.
        assert not [f for f in findings if f.check == "signature"], findings
        assert not [f for f in findings if f.check in ("apply", "conflict")], findings


def test_doctor_accepts_a_marked_kind_change_and_notes_it(stand_in: Path) -> None:
    body = "@changes_kind\ndef static(self, x):\n    return x\n"
    for view in _views(stand_in):
        findings = check_patches([_probe(body)], view, None)
        assert not [f for f in findings if f.severity == "error"], findings
        (note,) = [f for f in findings if f.check == "kind"]
        assert note.severity == "info" and "marked @changes_kind" in note.message


def test_doctor_is_quiet_where_the_kinds_match_or_cannot_be_told_statically(stand_in: Path) -> None:
    body = (
        "@staticmethod\ndef static(x):\n    return x\n"
        "@classmethod\ndef build(cls, config):\n    return cls()\n"
        "@property\ndef budget(self):\n    return 2\n"
        "limit = 8\n"
        "def schedule(self, throttle=False):\n    return []\n"
    )
    for view in _views(stand_in):
        findings = check_patches([_probe(body)], view, None)
        assert not [f for f in findings if f.check == "kind" or f.severity == "error"], (view.label, findings)
    # ``aliased = _get_budget`` is a method at run time; read statically its kind is unknown, and not judged.
    static = check_patches(
        [_probe("@staticmethod\ndef aliased(x):\n    return x\n")], StaticView(stand_in, "1.0.0"), None
    )
    assert not [f for f in static if f.check == "kind"], static
    installed = check_patches([_probe("@staticmethod\ndef aliased(x):\n    return x\n")], InstalledView("1.0.0"), None)
    assert [f.severity for f in installed if f.check == "kind"] == ["error"]
