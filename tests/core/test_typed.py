"""``TypedAs[Target]``: the target's type for ``self`` in a type checker, nothing at run time."""

from __future__ import annotations

import abc
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from vllm_custom_patches import TypedAs, VLLMPatch
from vllm_custom_patches.testing import applied, snapshot_namespace

SRC = Path(__file__).resolve().parents[2] / "src"


class _Interface(abc.ABC):  # vLLM's schedulers are ABCs: their metaclass is ABCMeta
    @abc.abstractmethod
    def step(self) -> str: ...


def _target() -> type:
    class Target(_Interface):
        limit = 1

        def step(self) -> str:
            return "step"

        def size(self) -> int:
            return 1

    return Target


def _changed(before: dict[str, object], cls: type) -> set[str]:
    after = vars(cls)
    return {k for k in before.keys() | after.keys() if before.get(k, before) is not after.get(k, before)}


def test_a_typed_patch_grafts_exactly_what_the_same_patch_without_typed_as_grafts() -> None:
    plain_target, typed_target = _target(), _target()

    class Plain(VLLMPatch[plain_target]):  # type: ignore[valid-type,misc]
        limit = 2

        def step(self) -> str:
            return "patched " + self._original_step()  # type: ignore[attr-defined,no-any-return]

        def extra(self) -> int:
            return 3

    class Typed(VLLMPatch[typed_target], TypedAs[typed_target]):  # type: ignore[valid-type,misc]
        limit = 2

        def step(self) -> str:
            return "patched " + self._original_step()  # type: ignore[attr-defined,no-any-return]

        def extra(self) -> int:
            return 3

    assert Typed._vcp_spec.members.keys() == Plain._vcp_spec.members.keys() == {"limit", "step", "extra"}
    assert Typed._vcp_spec.target is typed_target
    plain_before, typed_before = dict(vars(plain_target)), dict(vars(typed_target))
    plain_snapshot, typed_snapshot = snapshot_namespace(plain_target), snapshot_namespace(typed_target)
    with applied(Plain, Typed):
        assert _changed(typed_before, typed_target) == _changed(plain_before, plain_target)
        assert _changed(typed_before, typed_target) == {"limit", "step", "extra", "_original_step", "_original_limit"}
        assert typed_target().step() == "patched step"
    plain_snapshot.assert_unchanged()
    typed_snapshot.assert_unchanged()


def test_typed_as_reads_no_argument_and_names_no_target() -> None:
    # Whatever it names (a class imported only for type checkers, any string), nothing is imported.
    assert TypedAs["no_such_module_for_vcp_typed:Nothing"] is TypedAs[int] is TypedAs
    assert "no_such_module_for_vcp_typed" not in sys.modules
    target, other = _target(), _target()

    class Elsewhere(TypedAs[other], VLLMPatch[target]):  # type: ignore[valid-type,misc]
        def size(self) -> int:
            return 2

    assert Elsewhere._vcp_spec.members.keys() == {"size"}  # none of TypedAs's own (__class_getitem__)
    other_snapshot = snapshot_namespace(other)
    with applied(Elsewhere):
        assert target().size() == 2 and other().size() == 1  # the target is VLLMPatch's
    other_snapshot.assert_unchanged()


_CHECKED = """
from __future__ import annotations

import abc
import sys

from vllm_custom_patches import TypedAs, VLLMPatch

if sys.version_info >= (3, 12):
    from typing import override
else:
    from typing_extensions import override


class Target(abc.ABC):
    count: int = 0

    def run(self, n: int) -> int:
        return n


class P(VLLMPatch[Target], TypedAs[Target]):
    @override
    def run(self, n: int) -> int:
        reveal_type(self.count)
        print(self.cont)
        return self.count + n

    @override
    def rn(self) -> None: ...


P.apply()
"""


def test_a_type_checker_sees_self_as_the_target(tmp_path: Path) -> None:
    # The lint step proves the catalogue type-checks; this proves that TypedAs makes it mean
    # something: were TypedAs Any to a type checker, the typo below would pass unseen.
    (tmp_path / "typed_patch.py").write_text(textwrap.dedent(_CHECKED))
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--cache-dir", str(tmp_path / "cache"),
         "--config-file", "", "typed_patch.py"],
        cwd=tmp_path, env={**os.environ, "MYPYPATH": str(SRC)},
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    found = [line.split(": ", 1)[1] for line in done.stdout.splitlines() if line.startswith("typed_patch.py:")]
    assert found == [
        'note: Revealed type is "int"',
        'error: "P" has no attribute "cont"  [attr-defined]',
        'error: Method "rn" is marked as an override, but no base method was found with this name  [misc]',
    ], done.stdout + done.stderr
