"""The environment variables this package reads, by name.

A module of its own, importing nothing: the plugin reads ``VLLM_CUSTOM_PATCHES``
in every vLLM process, and with it unset must import nothing else.
"""

ENV_PATCHES = "VLLM_CUSTOM_PATCHES"
ENV_STRICT = "VLLM_CUSTOM_PATCHES_STRICT"
ENV_PATH = "VLLM_CUSTOM_PATCHES_PATH"
ENV_VLLM_VERSION = "VLLM_CUSTOM_PATCHES_VLLM_VERSION"
ENV_LOCK_DIR = "VLLM_CUSTOM_PATCHES_LOCK_DIR"
"""Where ``doctor``, ``show`` and ``lock`` keep and read an ops team's own lock files (``lock --lock-dir``)."""
ENV_EVIDENCE_DIR = "VLLM_CUSTOM_PATCHES_EVIDENCE_DIR"
"""Set by test harnesses (``vllm_custom_patches.testing.run_engine``): each process writes its status there."""
ENV_CONTROL_TOKEN = "VLLM_CUSTOM_PATCHES_CONTROL_TOKEN"
"""Enables the kill switch (``POST /custom_patches/{name}/rollback`` and ``/apply``) and is its bearer token."""
ENV_TELEMETRY = "VLLM_CUSTOM_PATCHES_TELEMETRY"
"""``1``: time every patch applied afterwards in each process (calls, own and total seconds, errors; ``_runtime.telemetry``)."""
ENV_GUARD_INTERVAL = "VLLM_CUSTOM_PATCHES_GUARD_INTERVAL"
"""Seconds between two judgements of a guarded rollout's guards in the API server that accepted it (default 5)."""
