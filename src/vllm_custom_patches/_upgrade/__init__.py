"""Upgrade safety: will the selected patches still fit another vLLM?

Reads vLLM installed or statically from a wheel or a source tree
(``vllm_views``, ``static``), compares signatures exactly (``signatures``),
fingerprints members into lock files (``fingerprint``), works out the state a
patch depends on and the vLLM code that touches it (``surface``) and reports
findings (``doctor``).  Interface for other wings: ``doctor``, ``fingerprint``,
``static``, ``surface``, ``vllm_views``, ``signatures``.
"""
