"""A patch baked into a Docker image as a plain file (see the Dockerfile).

Files in a directory named by ``VLLM_CUSTOM_PATCHES_PATH`` are imported by the
plugin in every vLLM process; the patches they define become selectable by
name in ``VLLM_CUSTOM_PATCHES``.
"""

from __future__ import annotations

import logging
from typing import Any

from typing_extensions import override

from vllm_custom_patches import VLLMPatch, vllm_versions

logger = logging.getLogger("vllm.custom_patches.admission_log")


@vllm_versions(">=0.32,<0.34")
class AdmissionLog(VLLMPatch["vllm.v1.core.sched.scheduler:Scheduler"]):
    """Log every request the scheduler admits, with its prompt length.

    Why: ops want one line per admitted request in the EngineCore log without
    raising vLLM's log level.  Changes: ``Scheduler.add_request`` logs, then
    calls the original.  Checked against vLLM 0.32.0.  Remove: drop the file
    or leave ``AdmissionLog`` out of ``VLLM_CUSTOM_PATCHES``.
    """

    @override
    def add_request(self, request: Any) -> None:
        logger.info("admitted request %s (%d prompt tokens)", request.request_id, request.num_prompt_tokens)
        AdmissionLog.original("add_request")(self, request)
