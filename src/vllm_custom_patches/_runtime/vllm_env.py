"""Declaring this project's variables to vLLM, so that ``--fail-on-environ-validation`` accepts them.

vLLM refuses to start with ``--fail-on-environ-validation`` when a ``VLLM_*``
variable it does not know is set, and it checks only after the general
plugins ran: so the plugin adds every ``VLLM_CUSTOM_PATCHES*`` variable of its
environment (the plugin's and the catalogue's settings) to
``vllm.envs.environment_variables``.

That table is also what vLLM hashes into its torch.compile cache key.  The
selection (``VLLM_CUSTOM_PATCHES``) belongs there, with the code of each
selected patch (``compile_key``): a patch may change the model code that gets
compiled, and a cache built without it, or with another version of it, must
not be reused with it.  The other settings (paths, policies) do not change
compiled code, so they are declared with a constant value: only their
presence enters the key, never, say, a per-run trace file path.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

from .._env import ENV_PATCHES

__all__ = ["PREFIX", "declare_to_vllm"]

PREFIX = "VLLM_CUSTOM_PATCHES"


def declare_to_vllm(environ: Mapping[str, str]) -> list[str]:
    """Add the ``VLLM_CUSTOM_PATCHES*`` names set in ``environ`` to vLLM's table; return those added.

    Does nothing where vLLM's ``envs`` module is not imported (it is imported
    before vLLM validates anything), so it never imports vLLM.
    """
    envs = sys.modules.get("vllm.envs")
    table = getattr(envs, "environment_variables", None)
    if not isinstance(table, dict):
        return []
    added = []
    for name in environ:
        if name.startswith(PREFIX) and name not in table:
            table[name] = _selection if name == ENV_PATCHES else _not_a_compile_factor
            added.append(name)
    return added


def _selection() -> str | None:
    # Imported when vLLM asks (while it computes its compile key), not with the plugin.
    from .compile_key import selection_key

    return selection_key(os.environ)


def _not_a_compile_factor() -> str:
    return "set"
