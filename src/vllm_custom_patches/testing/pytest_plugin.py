"""pytest fixtures for patch authors; installed with vllm-custom-patches (entry point ``pytest11``).

* ``vllm_patches``: apply patches for one test.  Afterwards each is rolled
  back, and the test fails if a patch it applied is still applied, or if the
  namespace of a target (or of a subclass) differs from before the apply.
* ``tiny_vllm_model``: the tiny offline Llama with its tokenizer, written once
  per session (see :func:`vllm_custom_patches.testing.write_tiny_model`).
* ``vllm_engine``: :func:`vllm_custom_patches.testing.run_engine` bound to
  the tiny model: a real engine in fresh processes with patches selected
  through ``VLLM_CUSTOM_PATCHES``, returning outputs and per-process evidence.

Loading this plugin never imports vLLM; only running an engine does, in a child process.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from .._core.manager import PatchRef
    from . import EngineRun
    from ._namespace import NamespaceSnapshot

__all__ = ["PatchSession", "tiny_vllm_model", "vllm_engine", "vllm_patches"]

_LINGER_WAIT_S = 5.0
"""How long teardown waits for calls still inside a rolled-back patch to return."""


class PatchSession:
    """The ``vllm_patches`` fixture: apply patches now, prove an exact rollback at teardown."""

    def __init__(self) -> None:
        self._applied: list[str] = []
        self._snapshots: dict[type, NamespaceSnapshot] = {}

    def apply(self, *patches: PatchRef) -> None:
        """Apply each patch (a name or a class) for the rest of the test.

        The target and its subclasses are snapshotted first; a patch that was
        already applied before is left alone (and is not rolled back).
        """
        from .._core.graft import descendants
        from .._core.manager import PatchManager
        from .._core.targets import resolve_target
        from ._namespace import snapshot_namespace

        for patch in patches:
            patch_cls = PatchManager.get(patch) if isinstance(patch, str) else patch
            spec = patch_cls._vcp_spec
            target = resolve_target(spec.target, spec.name)
            assert target is not None
            for cls in descendants(target):
                self._snapshots.setdefault(cls, snapshot_namespace(cls))
            if PatchManager.apply(patch_cls):
                self._applied.append(spec.name)

    @property
    def applied(self) -> list[str]:
        """The patches this fixture applied, in order."""
        return list(self._applied)

    def finish(self) -> list[str]:
        """Roll back what this fixture applied, last first; return every problem found."""
        from .._core.manager import PatchManager
        from .._core.registry import REGISTRY

        problems = []
        for name in reversed(self._applied):
            try:
                PatchManager.rollback(name)
            except Exception as exc:  # reported, and the others are still rolled back
                problems.append(f"rolling back {name!r} failed: {type(exc).__name__}: {exc}")
        leaked = [name for name in self._applied if PatchManager.is_applied(name)]
        if leaked:
            problems.append(f"still applied after rollback: {leaked}")
        deadline = time.monotonic() + _LINGER_WAIT_S
        while any(target in self._snapshots for target, _ in list(REGISTRY.lingerers.entries)):
            if time.monotonic() > deadline:
                problems.append("a call into a rolled-back patch did not return within 5 s")
                break
            time.sleep(0.01)
        for snapshot in self._snapshots.values():
            problems.extend(f"{snapshot.cls.__qualname__}: {line}" for line in snapshot.changes())
        return problems


@pytest.fixture
def vllm_patches() -> Iterator[PatchSession]:
    """Apply patches for this test (``vllm_patches.apply(MyPatch)``); exact rollback is checked after."""
    session = PatchSession()
    yield session
    problems = session.finish()
    if problems:
        pytest.fail("vllm_patches: the rollback was not exact:\n  " + "\n  ".join(problems), pytrace=False)


@pytest.fixture(scope="session")
def tiny_vllm_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama model directory with an offline tokenizer, for ``load_format="dummy"``."""
    from ._model import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny-vllm-model"))


class _EngineRunner:
    def __init__(self, model: Path, workdir: Path) -> None:
        self._model = model
        self._workdir = workdir
        self._runs = itertools.count()

    def __call__(self, **kwargs: Any) -> EngineRun:
        from ._engine import run_engine

        kwargs.setdefault("workdir", self._workdir / f"engine-{next(self._runs)}")
        return run_engine(self._model, **kwargs)


@pytest.fixture
def vllm_engine(tiny_vllm_model: Path, tmp_path: Path) -> _EngineRunner:
    """``vllm_engine(patches=[...], ...)`` runs the tiny model; see :func:`run_engine` for the arguments."""
    return _EngineRunner(tiny_vllm_model, tmp_path)
