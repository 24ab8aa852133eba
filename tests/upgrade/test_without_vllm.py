"""``doctor``, ``show`` and ``lock`` where vLLM is not installed: the real console script in a real venv.

Where ops teams run them (a laptop, a CI job, an image build stage), vLLM is
often not installed: ``tests/_novllm.py`` makes such an environment once per
session, with this project installed from a wheel, and every test here runs
its ``vllm-custom-patches`` in a subprocess.  The vLLMs checked are small
hand-made source trees (a ``vllm/`` package with a ``Scheduler``); the tests
marked ``vllm`` read the real 0.33.0 and 0.34.0 wheels from the wheel cache
(``make vllm-next``), statically: they need no engine and no vLLM install.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
import time
import zipfile
from pathlib import Path
from typing import Any

import _novllm
import pytest
from _vllm_trees import add_framework

SCHED_V1 = """
class Base:
    def step(self, budget):
        return budget


class Scheduler(Base):
    def __init__(self, config):
        self.waiting = []

    def schedule(self, budget):
        return budget

    def step(self, budget):
        return budget * 2
"""
SCHED_V2 = SCHED_V1.replace("    def schedule(self, budget):\n        return budget\n",
                            "    def schedule(self, budget):\n        return budget + 1\n")  # fmt: skip

WRAP = '''
from vllm_custom_patches import VLLMPatch

__version__ = "3.1"


class Wrap(VLLMPatch["vllm.sched:Scheduler"]):
    """Re-implements schedule(); passes step() through."""

    def schedule(self, budget):
        return Wrap.original("schedule")(self, budget)

    def step(self, budget):
        return Wrap.original("step")(self, budget)
'''
PROBE = '''
from vllm_custom_patches import VLLMPatch, vllm_versions


@vllm_versions("<2")
class Probe(VLLMPatch["vllm.sched:Scheduler"]):
    """Written for vLLM 1; its gate says so."""

    def schedule(self, budget):
        return Probe.original("schedule")(self, budget)
'''
BROKEN = """
from typing_extensions import override
from vllm_custom_patches import VLLMPatch


class Broken(VLLMPatch["vllm.sched:Scheduler"]):
    def schedule(self):
        return []

    @override
    def gone(self):
        pass
"""


def _tree(root: Path, version: str | None, sched: str = SCHED_V1) -> Path:
    """A vLLM with a ``Scheduler`` in ``vllm/sched.py`` (and the framework's integration points)."""
    (root / "vllm").mkdir(parents=True)
    (root / "vllm/__init__.py").write_text("")
    (root / "vllm/sched.py").write_text(sched)
    if version is not None:
        (root / "vllm/_version.py").write_text(f"__version__ = version = {version!r}\n")
    return add_framework(root)


def _patches(root: Path, **files: str) -> Path:
    root.mkdir()
    for name, text in files.items():
        (root / f"{name}.py").write_text(textwrap.dedent(text))
    return root


@pytest.fixture
def v1(tmp_path: Path) -> Path:
    return _tree(tmp_path / "v1", "1.0.0")


@pytest.fixture
def v2(tmp_path: Path) -> Path:
    return _tree(tmp_path / "v2", "2.0.0", SCHED_V2)


def _run(script: Path, *args: str | Path, patches: Path | None = None, env: dict[str, str] | None = None) -> Any:
    environ = _novllm.environ(env)
    if patches is not None:
        environ["VLLM_CUSTOM_PATCHES_PATH"] = str(patches)
    command = [str(script), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=environ, timeout=300, check=False)


def _refused(result: Any) -> str:
    """The one line a refused command prints (exit 2, nothing on stdout, no traceback)."""
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout == "" and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("vllm-custom-patches"), result.stderr
    return str(result.stderr)


def _report(result: Any, code: int) -> dict[str, Any]:
    assert result.returncode == code, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return report


# -- item 1: doctor, show and lock without vLLM -----------------------------------------------


@pytest.mark.parametrize("override", [None, "0.33.0"], ids=["plain", "with VLLM_CUSTOM_PATCHES_VLLM_VERSION"])
def test_without_vllm_a_command_naming_no_vllm_exits_2_saying_how_to_name_one(
    no_vllm: Path, override: str | None
) -> None:
    env = {"VLLM_CUSTOM_PATCHES_VLLM_VERSION": override} if override else {}
    for command in (["doctor"], ["doctor", "fair_share"], ["show", "fair_share"], ["lock", "fair_share"]):
        message = _refused(_run(no_vllm, *command, env=env))
        assert "vLLM is not installed here" in message, message
        assert "--vllm VERSION" in message and "--vllm-source PATH" in message, message


def test_a_static_run_without_vllm_reports_no_installed_version_and_exits_0(no_vllm: Path, v1: Path) -> None:
    patches = _patches(v1.parent / "patches", wrap=WRAP)
    for env in ({}, {"VLLM_CUSTOM_PATCHES_VLLM_VERSION": "0.33.0"}):
        result = _run(no_vllm, "doctor", "--vllm-source", v1, patches=patches, env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "PEP 440" not in result.stdout + result.stderr and "None" not in result.stdout
        assert result.stdout.startswith(f"vLLM 1.0.0 (source {v1})\n"), result.stdout
        assert "Wrap: WARNING" in result.stdout
    report = _report(_run(no_vllm, "doctor", "--vllm-source", v1, "--json", patches=patches), 0)
    assert report["version"] == "1.0.0" and report["ok"] is True
    assert report["patches"]["Wrap"]["verdict"] == "warning"
    assert not [f for f in report["findings"] if f["check"] == "version"]


def test_a_trees_version_comes_from_the_tree_or_is_named_with_vllm(no_vllm: Path, tmp_path: Path, v1: Path) -> None:
    bare = _tree(tmp_path / "checkout", None)  # a git checkout: nothing says its version
    message = _refused(_run(no_vllm, "doctor", "--vllm-source", bare))
    assert f"cannot tell the vLLM version of {bare}" in message and f"--vllm-source {bare} --vllm VERSION" in message
    named = _report(_run(no_vllm, "doctor", "--vllm-source", bare, "--vllm", "2.0.0", "--json"), 0)
    assert named["version"] == "2.0.0" and named["vllm"] == f"vLLM 2.0.0 (source {bare})"
    message = _refused(_run(no_vllm, "doctor", "--vllm-source", v1, "--vllm", "2.0.0"))
    assert f"{v1} is vLLM 1.0.0 (vllm/_version.py), not 2.0.0" in message
    dev = _tree(tmp_path / "dev", "1.5.0.dev12+g0123abc")
    report = _report(_run(no_vllm, "doctor", "--vllm-source", dev, "--json"), 0)
    assert report["version"] == "1.5.0" and "1.5.0 (1.5.0.dev12+g0123abc)" in report["vllm"]
    unpacked = _tree(tmp_path / "unpacked", None)  # an unzipped wheel: its METADATA says
    (unpacked / "vllm-1.7.0.dist-info").mkdir()
    (unpacked / "vllm-1.7.0.dist-info/METADATA").write_text("Metadata-Version: 2.1\nName: vllm\nVersion: 1.7.0\n")
    assert _report(_run(no_vllm, "doctor", "--vllm-source", unpacked, "--json"), 0)["version"] == "1.7.0"


def test_the_version_override_never_makes_vllm_import_vllm(no_vllm: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    tree = _tree(tmp_path / "release", "9.9.9")
    with zipfile.ZipFile(cache / "vllm-9.9.9-py3-none-any.whl", "w") as wheel:  # a cached 'release'
        for file in tree.rglob("*.py"):
            wheel.write(file, file.relative_to(tree).as_posix())
    patches = _patches(tmp_path / "patches", wrap=WRAP)
    env = {"VLLM_CUSTOM_PATCHES_CACHE_DIR": str(cache), "VLLM_CUSTOM_PATCHES_VLLM_VERSION": "9.9.9"}
    report = _report(_run(no_vllm, "doctor", "Wrap", "--vllm", "9.9.9", "--json", patches=patches, env=env), 0)
    assert report["vllm"].startswith("vLLM 9.9.9 (source ") and report["vllm"].endswith(".whl)")
    assert not [f for f in report["findings"] if f["severity"] == "error"], report["findings"]
    # Nor where a vLLM is installed: the override renames that build for the gates, it is not 9.9.9's code.
    installed = _tree(tmp_path / "site", None)
    (installed / "vllm/__init__.py").write_text("__version__ = 'dev'\n")
    env["PYTHONPATH"] = str(installed)
    report = _report(_run(no_vllm, "doctor", "Wrap", "--vllm", "9.9.9", "--json", patches=patches, env=env), 0)
    assert report["vllm"].startswith("vLLM 9.9.9 (source ") and report["vllm"].endswith(".whl)")
    assert _report(_run(no_vllm, "doctor", "Wrap", "--json", patches=patches, env=env), 0)["vllm"] == (
        "vLLM 9.9.9 (installed)"  # without --vllm: the installed build, under the override's name
    )


def test_an_installed_vllm_whose_version_is_not_pep_440_is_a_finding_not_a_traceback(
    no_vllm: Path, tmp_path: Path
) -> None:
    installed = _tree(tmp_path / "site", None)  # importable, no metadata: its __version__ is asked
    (installed / "vllm/__init__.py").write_text("__version__ = 'dev'\n")
    patches = _patches(tmp_path / "patches", probe=PROBE)
    env = {"PYTHONPATH": str(installed)}
    result = _run(no_vllm, "doctor", "Probe", "--json", patches=patches, env=env)
    report = _report(result, 1)
    errors = {(f["patch"], f["check"]): f["message"] for f in report["findings"] if f["severity"] == "error"}
    assert errors.keys() == {("", "version"), ("Probe", "version")}, errors  # the vLLM's, and the gate's
    assert "the installed vLLM's version 'dev' (vllm.__version__) is not a PEP 440 version" in errors[("", "version")]
    assert "VLLM_CUSTOM_PATCHES_VLLM_VERSION" in errors[("", "version")]
    assert "its gate (<2) cannot be checked" in errors[("Probe", "version")]
    env["VLLM_CUSTOM_PATCHES_VLLM_VERSION"] = "1.0.0"  # the advice works
    assert _report(_run(no_vllm, "doctor", "Probe", "--json", patches=patches, env=env), 0)["ok"] is True


def test_the_matrix_takes_versions_and_paths_and_shows_gate_exclusions(no_vllm: Path, v1: Path, v2: Path) -> None:
    patches = _patches(v1.parent / "patches", wrap=WRAP, probe=PROBE)
    result = _run(no_vllm, "doctor", "--matrix", f"{v1},{v2}", "--baseline", v1, patches=patches)
    assert result.returncode == 0, result.stdout + result.stderr  # taken in by default: a skipped patch is no error
    rows = {line.split(" | ")[0]: line for line in result.stdout.splitlines()}
    assert result.stdout.startswith(f"| patch | vLLM 1.0.0 ({v1}) | vLLM 2.0.0 ({v2}) |\n")
    assert rows["| `Probe`"] == "| `Probe` | ok | excluded by gate <2 |", result.stdout
    assert rows["| `Wrap`"].startswith("| `Wrap` | ok | warning: the original Scheduler.schedule changed since "
                                       "vLLM 1.0.0"), result.stdout  # fmt: skip
    named = _run(no_vllm, "doctor", "Probe", "--matrix", f"{v1},{v2}", "--baseline", v1, patches=patches)
    assert named.returncode == 1  # selected by name: start-up would fail on 2.0.0
    assert "| `Probe` | ok | error: excluded by gate <2 |" in named.stdout, named.stdout
    for extra in (["--vllm-source", str(v2)], ["--vllm", "2.0.0"]):
        message = _refused(_run(no_vllm, "doctor", "--matrix", str(v1), *extra, patches=patches))
        assert "--matrix names every vLLM it checks" in message
    bare = _tree(v1.parent / "checkout", None, SCHED_V2)
    report = _report(_run(no_vllm, "doctor", "Wrap", "--matrix", f"{v1},3.0.0={bare}", "--json", patches=patches), 0)
    assert [r["version"] for r in report] == ["1.0.0", "3.0.0"]
    assert _refused(_run(no_vllm, "doctor", "--matrix", ",", patches=patches)).count("names no vLLM") == 1


def test_json_keeps_every_error_of_a_patch(no_vllm: Path, v1: Path) -> None:
    patches = _patches(v1.parent / "patches", broken=BROKEN)
    result = _run(no_vllm, "doctor", "Broken", "--vllm-source", v1, "--json", patches=patches)
    summary = _report(result, 1)["patches"]["Broken"]
    assert summary["verdict"] == "error" and len(summary["errors"]) == 2, summary
    assert any("has no member 'gone'" in e for e in summary["errors"]), summary
    assert any("cannot take every call the original" in e for e in summary["errors"]), summary
    table = _run(no_vllm, "doctor", "Broken", "--matrix", str(v1), patches=patches)
    (row,) = [line for line in table.stdout.splitlines() if line.startswith("| `Broken`")]
    assert row.count("error: ") == 2, row


def test_a_refused_patch_path_is_an_error_not_ignored(no_vllm: Path, v1: Path, tmp_path: Path) -> None:
    result = _run(no_vllm, "doctor", "--vllm-source", v1, patches=tmp_path / "no-such-dir")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "VLLM_CUSTOM_PATCHES_PATH" in result.stdout and "no-such-dir" in result.stdout


def test_bad_arguments_are_one_line_naming_the_fix(no_vllm: Path, v1: Path) -> None:
    assert "unrecognized arguments: --bogus" in _refused(_run(no_vllm, "doctor", "--bogus"))
    assert "see 'vllm-custom-patches show --help'" in _refused(_run(no_vllm, "show"))
    message = _refused(_run(no_vllm, "doctor", "--vllm", "1abc"))
    assert "the vLLM version '1abc' is not a PEP 440 version" in message
    assert "does not exist" in _refused(_run(no_vllm, "doctor", "--vllm-source", "/no/such/dir"))
    message = _refused(_run(no_vllm, "doctor", "--vllm-source", v1, env={"VLLM_CUSTOM_PATCHES_LOCK_DIR": "/no/such"}))
    assert "VLLM_CUSTOM_PATCHES_LOCK_DIR /no/such is not a directory" in message


# -- item 2: every drift check has a named baseline -------------------------------------------


def test_every_drift_check_names_its_baseline_or_warns_that_there_is_none(
    no_vllm: Path, v1: Path, v2: Path, tmp_path: Path
) -> None:
    patches = _patches(tmp_path / "patches", wrap=WRAP)
    result = _run(no_vllm, "doctor", "Wrap", "--vllm-source", v2, patches=patches)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARNING [baseline] no baseline: drift not checked for schedule, step" in result.stdout, result.stdout
    summary = _report(_run(no_vllm, "doctor", "Wrap", "--vllm-source", v2, "--json", patches=patches), 0)
    assert summary["patches"]["Wrap"]["baseline"] == {"schedule": None, "step": None}

    result = _run(no_vllm, "doctor", "Wrap", "--vllm-source", v2, "--baseline", v1, patches=patches)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"  baseline drift of schedule, step measured against vLLM 1.0.0 (source {v1})\n" in result.stdout
    assert "WARNING [drift] the original Scheduler.schedule changed since vLLM 1.0.0" in result.stdout
    assert "no baseline" not in result.stdout

    locks = tmp_path / "locks"
    assert _run(no_vllm, "lock", "Wrap", "--member", "schedule", "--vllm-source", v1, "--lock-dir", locks,
                patches=patches).returncode == 0  # fmt: skip
    env = {"VLLM_CUSTOM_PATCHES_LOCK_DIR": str(locks)}
    report = _report(_run(no_vllm, "doctor", "Wrap", "--vllm-source", v2, "--baseline", v1, "--json",
                          patches=patches, env=env), 1)  # fmt: skip
    assert report["patches"]["Wrap"]["baseline"] == {
        "schedule": f"vLLM 1.0.0 as locked in {locks / 'Wrap.lock.json'}",
        "step": f"vLLM 1.0.0 (source {v1})",
    }
    (drift,) = [f for f in report["findings"] if f["check"] == "drift"]
    assert drift["severity"] == "error" and drift["member"] == "schedule"


# -- item 4: locks ops teams own -------------------------------------------------------------


def test_a_lock_dir_is_read_with_the_shipped_lock_and_wins(no_vllm: Path, v1: Path, tmp_path: Path) -> None:
    patches = _patches(tmp_path / "patches", wrap=WRAP)
    # The lock shipped with the patch: at 1.0.0, but recording 2.0's schedule (taken from a tree named 1.0.0).
    bare_v2 = _tree(tmp_path / "bare-v2", None, SCHED_V2)
    shipped = _run(no_vllm, "lock", "Wrap", "--member", "schedule", "--vllm-source", bare_v2, "--vllm", "1.0.0",
                   patches=patches)  # fmt: skip
    assert shipped.returncode == 0 and (patches / "wrap.lock.json").is_file(), shipped.stderr
    v2 = _tree(tmp_path / "v2", "2.0.0", SCHED_V2)
    assert _run(no_vllm, "doctor", "Wrap", "--vllm-source", v2, patches=patches).returncode == 0  # matches it

    locks = tmp_path / "ops-locks"  # created by lock
    mine = _run(no_vllm, "lock", "Wrap", "--member", "schedule", "--vllm-source", v1, "--lock-dir", locks,
                patches=patches)  # fmt: skip
    assert mine.returncode == 0, mine.stderr
    assert mine.stdout.startswith(f"locked Wrap 3.1 against vLLM 1.0.0 (source {v1}): schedule"), mine.stdout
    assert mine.stdout.endswith(f" -> {locks / 'Wrap.lock.json'}\n"), mine.stdout
    data = json.loads((locks / "Wrap.lock.json").read_text())
    entry = data["patches"]["Wrap"]["versions"]["1.0.0"]
    assert data["format"] == 2 and data["patches"]["Wrap"]["target"] == "vllm.sched:Scheduler"
    assert (entry["vllm"], entry["patch_version"], entry["patch_version_from"]) == (
        "1.0.0", "3.1", "vllm_custom_patches_path.wrap.__version__"
    )  # fmt: skip
    assert set(entry["members"]) == {"schedule"}

    for how in (["--lock-dir", str(locks)], []):
        env = {} if how else {"VLLM_CUSTOM_PATCHES_LOCK_DIR": str(locks)}
        result = _run(no_vllm, "doctor", "Wrap", "--vllm-source", v2, *how, patches=patches, env=env)
        assert result.returncode == 1, result.stdout + result.stderr  # the user's lock (1.0's code) won
        assert f"baseline drift of schedule measured against vLLM 1.0.0 as locked in {locks / 'Wrap.lock.json'}" in (
            result.stdout
        )
        assert "ERROR   [drift] the original Scheduler.schedule changed since vLLM 1.0.0 (locked)" in result.stdout
    shown = _run(no_vllm, "show", "Wrap", "--vllm-source", v2, "--lock-dir", locks, patches=patches)
    assert shown.returncode == 0, shown.stderr
    assert f"lock: vLLM 1.0.0 in {locks / 'Wrap.lock.json'} (patch version 3.1," in shown.stdout
    assert "schedule (override, CHANGED since locked at vLLM 1.0.0)" in shown.stdout


def test_lock_refuses_a_version_the_gate_excludes_unless_forced_and_writes_nothing(
    no_vllm: Path, v2: Path, tmp_path: Path
) -> None:
    patches = _patches(tmp_path / "patches", wrap=WRAP, probe=PROBE)
    locks = tmp_path / "locks"
    message = _refused(_run(no_vllm, "lock", "Wrap", "Probe", "--vllm-source", v2, "--lock-dir", locks,
                            patches=patches))  # fmt: skip
    assert "patch 'Probe' is gated to vLLM <2, which excludes 2.0.0" in message and "--force" in message
    assert not list(locks.glob("*.json"))  # not even Wrap's, which was fine
    forced = _run(no_vllm, "lock", "Probe", "--vllm-source", v2, "--lock-dir", locks, "--force", patches=patches)
    assert forced.returncode == 0, forced.stderr
    versions = json.loads((locks / "Probe.lock.json").read_text())["patches"]["Probe"]["versions"]
    assert list(versions) == ["2.0.0"]
    assert versions["2.0.0"]["patch_version"] is None and versions["2.0.0"]["patch_version_from"].startswith("unknown")


def test_a_format_1_lock_is_read_and_rewritten_as_format_2(no_vllm: Path, v1: Path, v2: Path, tmp_path: Path) -> None:
    patches = _patches(tmp_path / "patches", wrap=WRAP)
    source = "def schedule(self, budget):\n    return budget\n"
    from vllm_custom_patches._upgrade.fingerprint import fingerprint

    member = {"fingerprint": fingerprint(source), "defined_in": "vllm.sched:Scheduler", "source": source}
    old = {
        "format": 1,
        "patches": {"Wrap": {"target": "vllm.sched:Scheduler", "versions": {"1.0.0": {"schedule": member}}}},
    }
    (patches / "wrap.lock.json").write_text(json.dumps(old))
    result = _run(no_vllm, "doctor", "Wrap", "--vllm-source", v2, patches=patches)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "measured against vLLM 1.0.0 as locked in wrap.lock.json, shipped with the patch" in result.stdout
    assert _run(no_vllm, "lock", "Wrap", "--vllm-source", v2, patches=patches).returncode == 0
    data = json.loads((patches / "wrap.lock.json").read_text())
    versions = data["patches"]["Wrap"]["versions"]
    assert data["format"] == 2 and sorted(versions) == ["1.0.0", "2.0.0"]
    assert versions["1.0.0"]["members"] == {"schedule": member} and versions["1.0.0"]["patch_version"] is None
    assert versions["1.0.0"]["patch_version_from"] == "not recorded (lock file format 1)"
    assert _run(no_vllm, "doctor", "Wrap", "--vllm-source", v2, patches=patches).returncode == 0


# -- the real 0.33.0 and 0.34.0 wheels, read statically ----------------------------------------


INIT_WRAPPER = """
from vllm_custom_patches import VLLMPatch


class InitWrapper(VLLMPatch["vllm.v1.core.sched.scheduler:Scheduler"]):
    def __init__(self, *args, **kwargs):
        InitWrapper.original("__init__")(self, *args, **kwargs)
        self.init_wrapped = True
"""
OLD_POLICY = """
from vllm_custom_patches import VLLMPatch, vllm_versions


@vllm_versions(">=0.32,<0.34")
class OldPolicy(VLLMPatch["vllm.v1.core.sched.scheduler:Scheduler"]):
    def schedule(self, *args, **kwargs):
        return OldPolicy.original("schedule")(self, *args, **kwargs)
"""


@pytest.mark.vllm
def test_doctor_on_the_real_0_34_wheel_without_vllm(no_vllm: Path) -> None:
    _novllm.need_wheels("0.34.0")
    _run(no_vllm, "doctor", "--vllm", "0.34.0")  # warm: the wheel unpacked once
    started = time.monotonic()
    result = _run(no_vllm, "doctor", "--vllm", "0.34.0", "--json")
    elapsed = time.monotonic() - started
    report = json.loads(result.stdout)
    print(f"doctor --vllm 0.34.0 without vLLM, warm: {elapsed:.2f} s, exit {result.returncode}")
    assert result.returncode == (0 if report["ok"] else 1) and result.stderr == "", result.stderr
    assert report["version"] == "0.34.0" and "PEP 440" not in result.stdout
    assert set(report["patches"]) >= {"fair_share", "scheduler_trace", "shortest_prompt_first"}
    for name, summary in report["patches"].items():  # every member's drift is measured, or said not to be
        assert summary["baseline"], (name, summary)


@pytest.mark.vllm
def test_a_baseline_of_0_33_finds_0_34s_changes_to_members_nobody_locked(no_vllm: Path, tmp_path: Path) -> None:
    _novllm.need_wheels("0.33.0", "0.34.0")
    patches = _patches(tmp_path / "patches", init_wrapper=INIT_WRAPPER)
    plain = _report(_run(no_vllm, "doctor", "InitWrapper", "--vllm", "0.34.0", "--json", patches=patches), 0)
    assert plain["patches"]["InitWrapper"]["baseline"] == {"__init__": None}
    assert plain["patches"]["InitWrapper"]["warnings"][0].startswith("no baseline: drift not checked for __init__")
    report = _report(_run(no_vllm, "doctor", "InitWrapper", "--vllm", "0.34.0", "--baseline", "0.33.0", "--json",
                          patches=patches), 0)  # fmt: skip
    (baseline,) = report["patches"]["InitWrapper"]["baseline"].values()
    assert baseline.startswith("vLLM 0.33.0 (source ")
    (drift,) = [f for f in report["findings"] if f["check"] == "drift"]
    assert drift["severity"] == "warning" and "Scheduler.__init__ changed since vLLM 0.33.0" in drift["message"]
    assert "+    self.async_kv_waiting = create_request_queue(self.policy)" in drift["detail"]

    locks = tmp_path / "locks"
    locked = _run(no_vllm, "lock", "InitWrapper", "--vllm", "0.33.0", "--lock-dir", locks, patches=patches)
    assert locked.returncode == 0, locked.stderr
    entry = json.loads((locks / "InitWrapper.lock.json").read_text())["patches"]["InitWrapper"]["versions"]["0.33.0"]
    assert entry["vllm"] == "0.33.0" and set(entry["members"]) == {"__init__"}
    env = {"VLLM_CUSTOM_PATCHES_LOCK_DIR": str(locks)}
    report = _report(_run(no_vllm, "doctor", "InitWrapper", "--vllm", "0.34.0", "--json", patches=patches, env=env), 1)
    (drift,) = [f for f in report["findings"] if f["check"] == "drift"]
    assert drift["severity"] == "error" and "since vLLM 0.33.0 (locked)" in drift["message"]
    assert report["patches"]["InitWrapper"]["baseline"] == {
        "__init__": f"vLLM 0.33.0 as locked in {locks / 'InitWrapper.lock.json'}"
    }


@pytest.mark.vllm
def test_a_gate_that_stops_before_0_34_is_shown_and_refused_for_locking(no_vllm: Path, tmp_path: Path) -> None:
    _novllm.need_wheels("0.33.0", "0.34.0")
    patches = _patches(tmp_path / "patches", old_policy=OLD_POLICY)
    result = _run(no_vllm, "doctor", "--matrix", "0.33.0,0.34.0", patches=patches)
    assert "Traceback" not in result.stderr and result.returncode in (0, 1), result.stderr
    (row,) = [line for line in result.stdout.splitlines() if line.startswith("| `OldPolicy`")]
    assert row.endswith(" | excluded by gate <0.34,>=0.32 |"), row
    named = _run(no_vllm, "doctor", "OldPolicy", "--matrix", "0.33.0,0.34.0", patches=patches)
    assert named.returncode == 1 and "| error: excluded by gate <0.34,>=0.32 |" in named.stdout, named.stdout
    locks = tmp_path / "locks"
    message = _refused(_run(no_vllm, "lock", "OldPolicy", "--vllm", "0.34.0", "--lock-dir", locks, patches=patches))
    assert "gated to vLLM <0.34,>=0.32, which excludes 0.34.0" in message and "--force" in message
    forced = _run(no_vllm, "lock", "OldPolicy", "--vllm", "0.34.0", "--lock-dir", locks, "--force", patches=patches)
    assert forced.returncode == 0, forced.stderr


def test_without_pip_a_missing_wheel_is_one_line_saying_how_to_get_it(no_vllm: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    env = {"VLLM_CUSTOM_PATCHES_CACHE_DIR": str(cache), "PATH": str(tmp_path)}  # no pip in the venv, none on PATH
    message = _refused(_run(no_vllm, "doctor", "--vllm", "9.9.9", env=env))
    assert "no pip here to download the vllm 9.9.9 wheel with" in message, message
    assert f"-d {cache} vllm==9.9.9' once, or pass --vllm-source WHEEL" in message, message
