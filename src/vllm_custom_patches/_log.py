"""The framework's logger.

It is a child of vLLM's ``vllm`` logger, so inside a vLLM process its lines go
through vLLM's own handler and format (vLLM configures ``vllm`` and stops
propagation there); outside vLLM they propagate to the root logger as usual.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("vllm.custom_patches")
