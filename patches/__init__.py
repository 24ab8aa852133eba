"""The catalogue of patches that ship with vllm-custom-patches.

Each module holds one patch; each is listed under the ``vllm_custom_patches``
entry-point group in ``pyproject.toml``, so it is imported only when selected.
"""
