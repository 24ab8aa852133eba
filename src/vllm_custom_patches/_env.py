"""The environment variables this package reads, by name.

A module of its own, importing nothing: the plugin reads ``VLLM_CUSTOM_PATCHES``
in every vLLM process, and with it unset must import nothing else.
"""

ENV_PATCHES = "VLLM_CUSTOM_PATCHES"
ENV_STRICT = "VLLM_CUSTOM_PATCHES_STRICT"
ENV_PATH = "VLLM_CUSTOM_PATCHES_PATH"
ENV_VLLM_VERSION = "VLLM_CUSTOM_PATCHES_VLLM_VERSION"
