"""Every rank: patches in tensor-parallel workers, and the settings Ray copies to remote workers.

Tensor parallel 2 runs on the CPU build with ``VLLM_CPU_OMP_THREADS_BIND="0|1"``
(one core per rank); the worker-side patch writes its rank and pid from inside
each worker whenever the model executes, and the kit's per-process evidence
says where each patch is applied.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
from _engine import write_rank_witness

import vllm_custom_patches._env as project_env

pytestmark = pytest.mark.vllm


def _settings() -> set[str]:
    """Every variable this project and its catalogue read: the ENV_* constants of their modules."""
    modules = [project_env] + [
        importlib.import_module(f"vllm_custom_patches_catalogue.{name}")
        for name in ("shortest_prompt_first", "fair_share", "scheduler_trace")
    ]
    names = {
        value
        for module in modules
        for key, value in vars(module).items()
        if key.startswith("ENV_") and isinstance(value, str)
    }
    assert len(names) >= 9, names  # five of the plugin's, four of the catalogue's
    return names


def test_ray_copies_every_setting_of_the_project_and_the_catalogue_to_its_workers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from vllm.ray.ray_env import get_env_vars_to_copy

    settings = _settings()
    for name in settings:
        monkeypatch.setenv(name, "set-on-the-driver")
    monkeypatch.setenv("VCP_NOT_A_VLLM_NAME", "x")  # the control: not copied
    copied = get_env_vars_to_copy(destination="the test")
    assert settings <= copied, sorted(settings - copied)
    assert "VCP_NOT_A_VLLM_NAME" not in copied


@pytest.mark.slow
def test_tensor_parallel_2_applies_a_worker_patch_in_both_ranks_and_the_scheduler_patch_in_the_engine_core(
    vllm_engine, tmp_path: Path  # type: ignore[no-untyped-def]
) -> None:
    patch_dir = write_rank_witness(tmp_path / "patches")
    witness, trace = tmp_path / "ranks.jsonl", tmp_path / "trace.jsonl"
    run = vllm_engine(
        patches=["RankWitness", "scheduler_trace"],
        engine_args={"tensor_parallel_size": 2},
        env={
            "VLLM_CPU_OMP_THREADS_BIND": "0|1",
            "VLLM_CUSTOM_PATCHES_PATH": str(patch_dir),
            "VCP_RANK_WITNESS_FILE": str(witness),
            "VLLM_CUSTOM_PATCHES_TRACE_FILE": str(trace),
        },
    )
    workers = run.role("worker")
    assert len(workers) == 2, run.processes
    for worker in workers:
        assert "RankWitness" in worker.applied, worker
    (core,) = run.role("engine_core")
    assert "scheduler_trace" in core.applied and "RankWitness" not in core.applied
    records = [json.loads(line) for line in witness.read_text().splitlines()]
    by_rank = {r["rank"]: r["pid"] for r in records}
    assert sorted(by_rank) == [0, 1]  # the patched method ran in both ranks
    assert set(by_rank.values()) == {w.pid for w in workers}  # from inside each worker process
    assert {json.loads(line)["pid"] for line in trace.read_text().splitlines()} == {core.pid}
    assert sorted(run.finished) == [0, 1, 2, 3] and all(len(o) == 4 for o in run.outputs)
