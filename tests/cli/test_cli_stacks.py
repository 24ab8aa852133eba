"""Stacks in the command (issue 19): ``list`` and ``check`` (table and --json) and ``show`` name each
patch's composition and the chain of every stack it is a layer of."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

LAYERS = '''
from vllm_custom_patches import VLLMPatch
from stack_target_mod import Engine  # imported: list can tell which members are overrides


class Outer(VLLMPatch[Engine], stackable=True, order=10):
    """Logs each step."""

    def step(self):
        return "outer>" + Outer.original("step")(self)


class Inner(VLLMPatch[Engine], stackable=True, exclusive={"queue-sort"}):
    def step(self):
        return "inner>" + Inner.original("step")(self)

    def helper(self):
        return 1
'''
CHAIN = "Engine.step: Outer (order 10) \u2192 Inner \u2192 original"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "stack_target_mod.py").write_text("class Engine:\n    def step(self):\n        return 'T'\n")
    patches = tmp_path / "patches"
    patches.mkdir(mode=0o755)
    (patches / "layers.py").write_text(textwrap.dedent(LAYERS))
    (patches / "layers.py").chmod(0o644)
    return tmp_path


def _run(args: list[str], root: Path) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_CUSTOM_PATCHES")}
    environ.update(
        PYTHONPATH=str(root), VLLM_CUSTOM_PATCHES_PATH=str(root / "patches"), VLLM_CUSTOM_PATCHES_VLLM_VERSION="0.32.0"
    )
    # Only this module's layers: the catalogue's patches would make check import vLLM (~10 s) for nothing here.
    environ["VLLM_CUSTOM_PATCHES"] = "Outer,Inner" if args[0] in ("list", "check") else "AdmissionLog,ShortestFirst"
    return subprocess.run(
        [sys.executable, "-m", "vllm_custom_patches", *args], capture_output=True, text=True, env=environ, timeout=120
    )


@pytest.mark.parametrize("command", ["list", "check"])
def test_list_and_check_json_carry_composition_and_chains(root: Path, command: str) -> None:
    result = _run([command, "--json"], root)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)["patches"]}
    assert (rows["Outer"]["stackable"], rows["Outer"]["order"], rows["Outer"]["exclusive"]) == (True, 10, [])
    assert (rows["Inner"]["stackable"], rows["Inner"]["order"], rows["Inner"]["exclusive"]) == (True, 0, ["queue-sort"])
    assert rows["Outer"]["stacks"] == rows["Inner"]["stacks"] == [CHAIN]  # helper is an addition: no stack


def test_check_table_shows_the_chain_under_each_layer(root: Path) -> None:
    result = _run(["check"], root)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "stackable (order 10)" in result.stdout and "exclusive queue-sort" in result.stdout
    assert result.stdout.count(f"stack {CHAIN}") == 2


SCHEDULER = "class Scheduler:\n    def schedule(self, budget):\n        return budget\n"
STATIC_LAYERS = """
from vllm_custom_patches import VLLMPatch


class AdmissionLog(VLLMPatch["vllm.sched:Scheduler"], stackable=True, order=10):
    def schedule(self, budget):
        return AdmissionLog.original("schedule")(self, budget)


class ShortestFirst(VLLMPatch["vllm.sched:Scheduler"], stackable=True, exclusive={"queue-sort"}):
    def schedule(self, budget):
        return ShortestFirst.original("schedule")(self, budget)
"""


def test_show_names_the_stack_a_patch_would_form_on_a_statically_read_vllm(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "vllm").mkdir(parents=True)
    (tree / "vllm/__init__.py").write_text("")
    (tree / "vllm/sched.py").write_text(SCHEDULER)
    (tree / "vllm/_version.py").write_text("__version__ = version = '1.0.0'\n")
    patches = tmp_path / "patches"
    patches.mkdir(mode=0o755)
    (patches / "layers.py").write_text(textwrap.dedent(STATIC_LAYERS))
    (patches / "layers.py").chmod(0o644)
    result = _run(["show", "ShortestFirst", "--vllm-source", str(tree), "--json"], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    info = json.loads(result.stdout)
    chain = "Scheduler.schedule: AdmissionLog (order 10) \u2192 ShortestFirst \u2192 vLLM"
    assert (info["stackable"], info["order"], info["exclusive"], info["stacks"]) == (True, 0, ["queue-sort"], [chain])
    text = _run(["show", "AdmissionLog", "--vllm-source", str(tree)], tmp_path)
    assert text.returncode == 0, text.stdout + text.stderr
    assert "  stackable (order 10)\n" in text.stdout and f"  stack {chain}\n" in text.stdout
