"""vLLM's own compile-cache key (``envs.compile_factors()``) follows the selected patch's code, not its settings.

Each key is computed by a fresh process that imports the real ``vllm.envs``,
runs vLLM's ``load_general_plugins()`` (which runs this project's plugin) with
a patch package on the path and ``VLLM_CUSTOM_PATCHES`` naming its patch, and
hashes ``envs.compile_factors()`` with vLLM's ``hash_factors``, the env part
of the key vLLM 0.32 files torch.compile artifacts under (``compilation/
backends.py``, ``compilation/caching.py``).  No engine is started.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from _early import SESSION_ENV, JobContext, early_fixture

pytestmark = pytest.mark.vllm

_KEY = """
import json
import vllm.envs as envs
from vllm.config.utils import hash_factors
from vllm.plugins import load_general_plugins
load_general_plugins()
factors = envs.compile_factors()
print(json.dumps({"patches": factors.get("VLLM_CUSTOM_PATCHES"), "hash": hash_factors(factors)}))
"""

_PATCH = """
from vllm_custom_patches import VLLMPatch

class CkLayerPatch(VLLMPatch["vllm.model_executor.layers.layernorm:LayerNorm"]):
    name = "ck_layer_patch"

    def forward_native(self, x):
        return LayerNorm_original(self, x) * FACTOR

def LayerNorm_original(layer, x):
    return CkLayerPatch.original("forward_native")(layer, x)
"""


def _package(root: Path, factor: str) -> Path:
    (root / "ckrealpkg").mkdir(parents=True)
    (root / "ckrealpkg" / "__init__.py").write_text("")
    (root / "ckrealpkg" / "layer_patch.py").write_text(textwrap.dedent(_PATCH).replace("FACTOR", factor))
    # Installed as a patch package is: an entry point in the group the plugin reads.
    dist = root / "ckrealpkg-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ckrealpkg\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[vllm_custom_patches]\nck_layer_patch = ckrealpkg.layer_patch:CkLayerPatch\n"
    )
    return root


def _keys(job: JobContext, runs: list[tuple[Path, dict[str, str]]]) -> list[dict[str, str]]:
    procs = []
    for root, extra in runs:
        env = {k: v for k, v in SESSION_ENV.items() if not k.startswith("VLLM_")}
        env.update(
            PYTHONPATH=os.pathsep.join([str(root), *sys.path]),
            VLLM_CUSTOM_PATCHES="ck_layer_patch",
            VLLM_NO_USAGE_STATS="1",
            **extra,
        )
        procs.append(
            job.track(
                subprocess.Popen(
                    [sys.executable, "-c", _KEY], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                    start_new_session=True,
                )
            )
        )  # fmt: skip
    keys = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        keys.append(json.loads(out.strip().splitlines()[-1]))
    return keys


@early_fixture
def compile_keys(job: JobContext) -> list[dict[str, str]]:
    """The keys of three fresh processes, side by side: an early job (it runs while the unit tests do)."""
    root = job.workspace.dir("compile-key")
    v1, v2 = _package(root / "v1", "1"), _package(root / "v2", "2")
    return _keys(
        job,
        [
            (v1, {"VLLM_CUSTOM_PATCHES_TRACE_FILE": str(root / "a.jsonl")}),
            (v1, {"VLLM_CUSTOM_PATCHES_TRACE_FILE": str(root / "b.jsonl")}),  # another run's setting
            (v2, {"VLLM_CUSTOM_PATCHES_TRACE_FILE": str(root / "a.jsonl")}),  # the patch's next version
        ],
    )


def test_vllms_compile_key_changes_with_the_patch_code_and_not_with_its_settings(
    compile_keys: list[dict[str, str]],
) -> None:
    first, again, new_code = compile_keys
    assert first["patches"].startswith("ck_layer_patch;ck_layer_patch=sha256:")
    assert first == again
    assert new_code["hash"] != first["hash"] and new_code["patches"] != first["patches"]
