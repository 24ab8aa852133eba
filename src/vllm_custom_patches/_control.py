"""One process's part of a live change: roll a patch back or apply it here, and undo that on request.

The kill switch (``POST /custom_patches/{name}/rollback`` and ``.../apply``,
see ``endpoint``) runs :func:`perform` in every process of the server: the
API server itself, every engine core (as a vLLM utility call, on the engine
loop's thread between two scheduler steps) and every worker (as an RPC,
between two model steps); see ``_agent``.  Each call carries an operation id.
If any process fails, the API server asks every process to :func:`undo` that
operation: a process reverts only what that operation changed there, so an
undo that reaches a process twice, or one where nothing changed, does nothing.

Never raises: every outcome is a result record (``ok``, ``changed``,
``relevant``, ``state``, ``error``), because one failing process must not
hide the others' results.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

from ._errors import PatchError
from ._log import logger

__all__ = ["ACTIONS", "perform", "undo"]

ACTIONS = ("rollback", "apply")
_INVERSE = {"rollback": "apply", "apply": "rollback"}

_lock = threading.Lock()
# op id -> (action, patch) for the operations that changed something here.
_changed: dict[str, tuple[str, str]] = {}
_MAX_REMEMBERED = 256


def perform(action: str, name: str, op_id: str, who: str) -> dict[str, Any]:
    """Apply or roll back patch ``name`` in this process, where it is relevant; a result record."""
    if action not in ACTIONS:
        return _result(name, ok=False, error=f"unknown action {action!r}; expected one of {', '.join(ACTIONS)}")
    with _lock:
        try:
            patch_cls = _patch_class(name, load=action == "apply")
        except PatchError as exc:
            return _result(name, ok=False, error=str(exc))
        if patch_cls is None:  # rollback of a patch this process never loaded: nothing to do here
            return _result(name, ok=True, relevant=False)
        if not _target_imported(patch_cls):
            # vLLM's API server never imports the scheduler, a worker never
            # needs an engine-core class: a patch is changed only where its
            # target lives (importing it here would apply it where it has no
            # business).
            return _result(name, ok=True, relevant=False)
        try:
            changed = _do(action, patch_cls)
        except Exception as exc:  # a PatchError, or a target's code failing: reported, never raised
            logger.warning(
                "vllm-custom-patches [pid %d]: %s of patch %r refused (control op %s, requested by %s): %s",
                os.getpid(), action, name, op_id, who, exc,
            )  # fmt: skip
            return _result(name, ok=False, error=f"{type(exc).__name__}: {exc}")
        if changed:
            _changed[op_id] = (action, name)
            while len(_changed) > _MAX_REMEMBERED:
                del _changed[next(iter(_changed))]
            logger.warning(
                "vllm-custom-patches [pid %d]: %s patch %r live (control op %s, requested by %s)",
                os.getpid(), "rolled back" if action == "rollback" else "applied", name, op_id, who,
            )  # fmt: skip
        return _result(name, ok=True, changed=changed)


def undo(op_id: str, who: str) -> dict[str, Any]:
    """Revert what operation ``op_id`` changed in this process, if anything."""
    with _lock:
        done = _changed.pop(op_id, None)
    if done is None:
        return _result("", ok=True)
    action, name = done
    result = perform(_INVERSE[action], name, f"{op_id}/undo", who)
    with _lock:
        _changed.pop(f"{op_id}/undo", None)  # an undo is not itself undone
    result["undone"] = result["ok"] and result["changed"]
    return result


def _patch_class(name: str, *, load: bool) -> Any:
    from ._manager import PatchManager

    if name in PatchManager.names():
        return PatchManager.get(name)
    if not load:
        return None
    # Apply of a patch this process has not loaded: from its entry point (the
    # files of VLLM_CUSTOM_PATCHES_PATH were all loaded at start-up, if any).
    from ._discovery import find_entry_points
    from ._errors import UnknownPatchError

    entry_point = find_entry_points().get(name)
    if entry_point is None:
        raise UnknownPatchError(f"no patch named {name!r} is known in this process")
    return entry_point.load()


def _target_imported(patch_cls: Any) -> bool:
    from ._targets import module_of, resolve_target

    spec = patch_cls._vcp_spec
    if module_of(spec.target) not in sys.modules:
        return False
    return resolve_target(spec.target, spec.name, import_module=False) is not None


def _do(action: str, patch_cls: Any) -> bool:
    from ._manager import PatchManager
    from ._versions import check_gate

    if action == "rollback":
        return PatchManager.rollback(patch_cls.name)
    check_gate(patch_cls.name, patch_cls._vcp_gate)
    return PatchManager.apply(patch_cls)


def _result(name: str, *, ok: bool, changed: bool = False, relevant: bool = True, error: str | None = None) -> dict[str, Any]:
    from ._manager import PatchManager

    state = next((s.state.value for s in PatchManager.status() if s.name == name), "unknown") if name else ""
    return {"ok": ok, "changed": changed, "relevant": relevant, "state": state, "error": error}
