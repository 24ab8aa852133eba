"""The runtime inside vLLM: what the general plugin does in every vLLM process.

Reads the settings, finds the selected patches (entry points and patch
files), applies them now or when their target module is imported, declares
the settings to vLLM and leaves evidence for test harnesses.  Built on the
core.  Interface for other wings: ``discovery``, ``selection``, ``activation``.
"""
