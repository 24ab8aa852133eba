"""Run a real vLLM engine on the tiny model, with patches selected, in a fresh process.

:func:`run_engine` starts ``python -m vllm_custom_patches.testing._engine``
with ``VLLM_CUSTOM_PATCHES`` set, exactly as an operator would: the patches
reach every process through vLLM's general plugin, not through anything the
test did in its own interpreter.  Each vLLM process writes what it applied
to an evidence directory (``VLLM_CUSTOM_PATCHES_EVIDENCE_DIR``), and the
result pairs that with the process tree, so a test can assert that the
EngineCore, not only the driver, runs the patch.

This module is also the child's script: everything that starts an engine
sits under the ``__main__`` guard, since vLLM starts its EngineCore and
workers with ``spawn``.  The parent side never imports vLLM.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._env import ENV_EVIDENCE_DIR, ENV_PATCHES
from ._model import ENGINE_ENV, ENGINE_KWARGS

__all__ = ["DEFAULT_PROMPTS", "EngineRun", "EngineRunError", "ProcessEvidence", "run_engine"]

DEFAULT_PROMPTS: tuple[tuple[int, ...], ...] = (
    tuple(range(10, 50)),
    tuple(range(100, 105)),
    tuple(range(200, 220)),
    tuple(range(300, 310)),
)
"""Token-id prompts of 40, 5, 20 and 10 tokens: different lengths, so admission order shows."""

# Matched in the name (which /proc truncates to 15 characters) or the command line.
_ROLES = (("EngineCor", "engine_core"), ("Worker", "worker"))


class EngineRunError(AssertionError):
    """The engine process failed or timed out; the message holds the tail of its log."""


@dataclass(frozen=True)
class ProcessEvidence:
    """One process of the engine, and what the plugin applied in it."""

    pid: int
    name: str
    """The process name vLLM gave it (``VLLM::EngineCore``, ``VLLM::Worker``, ...)."""
    role: str
    """``driver`` (the process that created the engine), ``engine_core``, ``worker`` or ``other``."""
    applied: tuple[str, ...]
    """Patches applied in this process (empty if the plugin selected nothing here)."""
    patches: tuple[dict[str, Any], ...] = ()
    """Every known patch's status in this process, as :meth:`PatchStatus.as_dict`."""
    reported: bool = False
    """Whether the process wrote evidence at all (it does whenever something is selected)."""


@dataclass(frozen=True)
class EngineRun:
    """What :func:`run_engine` saw."""

    outputs: tuple[tuple[int, ...], ...]
    """Generated token ids per prompt, in the order the prompts were given."""
    finished: tuple[int, ...]
    """Prompt indices in the order the engine finished them."""
    processes: tuple[ProcessEvidence, ...]
    log: Path
    """The child's combined stdout and stderr (vLLM's log, the plugin's summary lines)."""
    elapsed_s: float = 0.0

    def role(self, role: str) -> list[ProcessEvidence]:
        """The processes of one role (``driver``, ``engine_core``, ``worker``)."""
        return [p for p in self.processes if p.role == role]


def run_engine(
    model: str | os.PathLike[str],
    *,
    patches: str | Sequence[str] = (),
    prompts: Sequence[Sequence[int]] = DEFAULT_PROMPTS,
    max_tokens: int = 4,
    multiprocess: bool = True,
    engine_args: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    workdir: str | os.PathLike[str] | None = None,
    timeout: float = 300,
) -> EngineRun:
    """Run the tiny model (see :func:`write_tiny_model`) in a fresh process with ``patches`` selected.

    ``patches`` is what ``VLLM_CUSTOM_PATCHES`` gets (a list is joined with
    commas; empty selects nothing, for the unpatched baseline).  The prompts
    are token ids, decoded greedily (``temperature=0``, ``ignore_eos``), one
    request at a time (``max_num_seqs=1``) so that the finishing order is the
    admission order.  ``multiprocess=False`` runs the engine in the child's
    own process (faster; one process).  ``env`` adds variables (a patch's
    settings); ``engine_args`` adds or overrides ``vllm.LLM`` arguments.

    Raises :class:`EngineRunError`, with the tail of the log, if the engine
    fails (for example a patch that stops start-up in strict mode).
    """
    selection = patches if isinstance(patches, str) else ",".join(patches)
    root = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="vcp-engine-"))
    root.mkdir(parents=True, exist_ok=True)
    evidence = root / "evidence"
    evidence.mkdir(exist_ok=True)
    spec_path, out_path, log_path = root / "spec.json", root / "result.json", root / "engine.log"
    spec_path.write_text(
        json.dumps(
            {
                "model": str(model),
                "prompts": [list(p) for p in prompts],
                "max_tokens": max_tokens,
                "engine_args": {"max_num_seqs": 1, "enable_prefix_caching": False, **(engine_args or {})},
            }
        )
    )
    out_path.unlink(missing_ok=True)
    child_env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_CUSTOM_PATCHES", "VLLM_PLUGINS"))}
    # A short path: vLLM puts Unix sockets under VLLM_RPC_BASE_PATH.
    rpc = Path(tempfile.mkdtemp(prefix="vcp-rpc-"))
    child_env.update(
        {
            **ENGINE_ENV,
            "VLLM_CACHE_ROOT": str(root / "vllm-cache"),
            "VLLM_RPC_BASE_PATH": str(rpc),
            "VLLM_ENABLE_V1_MULTIPROCESSING": "1" if multiprocess else "0",
            "VLLM_NO_USAGE_STATS": "1",
            "VLLM_DO_NOT_TRACK": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            ENV_EVIDENCE_DIR: str(evidence),
        }
    )
    if selection:
        child_env[ENV_PATCHES] = selection
    child_env.update(env or {})
    started = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", __name__, str(spec_path), str(out_path)],
            env=child_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop(proc)
        raise EngineRunError(
            f"the engine did not finish within {timeout:.0f} s; log tail:\n{_tail(log_path)}"
        ) from None
    finally:
        _stop(proc)
        with contextlib.suppress(OSError):
            for leftover in rpc.iterdir():
                leftover.unlink()
            rpc.rmdir()
    if proc.returncode != 0 or not out_path.exists():
        raise EngineRunError(f"the engine process exited with {proc.returncode}; log tail:\n{_tail(log_path)}")
    result = json.loads(out_path.read_text())
    processes = tuple(_evidence_of(p["pid"], p["name"], p["role"], evidence) for p in result["processes"])
    return EngineRun(
        outputs=tuple(tuple(o) for o in result["outputs"]),
        finished=tuple(result["finished"]),
        processes=processes,
        log=log_path,
        elapsed_s=time.monotonic() - started,
    )


def _evidence_of(pid: int, name: str, role: str, directory: Path) -> ProcessEvidence:
    path = directory / f"{pid}.json"
    if not path.exists():
        return ProcessEvidence(pid, name, role, ())
    record = json.loads(path.read_text())
    return ProcessEvidence(pid, name, role, tuple(record["applied"]), tuple(record["patches"]), True)


def _stop(proc: subprocess.Popen[bytes], grace: float = 30) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # whatever the engine left in its session
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def _tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(no log: {exc})"


# -- the child --------------------------------------------------------------------


def _role(name: str, cmdline: str) -> str:
    for marker, role in _ROLES:
        if marker in name or marker in cmdline:
            return role
    return "other"


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    import psutil  # type: ignore[import-untyped]  # a dependency of vLLM
    import vllm

    llm = vllm.LLM(model=spec["model"], skip_tokenizer_init=True, **{**ENGINE_KWARGS, **spec["engine_args"]})
    engine = llm.llm_engine
    params = vllm.SamplingParams(temperature=0, max_tokens=spec["max_tokens"], ignore_eos=True)
    for index, prompt in enumerate(spec["prompts"]):
        engine.add_request(str(index), {"prompt_token_ids": prompt}, params)
    finished: list[int] = []
    outputs: dict[int, list[int]] = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                index = int(output.request_id.split("-", 1)[0])
                finished.append(index)
                outputs[index] = list(output.outputs[0].token_ids)  # type: ignore[index]
    me = psutil.Process()
    processes = [{"pid": me.pid, "name": me.name(), "role": "driver"}]
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            name, cmdline = child.name(), " ".join(child.cmdline())
            processes.append({"pid": child.pid, "name": name, "role": _role(name, cmdline)})
    return {
        "outputs": [outputs[i] for i in range(len(spec["prompts"]))],
        "finished": finished,
        "processes": processes,
    }


def _main(argv: list[str]) -> int:
    spec_path, out_path = argv
    result = _child(json.loads(Path(spec_path).read_text()))
    Path(out_path + ".tmp").write_text(json.dumps(result))
    os.replace(out_path + ".tmp", out_path)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
