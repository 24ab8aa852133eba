"""Upgrade safety: will the selected patches still fit another vLLM?

Reads vLLM installed or statically from a wheel or a source tree
(``vllm_views``, ``static``), compares signatures exactly (``signatures``),
fingerprints members into lock files (``fingerprint``) and reports findings
(``doctor``).  Interface for other wings: ``doctor``, ``fingerprint``,
``static``, ``vllm_views``, ``signatures``.
"""
