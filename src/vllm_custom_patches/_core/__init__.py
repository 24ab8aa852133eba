"""The core: defining a patch and grafting it onto its target, exactly and reversibly.

Knows nothing of vLLM's processes, HTTP or the command line; depends on no
other wing (only on the package's list of setting names, ``_env``).  The
public API (``VLLMPatch``, ``PatchManager``, the errors, the version gates)
lives here and is re-exported by the package's ``__init__``.
"""
