"""The engine side of the status plane: what each vLLM process answers about its patches.

The ``custom_patches`` endpoint plugin runs in the API server only; it reaches
the other processes the way vLLM's own handlers do.  For that, the general
plugin (which runs in every process) gives two vLLM classes two methods each,
under names no vLLM member uses (``vllm_custom_patches_status`` and, for the
kill switch, ``vllm_custom_patches_control``, see ``_control``):

* ``EngineCore.vllm_custom_patches_status``: a *utility method*, which the
  API server calls on every engine core (every data-parallel rank, on every
  node) through the engine client.  vLLM runs utility calls on the engine's
  busy-loop thread between two scheduler steps.  It answers for itself and
  asks its workers through ``collective_rpc``.
* ``WorkerWrapperBase.vllm_custom_patches_status``: the worker-side RPC method
  (one answer per tensor/pipeline-parallel rank).
* ``EngineCore.vllm_custom_patches_rollouts`` (with the control methods): the
  engine core's copy of the canaries' rollout records (``_rollouts``), read by
  every API server, written only by a signed step.

The status methods only read (``PatchManager.status()``).  The control
methods exist only where the kill switch is enabled (a usable
``VLLM_CUSTOM_PATCHES_CONTROL_TOKEN`` in the process's environment), and they
change patches only for a call signed by the API server's authenticated
control route (``_auth``): vLLM's development mode (``VLLM_SERVER_DEV_MODE=1``)
lets any HTTP client call a worker's methods by name (``POST
/collective_rpc``), so being reachable only through vLLM's engine client is
not a guarantee.  vLLM's docs name this pairing of an endpoint plugin with a
general plugin that installs the engine-side method.  The methods are plain
additions outside :class:`PatchManager` (they are not patches a user
selects); the status methods are installed whenever the plugin runs in a vLLM
process, patches selected or not: a process with nothing selected must still
answer "nothing applied", or a node started without ``VLLM_CUSTOM_PATCHES``
would go unnoticed.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import sys
from collections.abc import Callable
from typing import Any

__all__ = [
    "CONTROL_METHOD",
    "ROLLOUTS_METHOD",
    "STATUS_METHOD",
    "WORKER_TIMEOUT_S",
    "control_record",
    "install_responders",
    "process_record",
]

STATUS_METHOD = "vllm_custom_patches_status"
"""The name of the utility method (engine core) and RPC method (worker) that report."""
CONTROL_METHOD = "vllm_custom_patches_control"
"""The name of the utility method (engine core) and RPC method (worker) that change a patch."""
ROLLOUTS_METHOD = "vllm_custom_patches_rollouts"
"""The name of the engine core's utility method that keeps its copy of the rollouts (``_rollouts``)."""

WORKER_TIMEOUT_S = 5.0
"""How long an engine core waits for its workers' answers (it blocks its loop meanwhile)."""

_ROLE_API_SERVER = "api_server"
_ROLE_ENGINE_CORE = "engine_core"
_ROLE_WORKER = "worker"


def process_record(
    role: str, *, dp_rank: int | None = None, tp_rank: int | None = None, pp_rank: int | None = None
) -> dict[str, Any]:
    """This process as the status endpoint reports it: who it is and what it has applied."""
    from .._core.instrument import installed
    from .._core.manager import PatchManager
    from .._env import ENV_PATCHES

    statuses = PatchManager.status()
    record: dict[str, Any] = {
        **_identity(role, dp_rank, tp_rank, pp_rank),
        "selection": os.environ.get(ENV_PATCHES, ""),
        "applied": PatchManager.applied(),
        # Without the docstrings: this is sent once per process on every status request.
        "patches": [{k: v for k, v in s.as_dict().items() if k != "description"} for s in statuses],
        # Each stacked member's chain in this process, outermost layer first (each layer's record has it too).
        "stacks": sorted({line for status in statuses for line in status.stacks}),
        "error": None,
    }
    if installed() is not None:  # telemetry is on (the one instrument there is); off, it is never imported
        from .._runtime.telemetry import rows

        # Per patch and member: calls, own_s, total_s, errors, last_error (``_runtime.telemetry``).
        record["telemetry"] = rows()
    return record


def control_record(
    signed: tuple[Any, ...], role: str, *,
    dp_rank: int | None = None, tp_rank: int | None = None, pp_rank: int | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Do this process's part of a live change (``_control``), if ``signed`` is authentic; who it is and how it went."""
    from .control import execute

    # Each part of a process runs an operation once: an engine core and its
    # worker may share one (vLLM's single-process executor).
    scope = f"{role} dp={dp_rank} tp={tp_rank} pp={pp_rank}"
    return {**_identity(role, dp_rank, tp_rank, pp_rank), **execute(signed, scope)}


def _identity(role: str, dp_rank: int | None, tp_rank: int | None, pp_rank: int | None) -> dict[str, Any]:
    return {
        "role": role,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "process": multiprocessing.current_process().name,
        "dp_rank": dp_rank,
        "tp_rank": tp_rank,
        "pp_rank": pp_rank,
    }


def unreachable_record(
    role: str, error: str, *, dp_rank: int | None = None, tp_rank: int | None = None, pp_rank: int | None = None
) -> dict[str, Any]:
    """A process that could not answer: ranks as far as they are known, nothing applied, why."""
    return {
        "role": role,
        "pid": None,
        "host": None,
        "process": None,
        "dp_rank": dp_rank,
        "tp_rank": tp_rank,
        "pp_rank": pp_rank,
        "selection": None,
        "applied": [],
        "patches": [],
        "error": error,
    }


def _engine_core_status(engine_core: Any) -> dict[str, Any]:
    """Utility method of vLLM's EngineCore: this engine core and its workers."""
    parallel = engine_core.vllm_config.parallel_config
    dp_rank = _dp_rank(parallel)
    record = process_record(_ROLE_ENGINE_CORE, dp_rank=dp_rank)
    try:
        workers = list(engine_core.model_executor.collective_rpc(STATUS_METHOD, timeout=WORKER_TIMEOUT_S))
    except Exception as exc:  # report, never fail the engine for a status question
        error = f"its workers did not answer: {type(exc).__name__}: {exc}"
        workers = [unreachable_record(_ROLE_WORKER, error, **ranks) for ranks in _worker_ranks_of(parallel, dp_rank)]
    from .rollouts import kept

    # Every engine core keeps a copy of the server's rollouts, which every API server reads here.
    return {"engine_core": record, "workers": workers, "rollouts": kept()}


def _worker_ranks_of(parallel: Any, dp_rank: int | None) -> list[dict[str, int | None]]:
    # vLLM numbers an engine's workers tensor-parallel rank first.
    tp_size = parallel.tensor_parallel_size
    return [
        {"dp_rank": dp_rank, "tp_rank": rank % tp_size, "pp_rank": rank // tp_size}
        for rank in range(tp_size * parallel.pipeline_parallel_size)
    ]


def _engine_core_control(
    engine_core: Any, action: str = "", name: str = "", op_id: str = "", who: str = "", issued: str = "", mac: str = ""
) -> list[dict[str, Any]]:
    """Utility method of vLLM's EngineCore: the change here (between two steps), then in its workers.

    The arguments are what ``_auth.sign`` made in the API server; a call that
    is not authentic is refused here and goes no further.  Named one by one:
    vLLM matches a utility call's arguments to the method's parameters and
    refuses more arguments than parameters (``*args`` counts as one).
    """
    signed = (action, name, op_id, who, issued, mac)
    parallel = engine_core.vllm_config.parallel_config
    dp_rank = _dp_rank(parallel)
    record = control_record(signed, _ROLE_ENGINE_CORE, dp_rank=dp_rank)
    if record.get("refused"):
        return [record]
    records = [record]
    try:
        records += engine_core.model_executor.collective_rpc(CONTROL_METHOD, timeout=WORKER_TIMEOUT_S, args=signed)
    except Exception as exc:  # reported: the API server then undoes the operation everywhere
        error = f"its workers did not answer: {type(exc).__name__}: {exc}"
        records += [
            {**unreachable_record(_ROLE_WORKER, error, **ranks), "ok": False, "changed": False, "relevant": True,
             "state": "unknown"}
            for ranks in _worker_ranks_of(parallel, dp_rank)
        ]  # fmt: skip
    return records


def _engine_core_rollouts(
    engine_core: Any, action: str = "", name: str = "", op_id: str = "", who: str = "", issued: str = "",
    mac: str = "", payload: str = "",
) -> dict[str, Any]:  # fmt: skip
    """Utility method of vLLM's EngineCore: its copy of the rollouts, after a signed step if one is given.

    Called without arguments, it only reads.  Named one by one, as ``_engine_core_control``'s.
    """
    from .rollouts import keep, kept

    if not (action or name or op_id or who or issued or mac or payload):
        return {"ok": True, "error": None, "conflict": None, "rollouts": kept()}
    scope = f"{_ROLE_ENGINE_CORE} dp={_dp_rank(engine_core.vllm_config.parallel_config)} rollouts"
    return keep((action, name, op_id, who, issued, mac, payload), scope)


# vLLM's multiprocessing executor (0.32) stops reading its workers' answers at the first worker
# that raised, so that worker's next answer is read as the answer to the next call: one
# exception in a worker RPC desynchronises every later ``collective_rpc`` of the engine.  Our
# worker methods are reachable by anyone vLLM's dev mode lets call ``/collective_rpc``, with
# any arguments, so they never raise: whatever arrives, each worker answers with a record.


def _worker_control(wrapper: Any, *signed: Any, **keywords: Any) -> dict[str, Any]:
    """RPC method of vLLM's WorkerWrapperBase: the change in this worker, between two model steps, if authentic."""
    ranks = _worker_ranks(wrapper)
    if keywords:  # the API server never sends any: with them, not a signed step (refused, logged)
        signed = (*signed, {"keyword arguments": sorted(map(str, keywords))[:5]})
    try:
        return control_record(signed, _ROLE_WORKER, **ranks)
    except Exception as exc:  # answered, never raised: see above
        return {**unreachable_record(_ROLE_WORKER, f"control step failed: {type(exc).__name__}: {exc}", **ranks),
                "ok": False, "changed": False, "relevant": True, "state": "unknown", "refused": True}  # fmt: skip


def _worker_status(wrapper: Any, *args: Any, **keywords: Any) -> dict[str, Any]:
    """RPC method of vLLM's WorkerWrapperBase: this worker (arguments, which none sends, are ignored)."""
    ranks = _worker_ranks(wrapper)
    try:
        return process_record(_ROLE_WORKER, **ranks)
    except Exception as exc:  # answered, never raised: see above
        return unreachable_record(_ROLE_WORKER, f"status failed: {type(exc).__name__}: {exc}", **ranks)


def _worker_ranks(wrapper: Any) -> dict[str, int | None]:
    # vLLM's process groups are the truth once the worker's device is set up;
    # before that (or if their API moves), derive the ranks from the config.
    parallel = wrapper.vllm_config.parallel_config
    try:
        from vllm.distributed import parallel_state

        return {
            "dp_rank": _dp_rank(parallel),
            "tp_rank": parallel_state.get_tp_group().rank_in_group,
            "pp_rank": parallel_state.get_pp_group().rank_in_group,
        }
    except Exception:
        rank = getattr(getattr(wrapper, "worker", None), "rank", wrapper.rpc_rank)
        tp_size = parallel.tensor_parallel_size
        return {"dp_rank": _dp_rank(parallel), "tp_rank": rank % tp_size, "pp_rank": rank // tp_size}


def _dp_rank(parallel: Any) -> int | None:
    # vLLM 0.32 keeps the engine's global data-parallel rank in
    # data_parallel_index; data_parallel_rank stays 0 in every engine of a
    # server that balances its ranks itself (``--data-parallel-size N``).
    rank = getattr(parallel, "data_parallel_index", None)
    return rank if isinstance(rank, int) else getattr(parallel, "data_parallel_rank", None)


_RESPONDERS: tuple[tuple[str, str, str, Callable[..., Any]], ...] = (
    ("vllm.v1.engine.core", "EngineCore", STATUS_METHOD, _engine_core_status),
    ("vllm.v1.engine.core", "EngineCore", CONTROL_METHOD, _engine_core_control),
    ("vllm.v1.engine.core", "EngineCore", ROLLOUTS_METHOD, _engine_core_rollouts),
    ("vllm.v1.worker.worker_base", "WorkerWrapperBase", STATUS_METHOD, _worker_status),
    ("vllm.v1.worker.worker_base", "WorkerWrapperBase", CONTROL_METHOD, _worker_control),
)


def install_responders() -> None:
    """Give vLLM's engine core and worker wrapper classes their status method, where imported,
    and their control (and the engine core its rollouts) method where the kill switch is enabled.

    Called from the plugin's ``register()``, which vLLM calls from
    ``EngineCore.__init__`` and ``WorkerWrapperBase.init_worker``: the class
    that matters in a process is always imported by then.  Idempotent; a
    member of that name which is not ours is left alone (and logged).
    """
    from .auth import control_token

    enabled = control_token() is not None
    for module_name, class_name, method, responder in _RESPONDERS:
        module = sys.modules.get(module_name)
        cls = getattr(module, class_name, None) if module is not None else None
        if not isinstance(cls, type):
            continue
        present = cls.__dict__.get(method)
        if method in (CONTROL_METHOD, ROLLOUTS_METHOD) and not enabled:
            if present is responder:  # the token is gone (tests): so is the way in
                delattr(cls, method)
            continue
        if present is responder:
            continue
        if present is not None:
            from .._core.log import logger

            logger.warning(
                "vllm-custom-patches: %s.%s already exists and is not ours; the custom_patches "
                "endpoint will not reach this process's patches",
                class_name,
                method,
            )
            continue
        setattr(cls, method, responder)
