"""The patch author's testing kit.

In-process, for unit tests of a patch against the real target class::

    from vllm_custom_patches.testing import applied, snapshot_namespace

    def test_my_patch_changes_schedule():
        before = snapshot_namespace(Scheduler)
        with applied(MyPatch):
            ...  # exercise the patched Scheduler
        before.assert_unchanged()

On a real vLLM engine, with the patch selected through ``VLLM_CUSTOM_PATCHES``
in fresh processes, on a tiny model written offline (no GPU, no download)::

    from vllm_custom_patches.testing import run_engine, write_tiny_model

    def test_my_patch_runs_in_the_engine_core(tmp_path):
        model = write_tiny_model(tmp_path / "model")
        run = run_engine(model, patches=["my_patch"])
        assert all("my_patch" in p.applied for p in run.role("engine_core"))

With pytest, the plugin this package installs (entry point ``pytest11``)
offers the same as fixtures: ``vllm_patches``, ``tiny_vllm_model`` and
``vllm_engine``; see :mod:`vllm_custom_patches.testing.pytest_plugin`.
Nothing here imports vLLM until an engine is run.
"""

from ._engine import DEFAULT_PROMPTS, EngineRun, EngineRunError, ProcessEvidence, run_engine
from ._model import ENGINE_ENV, ENGINE_KWARGS, VOCAB_SIZE, write_tiny_model
from ._namespace import NamespaceSnapshot, applied, isolated_registry, snapshot_namespace

__all__ = [
    "DEFAULT_PROMPTS",
    "ENGINE_ENV",
    "ENGINE_KWARGS",
    "VOCAB_SIZE",
    "EngineRun",
    "EngineRunError",
    "NamespaceSnapshot",
    "ProcessEvidence",
    "applied",
    "isolated_registry",
    "run_engine",
    "snapshot_namespace",
    "write_tiny_model",
]
