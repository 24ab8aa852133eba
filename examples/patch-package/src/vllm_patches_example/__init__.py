"""Example third-party patches for vllm-custom-patches.

Each patch lives in its own module and is declared as an entry point of the
group ``vllm_custom_patches`` (see ``pyproject.toml``); nothing is imported
here, so a process that selects none of them never loads their code.
"""

__version__ = "0.1.0"
