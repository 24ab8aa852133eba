"""``vllm-custom-patches ARGS`` run by the command's ``main()`` inside the test process.

A subprocess per call imports vLLM each time (about 10 s here); in this
process vLLM is imported once.  Each call gets exactly the environment it is
given (nothing else of the test process's), its output captured, and, as a
fresh process would, no module of ``VLLM_CUSTOM_PATCHES_PATH`` imported
(those are forgotten before and after, so the next call imports its own
files again).  The command's own isolation (``isolated_registry`` and
``rollback_all`` around each run) leaves the patch registry as it found it.
Tests about the console script itself run it in a subprocess instead.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from unittest import mock

CLI = str(Path(sys.executable).with_name("vllm-custom-patches"))


def _forget_patch_files() -> None:
    from vllm_custom_patches._runtime.discovery import PATH_PACKAGE

    for name in [m for m in sys.modules if m == PATH_PACKAGE or m.startswith(PATH_PACKAGE + ".")]:
        del sys.modules[name]


def run_cli(args: Sequence[str], environ: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    """Exit code, stdout and stderr of ``vllm-custom-patches ARGS`` with exactly ``environ``."""
    from vllm_custom_patches._cli.main import main

    out, err = io.StringIO(), io.StringIO()
    _forget_patch_files()
    try:
        with mock.patch.dict(os.environ, dict(environ), clear=True), \
                contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):  # fmt: skip
            code = main(list(args))
    finally:
        _forget_patch_files()
    return subprocess.CompletedProcess([CLI, *args], code, out.getvalue(), err.getvalue())
