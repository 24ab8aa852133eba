"""The compile-cache key the plugin gives vLLM: it follows each selected patch's code, not its settings.

Each key is computed in a fresh process, as a vLLM process would: a patch
package on the path, the plugin's ``register()`` with ``VLLM_CUSTOM_PATCHES``
set, and a stand-in ``vllm.envs`` whose table the plugin fills; the values of
that table's getters are what vLLM's ``envs.compile_factors()`` hashes into its
torch.compile cache key.  A new version of the package is a new directory, as
a reinstall would leave it.  (tests/real_vllm/test_vllm_compile_key.py does the
same with vLLM's own ``compile_factors``.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vllm_custom_patches._runtime.compile_key import code_fingerprint, selection_key

_FACTORS = """
import json, os, sys, types
envs = types.ModuleType("vllm.envs")  # what the plugin declares to; vLLM itself is not imported
envs.environment_variables = {"VLLM_HOST_IP": lambda: os.environ.get("VLLM_HOST_IP", "")}
sys.modules["vllm.envs"] = envs
import ckpkg.model_patch  # as vLLM's plugin loader imports a selected entry point
from vllm_custom_patches.plugin import register
register()
print(json.dumps({name: getter() for name, getter in envs.environment_variables.items()}))
"""

PACKAGE = {
    "__init__.py": "",
    "_helpers.py": """
        def scale(x):
            return x * 2
    """,
    "_unused.py": """
        NOTHING_THE_PATCH_USES = 1
    """,
    "model_patch.py": """
        from vllm_custom_patches import VLLMPatch

        from ._helpers import scale

        class DoubleForward(VLLMPatch["ckpkg_target:Model"]):
            name = "double_forward"

            def forward(self, x):
                return scale(DoubleForward.original("forward")(self, x))
    """,
}


def _package(root: Path, **changes: str) -> Path:
    files = {**PACKAGE, **changes}
    (root / "ckpkg").mkdir(parents=True)
    # The patch's target (a model the patch wraps); not imported, so the patch waits for it.
    (root / "ckpkg_target.py").write_text("class Model:\n    def forward(self, x):\n        return x\n")
    for name, text in files.items():
        (root / "ckpkg" / name).write_text(textwrap.dedent(text))
    return root


def _factors(root: Path, *, seed: str = "0", **env: str) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")}
    environ.update(
        PYTHONPATH=os.pathsep.join([str(root), *sys.path]),
        PYTHONHASHSEED=seed,
        VLLM_CUSTOM_PATCHES="double_forward",
        VLLM_CUSTOM_PATCHES_STRICT="1",
        **env,
    )
    done = subprocess.run(
        [sys.executable, "-c", _FACTORS], env=environ, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    factors: dict[str, str] = json.loads(done.stdout.strip().splitlines()[-1])
    return factors


def test_the_key_names_the_selection_and_each_selected_patchs_code(tmp_path: Path) -> None:
    key = _factors(_package(tmp_path))["VLLM_CUSTOM_PATCHES"]
    selection, patch = key.split(";")
    assert selection == "double_forward"
    assert patch.startswith("double_forward=sha256:")


def test_the_same_code_gives_the_same_key_in_every_process(tmp_path: Path) -> None:
    # Every worker and node computes its key on its own: string hashing differs between them.
    root = _package(tmp_path)
    assert _factors(root, seed="1") == _factors(root, seed="2")


@pytest.mark.parametrize(
    ("module", "text"),
    [
        ("model_patch.py", PACKAGE["model_patch.py"].replace("scale(", "scale(1 + ")),  # the patch itself
        ("_helpers.py", PACKAGE["_helpers.py"].replace("x * 2", "x * 3")),  # a helper the patch calls
    ],
    ids=["patch-module", "helper-module"],
)
def test_a_new_version_of_the_patch_code_changes_the_key(tmp_path: Path, module: str, text: str) -> None:
    old = _factors(_package(tmp_path / "old"))
    new = _factors(_package(tmp_path / "new", **{module: text}))
    assert old["VLLM_CUSTOM_PATCHES"] != new["VLLM_CUSTOM_PATCHES"]
    assert {k: v for k, v in old.items() if k != "VLLM_CUSTOM_PATCHES"} == {
        k: v for k, v in new.items() if k != "VLLM_CUSTOM_PATCHES"
    }


def test_code_the_patch_does_not_use_leaves_the_key(tmp_path: Path) -> None:
    old = _factors(_package(tmp_path / "old"))
    new = _factors(_package(tmp_path / "new", **{"_unused.py": "NOTHING_THE_PATCH_USES = 2\n"}))
    assert old == new


def test_settings_and_unrelated_variables_leave_the_key(tmp_path: Path) -> None:
    root = _package(tmp_path)
    plain = _factors(root, VLLM_CUSTOM_PATCHES_TRACE_FILE=str(tmp_path / "a.jsonl"))
    other = _factors(
        root,
        VLLM_CUSTOM_PATCHES_TRACE_FILE=str(tmp_path / "b.jsonl"),  # a per-run setting
        SOMETHING_UNRELATED="1",
    )
    assert plain == other
    assert plain["VLLM_CUSTOM_PATCHES_TRACE_FILE"] == "set"  # declared (so vLLM accepts it), its value kept out


def test_without_a_selection_the_key_is_vllms_own() -> None:
    assert selection_key({}) is None


def test_a_selection_the_plugin_refuses_adds_only_its_text() -> None:
    assert selection_key({"VLLM_CUSTOM_PATCHES": "-x"}) == "-x"  # '-x' without '*' cannot start an engine
    assert selection_key({"VLLM_CUSTOM_PATCHES": "no_such_patch"}) == "no_such_patch;no_such_patch=unknown"


def test_a_patch_class_without_a_module_is_keyed_by_its_own_code() -> None:
    def make(factor: int) -> type:
        namespace: dict[str, object] = {}
        exec(f"class P:\n    def forward(self, x):\n        return x * {factor}\n", namespace)
        cls = namespace["P"]
        assert isinstance(cls, type)
        cls.__module__ = "a_module_that_does_not_exist"
        return cls

    assert code_fingerprint(make(2)) == code_fingerprint(make(2)) != code_fingerprint(make(3))


def test_a_loader_that_fails_never_stops_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    # vLLM reads every variable's getter at start-up without a guard: the key must come, whatever a loader does.
    import types

    class Broken:
        def get_source(self, name: str) -> str:
            raise RuntimeError("disk gone")

        def get_code(self, name: str) -> object:
            raise UnicodeDecodeError("utf-8", b"", 0, 1, "bad")

    module = types.ModuleType("vcp_broken_loader_module")
    module.__loader__ = Broken()
    monkeypatch.setitem(sys.modules, module.__name__, module)
    cls = type("P", (), {"__module__": module.__name__})
    assert code_fingerprint(cls).startswith("sha256:")
