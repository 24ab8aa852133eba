"""The vLLM general plugin: applies the patches ``VLLM_CUSTOM_PATCHES`` selects.

vLLM calls :func:`register` through the ``vllm.general_plugins`` entry point
``custom_patches`` in every process it starts (API server, EngineCore, each
worker; spawned or forked), so every process applies the same patches.

Importing this module and calling :func:`register` with ``VLLM_CUSTOM_PATCHES``
unset or empty costs an environment lookup: no vLLM module, no entry-point
scan, no import hook.  Inside vLLM (``vllm.envs`` imported) it also declares
any ``VLLM_CUSTOM_PATCHES*`` variable set to vLLM (see ``_vllm_env``), so that
``--fail-on-environ-validation`` accepts them, and gives vLLM's engine-core and
worker classes the read-only method through which the ``custom_patches``
endpoint plugin asks each process for its status (see ``_agent``).  If
``VLLM_PLUGINS`` is set, vLLM loads only the general plugins it lists (exact,
comma-separated, no spaces): include ``custom_patches`` there.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import TYPE_CHECKING

# Only what reading one variable needs: this module is imported in every vLLM
# process, and the package's __init__ imports nothing until a name is used.
from ._env import ENV_PATCHES, ENV_TELEMETRY

if TYPE_CHECKING:
    from ._runtime.activation import Epoch

__all__ = ["register"]


class _State:
    def __init__(self) -> None:
        self.done = False
        self.running = False
        self.error: BaseException | None = None
        self.epoch: Epoch | None = None


# Re-entrant: loading a patch module may import vLLM, whose start-up calls
# load_general_plugins() -> register() again on this thread; that inner call
# must return, not deadlock.
_lock = threading.RLock()
_state = _State()


def register() -> None:
    """Apply the patches selected by ``VLLM_CUSTOM_PATCHES`` in this process.

    Called by vLLM in each of its processes.  Only the first call in a process
    does anything; later calls change nothing (a forked child inherits the
    parent's patched classes, and with them the record that this ran).  If
    the first call raised, later calls raise the same error, so a process
    cannot carry on as if its patches were in place.

    Raises a :class:`~vllm_custom_patches.PatchError` subclass in strict mode
    (the default) if a patch named explicitly cannot be applied or a setting is
    invalid; the message names the variable and the fix.
    """
    with _lock:
        if _state.done or _state.running:
            if _state.error is not None:
                raise _state.error
            return
        if "vllm.envs" in sys.modules:  # inside vLLM: checked only there, so free elsewhere
            from ._runtime.vllm_env import declare_to_vllm

            declare_to_vllm(os.environ)
            # Even with nothing selected: the status endpoint must hear "nothing
            # applied" from here.  Only where vLLM's engine-core or worker class
            # is (vLLM calls this from their constructors); the API server skips it.
            if "vllm.v1.engine.core" in sys.modules or "vllm.v1.worker.worker_base" in sys.modules:
                from ._ops.agent import install_responders

                install_responders()
        if not os.environ.get(ENV_PATCHES, "").strip():
            _state.done = True
            if os.environ.get(ENV_TELEMETRY, "").strip():  # the kill switch may apply patches later: time them
                _enable_telemetry()
            if "logging" in sys.modules:  # always, inside vLLM; not worth importing otherwise
                from ._core.log import logger

                logger.debug("vllm-custom-patches [pid %d]: %s is not set; no patch selected", os.getpid(), ENV_PATCHES)
            return
        _state.running = True
        try:
            from ._runtime.activation import Epoch, activate

            _state.epoch = Epoch()
            activate(os.environ, _state.epoch)
        except BaseException as exc:
            _state.error = exc
            raise
        finally:
            _state.running = False
            _state.done = True


def _enable_telemetry() -> None:
    """Telemetry with nothing selected: a bad value is logged (nothing is applied that it could stop)."""
    from ._core.errors import PatchError
    from ._core.log import logger
    from ._runtime.activation import enable_telemetry

    failed: list[tuple[str, PatchError]] = []
    enable_telemetry(os.environ, failed)
    for _, error in failed:
        logger.error("vllm-custom-patches [pid %d]: %s Telemetry stays off.", os.getpid(), error)


def _reset_for_tests() -> None:
    """Forget that :func:`register` ran, and silence the import hooks it left.

    For tests only: patches stay applied (roll them back with the manager).
    """
    global _state
    with _lock:
        if _state.epoch is not None:
            _state.epoch.active = False
        activation = sys.modules.get(__package__ + "._activation")
        if activation is not None:  # what the kill switch armed belongs to no epoch
            activation._forget_waiting()
        _state = _State()


def _after_fork_in_child() -> None:
    # A fork while another thread held the lock would leave the child's copy
    # locked forever; the child is single-threaded, so a fresh lock is safe.
    global _lock
    _lock = threading.RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
