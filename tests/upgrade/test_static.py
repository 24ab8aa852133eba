"""Reading classes from source without importing them (``vllm_custom_patches._upgrade.static``)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

from vllm_custom_patches._upgrade import static as _static
from vllm_custom_patches._upgrade.static import SourceTree, StaticClass, load_tree, wheel_cache_dir

FILES = {
    "pkg/__init__.py": """
        from .reexp import D
        from .core.base import Base as Base
    """,
    "pkg/util.py": """
        class Helper:
            pass
    """,
    "pkg/core/__init__.py": """
        from .impl import *


        class Plain(object):
            pass


        class FromStar(Right):
            pass
    """,
    "pkg/core/base.py": '''
        import abc
        from typing import TYPE_CHECKING, Generic, TypeVar

        T = TypeVar("T")


        def deco(f):
            return f


        class Base(abc.ABC, Generic[T]):
            """Doc."""

            limit: int = 3
            a, (b, *c) = 1, (2, 3)
            obj.attr = 4

            def run(self, x):
                return x

            def only_right(self):
                return "base"

            @staticmethod
            def make():
                ...

            @classmethod
            def build(cls):
                ...

            @property
            def size(self):
                return 1

            @abc.abstractmethod
            async def fetch(self):
                ...

            @deco
            @deco
            def decorated(self,
                          y):
                return "é" + y  # comment

            class Inner:
                def ping(self):
                    return 1

            class Inner2(Inner):
                pass


        if TYPE_CHECKING:
            class OnlyTyping(Base):
                pass

        try:
            from fast import Thing
        except ImportError:
            class Thing:
                pass
    ''',
    "pkg/core/impl.py": """
        from __future__ import annotations

        import pkg.core.base
        import pkg.core.base as cb
        from . import base
        from .. import util
        from .base import Base as B


        class Left(B[int]):
            def run(self, x):
                return super().run(x) + 1

            def ping(self):
                class Local(object):
                    def ping(self):
                        return super().local_only()
                return Local


        class Right(base.Base):
            def run(self, x):
                return super(Right, self).run(x) * 2

            def only_right(self):
                return "right"

            @property
            def size(self):
                return super().size + 1


        class Diamond(Left, Right):
            pass


        class ViaDotted(pkg.core.base.Base):
            pass


        class ViaAlias(cb.Base):
            pass


        class NestedSub(base.Base.Inner):
            pass


        class UsesUtil(util.Helper, object, make_base()):
            pass
    """,
    "pkg/reexp.py": """
        from pkg.core.impl import Diamond as D
        Alias = D
    """,
    "pkg/shadow.py": """
        from pkg.core.base import Base


        class Base(Base):
            def run(self, x):
                return super().run(x)
    """,
}


def write_tree(root: Path) -> Path:
    for name, text in FILES.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return root


@pytest.fixture
def tree(tmp_path: Path) -> SourceTree:
    return SourceTree(write_tree(tmp_path / "src"))


def find(tree: SourceTree, target: str) -> StaticClass:
    cls = tree.find_class(target)
    assert cls is not None, target
    return cls


def test_module_path_prefers_package(tree: SourceTree) -> None:
    assert tree.module_path("pkg") == tree.root / "pkg/__init__.py"
    assert tree.module_path("pkg.core.impl") == tree.root / "pkg/core/impl.py"
    assert tree.module_path("pkg.nothing") is None


def test_members_kinds_and_sources(tree: SourceTree) -> None:
    base = find(tree, "pkg.core.base:Base")
    assert (base.module, base.qualname, base.file) == ("pkg.core.base", "Base", tree.root / "pkg/core/base.py")
    kinds = {name: m.kind for name, m in base.members.items()}
    assert kinds == {
        "limit": "attribute",
        "a": "attribute",
        "b": "attribute",
        "c": "attribute",
        "run": "function",
        "only_right": "function",
        "make": "staticmethod",
        "build": "classmethod",
        "size": "property",
        "fetch": "async function",
        "decorated": "function",
    }
    decorated = '@deco\n@deco\ndef decorated(self,\n              y):\n    return "é" + y'
    assert base.members["decorated"].source == decorated
    assert base.members["limit"].source == "limit: int = 3"
    assert isinstance(base.members["limit"].node, ast.AnnAssign)
    assert isinstance(base.members["fetch"].node, ast.AsyncFunctionDef)
    assert base.members["make"].source.startswith("@staticmethod\ndef make():")
    assert base.members["run"].calls_super == frozenset()


def test_bases_resolved_through_imports(tree: SourceTree) -> None:
    base = "pkg.core.base.Base"
    assert find(tree, "pkg.core.base:Base").bases == ("abc.ABC", "typing.Generic")
    assert find(tree, "pkg.core.impl:Left").bases == (base,)  # aliased and subscripted
    assert find(tree, "pkg.core.impl:Right").bases == (base,)  # `from . import base`
    assert find(tree, "pkg.core.impl:ViaDotted").bases == (base,)  # `import a.b`
    assert find(tree, "pkg.core.impl:ViaAlias").bases == (base,)  # `import a.b as c`
    assert find(tree, "pkg.core.impl:Diamond").bases == ("pkg.core.impl.Left", "pkg.core.impl.Right")
    assert find(tree, "pkg.core.impl:NestedSub").bases == ("pkg.core.base.Base.Inner",)
    assert find(tree, "pkg.core.impl:UsesUtil").bases == ("pkg.util.Helper", "object", "make_base()")
    # `from x import Base` then `class Base(Base)`: the base is the imported one.
    assert find(tree, "pkg.shadow:Base").bases == (base,)
    # Through `from .impl import *`; and a name no import provides stays as written.
    assert find(tree, "pkg.core:FromStar").bases == ("pkg.core.impl.Right",)
    assert find(tree, "pkg.core:Plain").bases == ("object",)


def test_nested_and_guarded_classes(tree: SourceTree) -> None:
    inner2 = find(tree, "pkg.core.base:Base.Inner2")
    assert inner2.qualname == "Base.Inner2"
    assert inner2.bases == ("pkg.core.base.Base.Inner",)  # resolved in the class body's scope
    inner = find(tree, "pkg.core.base:Base.Inner")
    assert tree.lookup(inner2, "ping") == (inner, inner.members["ping"])
    assert find(tree, "pkg.core.base:OnlyTyping").bases == ("pkg.core.base.Base",)
    assert find(tree, "pkg.core.base:Thing").members == {}
    assert tree.find_class("pkg.core.base:Base.Missing") is None
    assert tree.find_class("pkg.core.base:Missing") is None
    assert tree.find_class("pkg.core.base:deco") is None  # a function, not a class
    assert tree.find_class("pkg.nothing:X") is None
    with pytest.raises(ValueError):
        tree.find_class("pkg.core.base.Base")


@pytest.mark.skipif(sys.version_info < (3, 11), reason="except* is Python 3.11 syntax")
def test_classes_under_except_star(tmp_path: Path) -> None:
    (tmp_path / "m.py").write_text("try:\n    pass\nexcept* ValueError:\n    class C:\n        x = 1\n")
    assert set(find(SourceTree(tmp_path), "m:C").members) == {"x"}


def test_reexports_followed_to_the_definition(tree: SourceTree) -> None:
    diamond = find(tree, "pkg.core.impl:Diamond")
    assert tree.find_class("pkg.reexp:D") == diamond  # `from x import C as D`
    assert tree.find_class("pkg.reexp:Alias") == diamond  # `Alias = D`
    assert tree.find_class("pkg:D") == diamond  # two hops through __init__.py
    assert tree.find_class("pkg.core:Left") == find(tree, "pkg.core.impl:Left")  # `import *`
    assert find(tree, "pkg:Base").module == "pkg.core.base"


def test_c3_lookup(tree: SourceTree) -> None:
    diamond, left, right = (find(tree, f"pkg.core.impl:{n}") for n in ("Diamond", "Left", "Right"))
    base = find(tree, "pkg.core.base:Base")
    assert tree.lookup(diamond, "run") == (left, left.members["run"])
    # Depth-first would reach Base through Left; C3 puts Right before Base.
    assert tree.lookup(diamond, "only_right") == (right, right.members["only_right"])
    assert tree.lookup(diamond, "make") == (base, base.members["make"])
    assert tree.lookup(diamond, "nothing") is None
    assert tree.lookup(find(tree, "pkg.shadow:Base"), "size") == (base, base.members["size"])


def test_super_calls(tree: SourceTree) -> None:
    left, right = find(tree, "pkg.core.impl:Left"), find(tree, "pkg.core.impl:Right")
    assert left.members["run"].calls_super == {"run"}
    assert right.members["run"].calls_super == {"run"}  # super(Right, self)
    assert right.members["size"].calls_super == {"size"}
    assert left.members["ping"].calls_super == frozenset()  # the nested class's own super()


def test_subclasses(tree: SourceTree) -> None:
    base = find(tree, "pkg.core.base:Base")
    names = {(c.module, c.qualname) for c in tree.subclasses(base, "pkg")}
    impl = {("pkg.core.impl", n) for n in ("Left", "Right", "Diamond", "ViaDotted", "ViaAlias")}
    assert names == impl | {("pkg.core.base", "OnlyTyping"), ("pkg.shadow", "Base"), ("pkg.core", "FromStar")}
    assert {c.qualname for c in tree.subclasses(find(tree, "pkg.core.impl:Left"), "pkg.core.impl")} == {"Diamond"}
    inner = find(tree, "pkg.core.base:Base.Inner")
    assert {c.qualname for c in tree.subclasses(inner, "pkg")} == {"Base.Inner2", "NestedSub"}
    assert tree.subclasses(base, "pkg.nothing") == []


def test_each_file_parsed_once(tree: SourceTree, monkeypatch: pytest.MonkeyPatch) -> None:
    parsed: list[str] = []
    real = ast.parse

    def counting(source: str, filename: str = "<unknown>", *args: object, **kwargs: object) -> ast.Module:
        parsed.append(filename)
        return real(source, filename)

    monkeypatch.setattr(ast, "parse", counting)  # the module _static parses with
    base = find(tree, "pkg.core.base:Base")
    for _ in range(2):
        tree.subclasses(base, "pkg")
        tree.find_class("pkg:D")
    assert parsed and len(parsed) == len(set(parsed))


def test_load_tree_from_wheel(tmp_path: Path) -> None:
    src = write_tree(tmp_path / "src")
    whl = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as zf:
        for path in sorted(src.rglob("*.py")):
            zf.write(path, path.relative_to(src).as_posix())
        zf.writestr("pkg-1.0.dist-info/METADATA", "Name: pkg\n")
        zf.writestr("../evil.py", "x = 1\n")
    tree = load_tree(whl)
    assert tree.root.parent == tmp_path and tree.root.name.startswith("pkg-1.0-py3-none-any.")  # then the wheel's hash
    assert tree.root.name.endswith(".src")
    assert find(tree, "pkg:D").qualname == "Diamond"
    assert not (tree.root / "pkg-1.0.dist-info").exists()
    assert not (tmp_path / "evil.py").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [tree.root.name, whl.name, "src"]  # no temporary left
    # Reused, not unpacked again.
    (tree.root / "pkg/util.py").unlink()
    assert load_tree(whl).module_path("pkg.util") is None
    assert load_tree(src).root == src
    with pytest.raises(FileNotFoundError):
        load_tree(tmp_path / "missing.whl")


def test_wheel_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_CUSTOM_PATCHES_CACHE_DIR", str(tmp_path / "cache"))
    assert wheel_cache_dir() == tmp_path / "cache" and (tmp_path / "cache").is_dir()
    monkeypatch.delenv("VLLM_CUSTOM_PATCHES_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert wheel_cache_dir() == tmp_path / "home/.cache/vllm-custom-patches"
    assert wheel_cache_dir().is_dir()


PURELIB = Path(sysconfig.get_paths()["purelib"])

# Run in a fresh interpreter, so that "vllm was never imported" means something.
REAL_CHECK = """
import sys
from pathlib import Path
from vllm_custom_patches._upgrade.static import SourceTree

tree = SourceTree(Path(sys.argv[1]))
sched = tree.find_class("vllm.v1.core.sched.scheduler:Scheduler")
assert sched is not None and sched.module == "vllm.v1.core.sched.scheduler"
assert {"schedule", "update_from_output", "add_request", "_update_after_schedule"} <= set(sched.members)
src = sched.members["schedule"].source
assert src.startswith("def schedule(self") or src.startswith("@"), src[:80]
subs = {(c.module, c.qualname): c for c in tree.subclasses(sched, "vllm.v1.core.sched")}
async_sched = subs[("vllm.v1.core.sched.async_scheduler", "AsyncScheduler")]
assert "_update_after_schedule" in async_sched.members["_update_after_schedule"].calls_super
owner, member = tree.lookup(async_sched, "schedule")
assert (owner.module, owner.qualname) == ("vllm.v1.core.sched.scheduler", "Scheduler")
assert member is sched.members["schedule"]
assert not [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")], "vllm was imported"
assert "torch" not in sys.modules
print("ok")
"""


def test_real_vllm_source_read_statically() -> None:
    if not (PURELIB / "vllm/v1/core/sched/scheduler.py").is_file():
        pytest.skip("vLLM's source is not installed here")
    before = {m for m in sys.modules if m == "vllm" or m.startswith("vllm.")}
    src = str(Path(_static.__file__).parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(
        [sys.executable, "-c", REAL_CHECK, str(PURELIB)], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
    assert {m for m in sys.modules if m == "vllm" or m.startswith("vllm.")} == before
