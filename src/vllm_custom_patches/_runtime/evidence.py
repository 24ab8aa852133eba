"""Per-process evidence for test harnesses: what this process has applied, as a JSON file.

Only when ``VLLM_CUSTOM_PATCHES_EVIDENCE_DIR`` is set (``testing.run_engine``
sets it for the engines it starts): the plugin writes ``<dir>/<pid>.json``
after its start-up work and again whenever a pending patch is applied on the
import of its target, so a harness can read, per vLLM process, which patches
are live there.  One atomic replace per write; nothing else is touched.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from .._core.log import logger
from .._core.manager import PatchManager
from .._env import ENV_EVIDENCE_DIR

__all__ = ["write_evidence"]


def write_evidence() -> None:
    """Write this process's patch status to the evidence directory, if one is set."""
    directory = os.environ.get(ENV_EVIDENCE_DIR, "").strip()
    if not directory:
        return
    pid = os.getpid()
    record = {
        "pid": pid,
        "ppid": os.getppid(),
        "argv": sys.argv[:3],
        "written_at": time.time(),
        "applied": PatchManager.applied(),
        "patches": [status.as_dict() for status in PatchManager.status()],
    }
    path = Path(directory) / f"{pid}.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{pid}.json.tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, path)
    except OSError as exc:  # evidence is for tests; never worth failing vLLM's start-up
        logger.warning("could not write evidence to %s: %s", path, exc)
