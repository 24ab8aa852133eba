"""A corrupt lock file, in any shape, ends ``doctor``/``show``/``lock`` with exit 2 and one line naming the file and the key.

Through the command itself (``_cli.main``, and once the installed console
script), on a small stand-in vLLM read statically: no vLLM is imported.  The
stand-in's version is the one ``VLLM_CUSTOM_PATCHES_VLLM_VERSION`` reports as
installed, so the installed vLLM is never consulted either.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from _vllm_trees import add_framework

from vllm_custom_patches._cli import main as _cli
from vllm_custom_patches._upgrade.fingerprint import (
    LockedMember,
    LockFileError,
    PatchVersion,
    fingerprint,
    lock_entry,
    write_lock,
)

VERSION = "9.9.9"
PATCH = """
from vllm_custom_patches import VLLMPatch


class Probe(VLLMPatch["vllm.sched:Scheduler"]):
    name = "Probe"

    def schedule(self, budget):
        return self._original_schedule(budget)
"""


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """(the stand-in vLLM source, the patch's lock file) with a valid lock written by ``lock``."""
    src = tmp_path / "vllm-src"
    (src / "vllm").mkdir(parents=True)
    (src / "vllm/__init__.py").write_text("")
    (src / "vllm/_version.py").write_text(f"__version__ = version = {VERSION!r}\n")
    (src / "vllm/sched.py").write_text("class Scheduler:\n    def schedule(self, budget):\n        return budget\n")
    add_framework(src)  # a whole vLLM to doctor, so that only the lock can be at fault
    patches = tmp_path / "patches"
    patches.mkdir()
    (patches / "probe.py").write_text(textwrap.dedent(PATCH))
    monkeypatch.setenv("VLLM_CUSTOM_PATCHES_PATH", str(patches))
    monkeypatch.setenv("VLLM_CUSTOM_PATCHES_VLLM_VERSION", VERSION)
    monkeypatch.delenv("VLLM_CUSTOM_PATCHES", raising=False)
    lock = patches / "probe.lock.json"
    assert _main(["lock", "Probe", "--vllm-source", str(src)]) == 0
    assert (
        json.loads(lock.read_text())["patches"]["Probe"]["versions"][VERSION]["members"]["schedule"]["defined_in"]
        == "vllm.sched:Scheduler"
    )
    return src, lock


def _main(args: list[str]) -> int:
    """One command, as a fresh process would run it: the patch file is imported again (each
    command forgets the patch classes it loaded, and the import system would skip the file)."""
    for name in [
        n for n, m in sys.modules.items() if getattr(m, "__file__", None) and Path(m.__file__ or "").name == "probe.py"
    ]:
        del sys.modules[name]
    return _cli.main(args)


def _edit(change: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], str]:
    def apply(data: dict[str, Any]) -> str:
        change(data)
        return json.dumps(data)

    return apply


def _member(data: dict[str, Any]) -> dict[str, Any]:
    member: dict[str, Any] = data["patches"]["Probe"]["versions"][VERSION]["members"]["schedule"]
    return member


def _set(path: str | tuple[str, ...], value: object) -> Callable[[dict[str, Any]], str]:
    """Set ``path``, a key of the member or a tuple of keys from the top, to ``value``."""

    def change(data: dict[str, Any]) -> None:
        *parents, last = path if isinstance(path, tuple) else (path,)
        node = _member(data) if isinstance(path, str) else data
        for part in parents:
            node = node[part]
        node[last] = value

    return _edit(change)


def _rename_version(new: str) -> Callable[[dict[str, Any]], str]:
    def change(data: dict[str, Any]) -> None:
        versions = data["patches"]["Probe"]["versions"]
        versions[new] = versions.pop(VERSION)

    return _edit(change)


def _drop(key: str) -> Callable[[dict[str, Any]], str]:
    return _edit(lambda data: _member(data).pop(key) and None)


_SURFACE_MEMBER = {"defined_in": "vllm.sched:Scheduler", "fingerprint": "sha256:0", "touches": {"waiting": "read"},
                   "called": False, "source": "def add(self:\n"}  # fmt: skip

# (what the corrupt file holds, made from the valid one; what the message must name)
CORRUPT: dict[str, tuple[Callable[[dict[str, Any]], str | bytes], str]] = {
    "a version that is not PEP 440": (
        _rename_version("latest"),
        "patches['Probe'].versions['latest']: 'latest' is not a PEP 440 version",
    ),
    "a source that does not parse": (
        _set("source", "def schedule(self, budget:\n"),
        "versions['9.9.9'].members['schedule'].source: it does not parse",
    ),
    "a source with a null byte": (_set("source", "def f(self):\x00 pass\n"), "['schedule'].source: it does not parse"),
    "not JSON": (lambda data: "{not json", "is corrupt (JSONDecodeError"),
    "not UTF-8": (lambda data: b'{"format": 1, "patches": {"\xff": {}}}', "is corrupt (UnicodeDecodeError"),
    "nested too deep": (lambda data: "[" * 200_000, "is corrupt (RecursionError"),
    "a number too long to read": (lambda data: '{"format": ' + "1" * 5000 + "}", "is corrupt (ValueError"),
    "an array": (lambda data: "[]", "is corrupt: expected a JSON object, found an array"),
    "no format": (
        _edit(lambda data: data.pop("format") and None),
        'is not a lock file of format 1 or 2 ("format": null)',
    ),
    "format true": (_set(("format",), True), 'is not a lock file of format 1 or 2 ("format": true)'),
    "format 1.0": (_set(("format",), 1.0), 'is not a lock file of format 1 or 2 ("format": 1.0)'),
    "format 0": (_set(("format",), 0), 'is not a lock file of format 1 or 2 ("format": 0)'),
    "no patches": (
        _edit(lambda data: data.pop("patches") and None),
        "at patches: expected an object, found nothing (the key is missing)",
    ),
    "patches an array": (_set(("patches",), []), "at patches: expected an object, found an array"),
    "a patch entry a string": (
        _set(("patches", "Probe"), "x"),
        "at patches['Probe']: expected an object, found a string",
    ),
    "no target": (
        _edit(lambda data: data["patches"]["Probe"].pop("target") and None),
        "patches['Probe'].target: expected a string, found nothing",
    ),
    "a target number": (
        _set(("patches", "Probe", "target"), 3),
        "patches['Probe'].target: expected a string, found a number",
    ),
    "no versions": (
        _edit(lambda data: data["patches"]["Probe"].pop("versions") and None),
        "patches['Probe'].versions: expected an object, found nothing",
    ),
    "versions an array": (
        _set(("patches", "Probe", "versions"), []),
        "patches['Probe'].versions: expected an object, found an array",
    ),
    "a version entry null": (
        _set(("patches", "Probe", "versions", VERSION), None),
        "versions['9.9.9']: expected an object, found null",
    ),
    "members null": (
        _set(("patches", "Probe", "versions", VERSION, "members"), None),
        "versions['9.9.9'].members: expected an object, found null",
    ),
    "a version entry without members": (
        _edit(lambda data: data["patches"]["Probe"]["versions"][VERSION].pop("members") and None),
        "versions['9.9.9']: expected the keys members, patch_version, patch_version_from, surface, vllm, found [",
    ),
    "a version entry with an unknown key": (
        _set(("patches", "Probe", "versions", VERSION, "extra"), 1),
        "versions['9.9.9']: expected the keys members, patch_version, patch_version_from, surface, vllm, found [",
    ),
    "the vLLM version a number": (
        _set(("patches", "Probe", "versions", VERSION, "vllm"), 9.9),
        "versions['9.9.9'].vllm: expected a string, found a number",
    ),
    "the vLLM version of another release": (
        _set(("patches", "Probe", "versions", VERSION, "vllm"), "9.9.8"),
        "versions['9.9.9'].vllm: '9.9.8' is not a version of the release 9.9.9",
    ),
    "the vLLM version not PEP 440": (
        _set(("patches", "Probe", "versions", VERSION, "vllm"), "dev"),
        "versions['9.9.9'].vllm: 'dev' is not a version of the release 9.9.9",
    ),
    "the patch version a number": (
        _set(("patches", "Probe", "versions", VERSION, "patch_version"), 1),
        "versions['9.9.9'].patch_version: expected a string, found a number",
    ),
    "where the patch version came from null": (
        _set(("patches", "Probe", "versions", VERSION, "patch_version_from"), None),
        "versions['9.9.9'].patch_version_from: expected a string, found null",
    ),
    "a surface an array": (
        _set(("patches", "Probe", "versions", VERSION, "surface"), []),
        "versions['9.9.9'].surface: expected an object, found an array",
    ),
    "a surface without a part": (
        _edit(lambda data: data["patches"]["Probe"]["versions"][VERSION]["surface"].pop("known") and None),
        "versions['9.9.9'].surface: expected the keys complete, fields, known, members, overridden, siblings, state, "
        "found [",
    ),
    "a surface state without its mode and more": (
        _set(("patches", "Probe", "versions", VERSION, "surface", "state"), {"waiting": {"mode": "sorts"}}),
        "versions['9.9.9'].surface.state['waiting']: expected the keys exists, mode, optional, found ['mode']",
    ),
    "a surface member whose source does not parse": (
        _set(("patches", "Probe", "versions", VERSION, "surface", "members"), {"add": _SURFACE_MEMBER}),
        "versions['9.9.9'].surface.members['add'].source: it does not parse",
    ),
    "a surface fingerprint a number": (
        _set(("patches", "Probe", "versions", VERSION, "surface", "known", "schedule"), 1),
        "versions['9.9.9'].surface.known['schedule']: expected a string, found a number",
    ),
    "a member name that is not one": (
        _edit(lambda data: data["patches"]["Probe"]["versions"][VERSION]["members"].update({"no name": _member(data)})),
        "versions['9.9.9'].members['no name']: 'no name' is not a member name",
    ),
    "a member a string": (
        _set(("patches", "Probe", "versions", VERSION, "members", "schedule"), "x"),
        "['schedule']: expected an object, found a string",
    ),
    "a member without its source": (
        _drop("source"),
        "['schedule']: expected the keys defined_in, fingerprint, source, found ['defined_in', 'fingerprint']",
    ),
    "a member with an unknown key": (
        _set("extra", "x"),
        "['schedule']: expected the keys defined_in, fingerprint, source, found [",
    ),
    "a fingerprint number": (_set("fingerprint", 1), "['schedule'].fingerprint: expected a string, found a number"),
    "a source array": (_set("source", ["def f(): pass"]), "['schedule'].source: expected a string, found an array"),
    "defined_in null": (_set("defined_in", None), "['schedule'].defined_in: expected a string, found null"),
    "defined_in without a class": (
        _set("defined_in", "vllm.sched"),
        "['schedule'].defined_in: 'vllm.sched' is not 'package.module:Qual.Name'",
    ),
}


def _corrupt(lock: Path, shape: str) -> None:
    made = CORRUPT[shape][0](json.loads(lock.read_text()))
    lock.write_bytes(made if isinstance(made, bytes) else made.encode())


def _assert_refused(rc: int, err: str, lock: Path, key: str) -> None:
    assert rc == 2, err
    assert "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith(f"vllm-custom-patches: lock file {lock} "), err
    assert key in err, err
    assert err.rstrip().endswith("delete it and run 'vllm-custom-patches lock' again"), err


@pytest.mark.parametrize("shape", sorted(CORRUPT))
def test_doctor_show_and_lock_refuse_a_corrupt_lock_with_exit_2_naming_the_file_and_the_key(
    setup: tuple[Path, Path], shape: str, capsys: pytest.CaptureFixture[str]
) -> None:
    src, lock = setup
    assert _main(["doctor", "Probe", "--vllm-source", str(src)]) == 0  # the valid lock: nothing wrong
    assert "lock file" not in capsys.readouterr().err
    _corrupt(lock, shape)
    held = lock.read_bytes()
    for command in (["doctor", "Probe"], ["show", "Probe"], ["lock", "Probe"]):
        rc = _main([*command, "--vllm-source", str(src)])
        _assert_refused(rc, capsys.readouterr().err, lock, CORRUPT[shape][1])
    assert lock.read_bytes() == held  # `lock` refused it rather than overwrite what it held


def test_an_unreadable_lock_file_is_refused_with_exit_2(
    setup: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    src, lock = setup
    real = Path.read_bytes

    def read_bytes(self: Path) -> bytes:
        if self == lock:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)  # as root, chmod 000 would not stop the read
    rc = _main(["doctor", "Probe", "--vllm-source", str(src)])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot be read (PermissionError" in err and "fix its permissions" in err, err


def test_lock_refuses_a_version_that_is_not_pep_440_and_writes_nothing(tmp_path: Path) -> None:
    lock = tmp_path / "probe.lock.json"
    member = LockedMember(fingerprint("def f(self): pass"), "vllm.sched:Scheduler", "def f(self): pass")
    entry = lock_entry({"f": member}, vllm="1.0", patch=PatchVersion(None, "unknown"))
    with pytest.raises(LockFileError, match="cannot lock against vLLM 'latest': not a PEP 440 version"):
        write_lock(lock, "Probe", "vllm.sched:Scheduler", "latest", entry)
    assert not lock.exists()
    path = write_lock(lock, "Probe", "vllm.sched:Scheduler", "1.0", entry)
    assert json.loads(path.read_text())["patches"]["Probe"]["versions"]["1.0"]["members"]["f"]["source"] == (
        "def f(self): pass"
    )


def test_a_lock_file_of_a_newer_format_is_refused_saying_to_upgrade(
    setup: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    src, lock = setup
    data = json.loads(lock.read_text())
    data["format"] = 3
    lock.write_text(json.dumps(data))
    for command in (["doctor", "Probe"], ["show", "Probe"], ["lock", "Probe"]):
        assert _main([*command, "--vllm-source", str(src)]) == 2
        err = capsys.readouterr().err
        assert (
            err.count("\n") == 1
            and f"lock file {lock} is in format 3, newer than this vllm-custom-patches reads" in err
        )
        assert "upgrade vllm-custom-patches" in err, err
    assert json.loads(lock.read_text())["format"] == 3  # not overwritten


def test_a_static_vllm_whose_version_is_not_pep_440_is_refused_with_exit_2(
    setup: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    src, _ = setup
    rc = _main(["doctor", "Probe", "--vllm-source", str(src), "--vllm", "1abc"])
    err = capsys.readouterr().err
    assert (
        rc == 2 and "the vLLM version '1abc'" in err and "is not a PEP 440 version" in err and "Traceback" not in err
    ), err


def test_the_console_script_refuses_a_corrupt_lock_with_exit_2(setup: tuple[Path, Path]) -> None:
    src, lock = setup
    _corrupt(lock, "a version that is not PEP 440")
    script = Path(sys.executable).with_name("vllm-custom-patches")
    result = subprocess.run([str(script), "doctor", "Probe", "--vllm-source", str(src)], check=False,
                            capture_output=True, text=True, env=dict(os.environ), timeout=300)  # fmt: skip
    _assert_refused(result.returncode, result.stderr, lock, CORRUPT["a version that is not PEP 440"][1])
    assert result.stdout == ""
