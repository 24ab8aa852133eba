"""The framework's logger.

It is a child of vLLM's ``vllm`` logger, so inside a vLLM process its lines go
through vLLM's own handler and format (vLLM configures ``vllm`` and stops
propagation there); outside vLLM they propagate to the root logger as usual.
"""

from __future__ import annotations

import logging
import sys

logger = logging.getLogger("vllm.custom_patches")


def route_to_vllm_handler() -> None:
    """Make sure what is logged now reaches vLLM's handler, in a vLLM process.

    Recent vLLMs configure the ``vllm`` logger only when an engine is created,
    after the main process has run the general plugins, so the plugin's
    summary would vanish there.  If vLLM is imported and its logger has no
    handler yet, run vLLM's own bootstrap configuration (what older vLLMs run
    on import, driven by the same ``VLLM_CONFIGURE_LOGGING`` / ``VLLM_LOGGING_*``
    variables; a no-op when ``VLLM_CONFIGURE_LOGGING=0``).  vLLM applies its
    full configuration later, as usual.  Never imports vLLM.
    """
    vllm_logger_module = sys.modules.get("vllm.logger")
    if vllm_logger_module is None or logging.getLogger("vllm").handlers:
        return
    bootstrap = getattr(vllm_logger_module, "_configure_vllm_root_logger", None)
    if not callable(bootstrap):
        return
    try:
        bootstrap()
    except Exception:  # a log line is not worth failing vLLM's start-up for
        logger.debug("could not bootstrap vLLM's logging configuration", exc_info=True)
