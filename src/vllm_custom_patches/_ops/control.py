"""One process's part of a live change: roll a patch back or apply it here, and undo that on request.

The kill switch (``POST /custom_patches/{name}/rollback`` and ``.../apply``,
see ``endpoint``) runs :func:`execute` in every process of the server: the
API server itself, every engine core (as a vLLM utility call, on the engine
loop's thread between two scheduler steps) and every worker (as an RPC,
between two model steps); see ``_agent``.  Each call carries an operation id
and the API server's signature (``_auth``): a call that does not, such as one
sent through vLLM's development route ``POST /collective_rpc``, is refused
and changes nothing.  If any process fails, the API server asks every process
to undo that operation: a process reverts only what that operation changed
there, so an undo that reaches a process twice, or one where nothing
changed, does nothing.

Where the patch's target is not imported yet (its module is imported lazily,
or never in this kind of process), the change is made to what the import
will do: a rollback disarms the waiting patch and an apply arms it (see
``_activation.switch_waiting``); that counts as a change, and is undone like
one.

Never raises: every outcome is a result record (``ok``, ``changed``,
``relevant``, ``state``, ``error``; ``waiting`` where the patch waits for its
target's import), because one failing process must not hide the others'
results.
"""

from __future__ import annotations

import os
from typing import Any

from .._core.errors import PatchError
from .._core.forksafe import ForkSafeLock
from .._core.log import logger
from .auth import Replays, verify

__all__ = ["ACTIONS", "execute", "perform", "undo"]

ACTIONS = ("rollback", "apply")
_INVERSE = {"rollback": "apply", "apply": "rollback"}

_lock = ForkSafeLock()  # a forked child must not find it held by a thread it lacks
# op id -> (action, patch) for the operations that changed something here.
_changed: dict[str, tuple[str, str]] = {}
_MAX_REMEMBERED = 256
_replays = Replays()


def execute(args: tuple[Any, ...], scope: str) -> dict[str, Any]:
    """Run one signed step (``_auth.sign``: an action, ``undo`` included) if it is authentic; a result record.

    ``scope`` names the part of the process that runs it (role and ranks):
    each runs an operation once.
    """
    problem = verify(args, scope, _replays)
    if problem is not None:
        shown = ascii(tuple(args[:4]))[:300]  # whoever sent it chose these strings: escaped, bounded
        logger.warning(
            "vllm-custom-patches [pid %d]: kill-switch call refused, nothing changed: %s; arguments %s",
            os.getpid(), problem, shown,
        )  # fmt: skip
        name = args[1] if len(args) > 1 and isinstance(args[1], str) else ""
        return {**_result(name, ok=False, error=f"refused: {problem}"), "refused": True}
    action, name, op_id, who = (str(arg) for arg in args[:4])
    return undo(op_id, who) if action == "undo" else perform(action, name, op_id, who)


def perform(action: str, name: str, op_id: str, who: str) -> dict[str, Any]:
    """Apply or roll back patch ``name`` in this process, where it is relevant; a result record.

    Not authenticated: the caller has checked the operation (see :func:`execute`).
    """
    if action not in ACTIONS:
        return _result(name, ok=False, error=f"unknown action {action!r}; expected one of {', '.join(ACTIONS)}")
    with _lock:
        try:
            patch_cls = _patch_class(name, load=action == "apply")
        except PatchError as exc:
            return _result(name, ok=False, error=str(exc))
        if patch_cls is None:  # rollback of a patch this process never loaded: nothing to do here
            return _result(name, ok=True, relevant=False)
        try:
            changed, waiting = _do(action, patch_cls)
        except Exception as exc:  # a PatchError, or a target's code failing: reported, never raised
            logger.warning(
                "vllm-custom-patches [pid %d]: %s of patch %r refused (control op %s, requested by %s): %s",
                os.getpid(), action, name, op_id, who, exc,
            )  # fmt: skip
            return _result(name, ok=False, error=f"{type(exc).__name__}: {exc}")
        if changed is None:
            # vLLM's API server never imports the scheduler, a worker never
            # needs an engine-core class: a patch is changed only where its
            # target lives (importing it here would apply it where it has no
            # business).
            return _result(name, ok=True, relevant=False)
        if changed:
            _changed[op_id] = (action, name)
            while len(_changed) > _MAX_REMEMBERED:
                del _changed[next(iter(_changed))]
            logger.warning(
                "vllm-custom-patches [pid %d]: patch %r %s live (control op %s, requested by %s)",
                os.getpid(), name, _VERBS[action, waiting], op_id, who,
            )  # fmt: skip
        return _result(name, ok=True, changed=changed, waiting=waiting)


def undo(op_id: str, who: str) -> dict[str, Any]:
    """Revert what operation ``op_id`` changed in this process, if anything (not authenticated)."""
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
    from .._core.manager import PatchManager

    if name in PatchManager.names():
        return PatchManager.get(name)
    if not load:
        return None
    # Apply of a patch this process has not loaded: from its entry point (the
    # files of VLLM_CUSTOM_PATCHES_PATH were all loaded at start-up, if any).
    from .._core.errors import UnknownPatchError
    from .._runtime.discovery import find_entry_points

    entry_point = find_entry_points().get(name)
    if entry_point is None:
        raise UnknownPatchError(f"no patch named {name!r} is known in this process")
    return entry_point.load()


def _target_imported(patch_cls: Any) -> bool:
    from .._core.targets import resolve_target

    spec = patch_cls._vcp_spec
    return resolve_target(spec.target, spec.name, import_module=False) is not None


def _do(action: str, patch_cls: Any) -> tuple[bool | None, bool]:
    """Whether ``action`` changed the patch here (None: it does not concern this process), and
    whether the change was to a patch waiting for its target's import."""
    from .._core.manager import PatchManager
    from .._core.versions import check_gate
    from .._runtime.activation import switch_waiting

    if action == "apply":
        check_gate(patch_cls.name, patch_cls._vcp_gate)
    waiting = switch_waiting(action, patch_cls)
    if waiting != "live":
        return (None if waiting == "irrelevant" else waiting == "changed"), True
    if action == "rollback":
        if PatchManager.rollback(patch_cls.name):
            return True, False
        return (False if _target_imported(patch_cls) else None), False
    if not _target_imported(patch_cls):
        return None, False
    return PatchManager.apply(patch_cls), False


_VERBS = {
    ("rollback", False): "rolled back",
    ("rollback", True): "disarmed (before the import of its target)",
    ("apply", False): "applied",
    ("apply", True): "armed (for the import of its target)",
}


def _result(
    name: str,
    *,
    ok: bool,
    changed: bool = False,
    relevant: bool = True,
    error: str | None = None,
    waiting: bool = False,
) -> dict[str, Any]:
    from .._core.manager import PatchManager

    state = next((s.state.value for s in PatchManager.status() if s.name == name), "unknown") if name else ""
    # ``waiting``: what changed is what the target's import will do (it is not imported here).
    return {"ok": ok, "changed": changed, "relevant": relevant, "state": state, "error": error, "waiting": waiting}
