"""Bad values of the four settings, through the real ``register()``.

``VLLM_CUSTOM_PATCHES``, ``VLLM_CUSTOM_PATCHES_STRICT``, ``VLLM_CUSTOM_PATCHES_PATH``
and ``VLLM_CUSTOM_PATCHES_VLLM_VERSION`` get arbitrary text (alone and together),
and hand-picked odd values.  Whatever they hold, ``register()`` either succeeds
or raises a :class:`PatchError` whose message names the setting at fault and
how to fix it -- never another exception type -- and every target is, per
patch, either fully patched (exactly the members of the applied patches are
changed) or untouched.

What the other files already cover, and this one does not repeat: the parser
alone over arbitrary text (test_selection), a narrow alphabet through
``register()`` checking only the exception type (test_plugin), single bad
``VLLM_CUSTOM_PATCHES_PATH`` entries one by one (test_discovery), version
strings through ``check_gate`` (test_versions).

Installed entry points are hidden here (``find_entry_points`` returns nothing):
discovery has its own tests, and with ``*`` the shipped catalogue would import
vLLM's scheduler package.  The registry is emptied for each example, so only
the patches defined below are known.
"""

from __future__ import annotations

import os
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from _helpers import clean_env, fresh_plugin
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from packaging.version import Version

from vllm_custom_patches import (
    PatchConfigError,
    PatchError,
    PatchManager,
    PatchVersionError,
    VLLMPatch,
    max_vllm_version,
    min_vllm_version,
    plugin,
)
from vllm_custom_patches._core.graft import MISSING
from vllm_custom_patches._core.versions import _installed_vllm_version, release_of
from vllm_custom_patches._runtime import activation as _activation
from vllm_custom_patches.testing import snapshot_namespace

ENV_PATCHES = "VLLM_CUSTOM_PATCHES"
ENV_STRICT = "VLLM_CUSTOM_PATCHES_STRICT"
ENV_PATH = "VLLM_CUSTOM_PATCHES_PATH"
ENV_VERSION = "VLLM_CUSTOM_PATCHES_VLLM_VERSION"
ALL_VARS = (ENV_PATCHES, ENV_STRICT, ENV_PATH, ENV_VERSION)
PATH_MODULES = "vllm_custom_patches_path"

FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# -- the patches ---------------------------------------------------------------------------

MEMBERS = {
    "fz_a": {"step", "_original_step"},
    "fz_b": {"stop", "_original_stop", "extra"},
    "fz_c": {"step", "_original_step"},  # conflicts with fz_a
    "fz_d": {"more"},
}
"""What each patch changes in the target's ``__dict__`` when applied."""


def define_patches() -> type:
    """A fresh target and four patches on it; registered with the (emptied) manager."""

    class FuzzTarget:
        def step(self) -> str:
            return "original"

        def stop(self) -> str:
            return "stopped"

    class A(VLLMPatch[FuzzTarget]):
        name = "fz_a"

        def step(self) -> str:
            return "a(" + self._original_step() + ")"

    @min_vllm_version("0.1")
    class B(VLLMPatch[FuzzTarget]):
        name = "fz_b"

        def stop(self) -> str:
            return "b(" + self._original_stop() + ")"

        def extra(self) -> int:
            return 1

    class C(VLLMPatch[FuzzTarget]):
        name = "fz_c"

        def step(self) -> str:
            return "c"

    @max_vllm_version("0.1")
    class D(VLLMPatch[FuzzTarget]):
        name = "fz_d"

        def more(self) -> int:
            return 2

    return FuzzTarget


FILE_PATCH = """
from vllm_custom_patches import VLLMPatch


class FileTarget:
    def run(self):
        return "original"


class FilePatch(VLLMPatch[FileTarget]):
    name = "fz_file"

    def run(self):
        return "patched:" + self._original_run()
"""


# -- the file system the PATH values point into ----------------------------------------------


@dataclass(frozen=True)
class Tree:
    root: Path
    entries: dict[str, Path]
    """Name -> path; the names are also valid relative paths (the tests run in ``root``)."""
    refused: frozenset[str]
    """Entries that VLLM_CUSTOM_PATCHES_PATH must refuse (missing, not a directory, unsafe)."""


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.write_text(textwrap.dedent(text))
    path.chmod(mode)


def _directory(path: Path, mode: int = 0o755) -> Path:
    path.mkdir()
    path.chmod(mode)
    return path


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Tree:
    root = tmp_path_factory.mktemp("env-fuzz")
    root.chmod(0o755)
    good = _directory(root / "good")
    _write(good / "fzfile.py", FILE_PATCH)
    _write(good / "_helper.py", "raise RuntimeError('never imported')")
    empty = _directory(root / "empty")
    open_dir = _directory(root / "open777", 0o777)
    _write(open_dir / "evil.py", "raise RuntimeError('must never run')")
    group_dir = _directory(root / "group775", 0o775)
    _write(group_dir / "evil.py", "raise RuntimeError('must never run')")
    open_file_dir = _directory(root / "openfile")
    _write(open_file_dir / "evil.py", "raise RuntimeError('must never run')", 0o666)
    broken = _directory(root / "broken")
    _write(broken / "boom.py", "raise ValueError('boom')")
    clash = _directory(root / "clash")
    _write(  # registers a second patch named fz_a: raises while imported
        clash / "clash.py",
        """
        from vllm_custom_patches import VLLMPatch

        class Other:
            def step(self):
                return 0

        class Fz(VLLMPatch[Other]):
            name = "fz_a"

            def step(self):
                return 1
        """,
    )
    dup = _directory(root / "dup")  # same module name as good/fzfile.py
    _write(dup / "fzfile.py", FILE_PATCH)
    odd = _directory(root / "odd")
    _directory(odd / "notafile.py")  # a directory named like a patch file
    _write(odd / "my-patch.py", "")  # not a module name
    (odd / "dangling.py").symlink_to(root / "nowhere.py")
    _write(root / "afile.txt", "not a directory")
    (root / "link777").symlink_to(open_dir)
    entries = {
        "good": good,
        "empty": empty,
        "open777": open_dir,
        "group775": group_dir,
        "openfile": open_file_dir,
        "broken": broken,
        "clash": clash,
        "dup": dup,
        "odd": odd,
        "afile.txt": root / "afile.txt",
        "link777": root / "link777",
        "missing": root / "missing",
    }
    refused = frozenset({"open777", "group775", "openfile", "odd", "afile.txt", "link777", "missing"})
    return Tree(root, entries, refused)


@pytest.fixture(autouse=True)
def _hermetic(monkeypatch: pytest.MonkeyPatch, tree: Tree) -> Iterator[None]:
    clean_env(monkeypatch)
    monkeypatch.chdir(tree.root)
    monkeypatch.setattr(_activation, "find_entry_points", dict)
    yield


# -- running register() under one set of values ----------------------------------------------


@dataclass
class Outcome:
    error: BaseException | None
    target: type
    applied: list[str]
    file_loaded: bool
    """Whether a VLLM_CUSTOM_PATCHES_PATH file defining fz_file was imported."""


def run_register(values: dict[str, str | None]) -> Outcome:
    """Set the variables (None: unset), run register() as in a fresh process, check the invariants."""
    saved = {name: os.environ.get(name) for name in ALL_VARS}
    try:
        for name in ALL_VARS:
            value = values.get(name)
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        with fresh_plugin():
            reg = PatchManager._registry
            assert not reg.applied, f"patches applied before the example: {list(reg.applied)}"
            reg.patches.clear()
            reg.outcomes.clear()
            target = define_patches()
            before = snapshot_namespace(target)
            error: BaseException | None = None
            try:
                plugin.register()
            except Exception as exc:
                error = exc
            applied = PatchManager.applied()
            check_target_whole(before, applied)
            check_file_target(applied)
            return Outcome(error, target, applied, f"{PATH_MODULES}.fzfile" in sys.modules)
    finally:
        for name, old in saved.items():
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old


def check_target_whole(before: Any, applied: list[str]) -> None:
    """Exactly the members of the applied patches changed: none half-applied, nothing else touched."""
    target = before.cls
    now = dict(vars(target))
    changed = {
        n for n in before.entries.keys() | now.keys() if before.entries.get(n, MISSING) is not now.get(n, MISSING)
    }
    expected = set().union(*(MEMBERS[name] for name in applied if name in MEMBERS))
    assert changed == expected, f"applied {applied}, but changed {sorted(changed)}:\n" + "\n".join(before.changes())
    step = "a(original)" if "fz_a" in applied else "c" if "fz_c" in applied else "original"
    assert target().step() == step
    assert target().stop() == ("b(stopped)" if "fz_b" in applied else "stopped")


def check_file_target(applied: list[str]) -> None:
    module = sys.modules.get(f"{PATH_MODULES}.fzfile")
    if module is None:
        assert "fz_file" not in applied
        return
    cls = module.FileTarget
    if "fz_file" in applied:
        assert cls().run() == "patched:original" and "_original_run" in vars(cls)
    else:
        assert cls().run() == "original" and set(vars(cls)) & {"_original_run"} == set()
        assert vars(cls)["run"].__qualname__ == "FileTarget.run"


def strict_word(value: str | None) -> bool | None:
    """What VLLM_CUSTOM_PATCHES_STRICT means: True/False, None if it is not a boolean."""
    if value is None or not value.strip():
        return True
    word = value.strip().lower()
    return True if word in {"1", "true", "yes", "on"} else False if word in {"0", "false", "no", "off"} else None


def judge(values: dict[str, str | None], outcome: Outcome) -> None:
    """The promises that hold for any values."""
    error = outcome.error
    selection = values.get(ENV_PATCHES)
    if selection is None or not selection.strip():
        # Nothing selected: nothing else is even read.
        assert error is None, f"{type(error).__name__}: {error}"
        assert outcome.applied == []
        return
    strict = strict_word(values.get(ENV_STRICT))
    if error is None:
        assert strict is not None, f"{ENV_STRICT}={values.get(ENV_STRICT)!r} was accepted"
        return
    assert isinstance(error, PatchError), f"not a PatchError: {type(error).__name__}: {error}"
    message = str(error)
    if strict is None:
        assert isinstance(error, PatchConfigError)
        assert message.startswith(f"{ENV_STRICT}={values[ENV_STRICT]!r} is not a boolean. Set it to 1")
        assert outcome.applied == []
        return
    assert strict, f"{ENV_STRICT}={values.get(ENV_STRICT)!r} (off) but register() raised: {message}"
    # The strict-mode error: one header naming the setting, one line per problem, the way out.
    assert message.startswith(f"vllm-custom-patches: {ENV_PATCHES}={selection!r} cannot be honoured in process ")
    assert message.endswith(f"or set {ENV_STRICT}=0 to log such problems and start without those patches.")
    assert isinstance(error.__cause__, type(error))
    # Split on the list markers, not on line breaks: a value may hold a line break of its own.
    _, marker, listed = message.partition(":\n  - ")
    assert marker, message
    problems = listed.rsplit("\nFix the patch or the setting named above", 1)[0].split("\n  - ")
    for line in problems:
        if line.startswith(ENV_PATH + ":"):
            assert any(fix in line for fix in ("chmod go-w", "directories", "rename", "cannot read", "cannot list")), (
                line
            )
        elif "requires vLLM" in line:
            version = (values.get(ENV_VERSION) or "").strip()
            if version:
                assert f"${ENV_VERSION}" in line, line  # the source of the version is named
            if "not a PEP 440 version" in line:
                assert f"set {ENV_VERSION}" in line, line
        elif "no patch named" in line:
            assert "Available: " in line, line
    if isinstance(error, PatchVersionError):
        assert any("requires vLLM" in line for line in problems)


# -- properties ------------------------------------------------------------------------------

_env_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=40)
"""Any text an environment variable can hold (no NUL, no lone surrogate)."""

_tokens = st.lists(
    st.sampled_from(
        ["fz_a", "fz_b", "fz_c", "fz_d", "fz_file", "fz_zz", "*", "-fz_a", "-fz_c", "-", " ", "", "é", "1x"]
    ),
    min_size=1,
    max_size=6,
).map(",".join)
_valid = st.tuples(
    st.lists(st.sampled_from(["fz_a", "fz_b", "fz_c", "fz_d", "fz_file", " fz_b "]), max_size=4),
    st.sampled_from(["", "*", "*,-fz_a", "*,-fz_c,-fz_file"]),
).map(lambda parts: ",".join([*parts[0], parts[1]]))
_selection = st.one_of(_env_text, _tokens, _valid, _valid)
"""Weighted towards well-formed lists of names, so that patches get applied, skipped and refused."""
_strict_ok = st.sampled_from(["1", "0", " off ", "TRUE", "", "yes"])
_strict = st.one_of(st.none(), _strict_ok, _strict_ok, _strict_ok, st.sampled_from(["maybe", "2", "-1"]), _env_text)
_version = st.one_of(
    st.none(),
    st.sampled_from(["dev", "", "  ", "0.32.0+cpu", "0.0.1", "0.0.5", "0.32.0rc1.dev3+g1", "v0.32", "1!0", "0.32.0\n"]),
    _env_text,
)


def _path_value(tree: Tree) -> st.SearchStrategy[str]:
    """Entries of the tree (relative, as the tests run in its root, or absolute), blanks and any text, joined oddly."""
    named = [*sorted(tree.entries), *(str(path) for path in tree.entries.values()), str(tree.root)]
    component = st.one_of(st.sampled_from([*named, "", " ", ".", "~", "$HOME"]), _env_text)
    separator = st.sampled_from([os.pathsep, os.pathsep * 2, os.pathsep + " ", ";", ",", " ", "\n", "\t"])
    return st.one_of(
        _env_text,
        st.tuples(st.lists(component, max_size=4), separator).map(lambda parts: parts[1].join(parts[0])),
    )


@FUZZ
@given(data=st.data())
def test_any_values_of_the_four_settings(data: st.DataObject, tree: Tree) -> None:
    values = {
        ENV_PATCHES: data.draw(st.one_of(st.none(), _selection), label=ENV_PATCHES),
        ENV_STRICT: data.draw(_strict, label=ENV_STRICT),
        ENV_PATH: data.draw(st.one_of(st.none(), st.just("good"), _path_value(tree)), label=ENV_PATH),
        ENV_VERSION: data.draw(_version, label=ENV_VERSION),
    }
    outcome = run_register(values)
    judge(values, outcome)
    event(f"{type(outcome.error).__name__ if outcome.error else 'no error'}, {len(outcome.applied)} applied")


@FUZZ
@given(value=_env_text)
@example(value="")
@example(value="dev")
def test_any_selection_value(value: str) -> None:
    judge({ENV_PATCHES: value}, run_register({ENV_PATCHES: value}))


@FUZZ
@given(value=_env_text)
def test_any_strict_value(value: str) -> None:
    values = {ENV_PATCHES: "fz_a", ENV_STRICT: value}
    outcome = run_register(values)
    judge(values, outcome)
    if strict_word(value) is not None:
        assert outcome.applied == ["fz_a"]


@FUZZ
@given(data=st.data())
def test_any_path_value(data: st.DataObject, tree: Tree) -> None:
    path = data.draw(_path_value(tree), label=ENV_PATH)
    strict = data.draw(st.sampled_from(["1", "0"]), label=ENV_STRICT)
    values = {ENV_PATCHES: "fz_a", ENV_PATH: path, ENV_STRICT: strict}
    outcome = run_register(values)
    judge(values, outcome)
    if outcome.error is None:
        assert outcome.applied == ["fz_a"]


@FUZZ
@given(value=_version)
def test_any_version_value(value: str | None) -> None:
    values = {ENV_PATCHES: "fz_a,fz_b", ENV_VERSION: value}
    outcome = run_register(values)
    judge(values, outcome)
    assert "fz_a" in outcome.applied  # ungated: the version never matters
    override = (value or "").strip()
    raw = override or _installed_vllm_version().raw
    release = release_of(raw) if raw else None
    gate_passes = release is not None and release >= release_of("0.1")  # type: ignore[operator]
    assert ("fz_b" in outcome.applied) is gate_passes
    assert (outcome.error is None) is gate_passes
    if not gate_passes:
        assert isinstance(outcome.error, PatchVersionError)
        assert (f"set {ENV_VERSION}" if release is None else f"${ENV_VERSION}" if override else "requires vLLM") in str(
            outcome.error
        )


# -- hand-picked values ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "refused"),
    [
        ("good", False),
        ("{good}", False),
        ("{good}{sep}", False),
        ("{sep}{sep}{good}{sep}{sep}", False),
        (" {good} {sep} ", False),
        ("{good}{sep}empty{sep}broken", False),
        ("{good};{empty}", True),  # ';' is no separator here: one entry that does not exist
        ("{good},{empty}", True),
        ("{good}\n{empty}", True),
        ("missing", True),
        ("{good}{sep}missing", True),
        ("afile.txt", True),
        ("{good}{sep}open777", True),
        ("group775", True),
        ("openfile", True),
        ("link777", True),
        ("odd", True),
        ("{good}{sep}dup", True),
        ("~", True),  # no tilde expansion: a relative name that does not exist
        ("$HOME", True),  # no variable expansion either
    ],
)
@pytest.mark.parametrize("strict", ["1", "0"])
def test_odd_path_values(tree: Tree, path: str, refused: bool, strict: str) -> None:
    value = path.format(sep=os.pathsep, **{k.replace(".", "_"): str(v) for k, v in tree.entries.items()})
    values = {ENV_PATCHES: "fz_a,fz_file", ENV_PATH: value, ENV_STRICT: strict}
    outcome = run_register(values)
    judge(values, outcome)
    if strict == "1" and refused:
        assert isinstance(outcome.error, PatchConfigError)
        assert f"  - {ENV_PATH}: " in str(outcome.error)
        assert outcome.applied == []  # refused before anything is applied
    else:
        assert outcome.error is None, outcome.error
        # Not strict: what was refused is logged, every other entry still loads.
        assert outcome.file_loaded or refused
        assert outcome.applied == ["fz_a", "fz_file"] if outcome.file_loaded else ["fz_a"]


def test_group_or_other_writable_entries_never_run(tree: Tree) -> None:
    values = {
        ENV_PATCHES: "*",
        ENV_PATH: os.pathsep.join(["open777", "group775", "openfile", "link777"]),
        ENV_STRICT: "0",
    }
    outcome = run_register(values)
    judge(values, outcome)
    assert outcome.error is None
    assert not [m for m in sys.modules if m.startswith(f"{PATH_MODULES}.evil")]


@pytest.mark.parametrize("path", ["broken", "clash"])
def test_a_file_that_fails_to_import_is_named_when_a_patch_is_missing(tree: Tree, path: str) -> None:
    values = {ENV_PATCHES: "fz_file", ENV_PATH: path}
    outcome = run_register(values)
    judge(values, outcome)
    assert f"failed to import: {tree.entries[path]}" in str(outcome.error)


@pytest.mark.parametrize(
    ("version", "expected"),
    [
        ("dev", "set VLLM_CUSTOM_PATCHES_VLLM_VERSION"),
        ("", None),
        ("  ", None),
        ("0.32.0+cpu", None),
        ("0.32.0\n", None),
        ("0.32.0rc1.dev3+g1", None),
        ("v0.32", None),  # PEP 440 allows a leading v
        ("garbage", "set VLLM_CUSTOM_PATCHES_VLLM_VERSION"),
        ("0.0.1", "$VLLM_CUSTOM_PATCHES_VLLM_VERSION"),
        ("0.32.0; rm -rf /", "set VLLM_CUSTOM_PATCHES_VLLM_VERSION"),
    ],
)
def test_odd_version_values(version: str, expected: str | None) -> None:
    values = {ENV_PATCHES: "fz_b", ENV_VERSION: version}
    if not version.strip():
        installed = _installed_vllm_version()
        if installed.release is None or installed.release < Version("0.1"):
            pytest.skip(f"needs an installed vLLM >= 0.1 (found {installed})")
    outcome = run_register(values)
    judge(values, outcome)
    if expected is None:
        assert outcome.error is None, outcome.error
        assert outcome.applied == ["fz_b"]
    else:
        assert isinstance(outcome.error, PatchVersionError)
        assert expected in str(outcome.error)
        assert outcome.applied == []


def test_a_version_with_a_huge_number_is_a_patch_error() -> None:
    # packaging's int() of a component over 4300 digits raises a plain ValueError.
    values = {ENV_PATCHES: "fz_b", ENV_VERSION: "1" * 5000}
    outcome = run_register(values)
    if outcome.error is not None and not isinstance(outcome.error, PatchError):
        raise outcome.error
    judge(values, outcome)
    assert isinstance(outcome.error, PatchVersionError)
