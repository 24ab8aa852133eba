"""A test-only patch that makes admission-order tests independent of machine speed.

An admission-order test needs every request it orders to be waiting in the
scheduler at the same moment; otherwise the first one to arrive is admitted
alone and the order depends on how fast the engine runs compared with the
client.  ``AdmissionGate`` (a patch on ``Scheduler.add_request``, loaded
through ``VLLM_CUSTOM_PATCHES_PATH``) holds back every request whose prompt
length is listed in ``$VCP_GATE_LENGTHS`` until it holds as many as the list
has entries, then hands them all to vLLM's ``add_request`` at once, in the
order they arrived.  The next ``schedule()`` sees all of them waiting, and
the policy alone decides their order.  Other requests pass straight through.

Each held request is appended to ``$VCP_GATE_LOG`` (one JSON line from inside
the engine core), so a client that must fix the arrival order can submit the
next request only once the previous one is held: arrival order is then
submission order, without sleeps.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from _engine import write_patch_file

ADMISSION_GATE_PATCH = '''
import json
import os

from typing_extensions import override

from vllm_custom_patches import VLLMPatch


def _lengths():
    return [int(n) for n in os.environ.get("VCP_GATE_LENGTHS", "").split(",") if n.strip()]


class AdmissionGate(VLLMPatch["vllm.v1.core.sched.scheduler:Scheduler"]):
    """Holds requests of the lengths in $VCP_GATE_LENGTHS until all have arrived, then adds them at once."""

    @override
    def add_request(self, request):
        add = AdmissionGate.original("add_request")
        gated = _lengths()
        if len(request.prompt_token_ids) not in gated:
            return add(self, request)
        held = self.__dict__.setdefault("_vcp_gate_held", [])
        held.append(request)
        log = os.environ.get("VCP_GATE_LOG")
        if log:
            with open(log, "a") as out:
                out.write(json.dumps({"pid": os.getpid(), "held": [len(r.prompt_token_ids) for r in held]}) + "\\n")
        if len(held) < len(gated):
            return None
        self._vcp_gate_held = []
        for waiting in held:
            add(self, waiting)
        return None
'''


def write_admission_gate(directory: Path) -> Path:
    """Write the AdmissionGate patch file into ``directory`` (made for VLLM_CUSTOM_PATCHES_PATH); return it."""
    return write_patch_file(directory, "admission_gate.py", ADMISSION_GATE_PATCH)


def held_lines(log: Path) -> int:
    """How many held requests the gate has logged so far."""
    return len(log.read_text().splitlines()) if log.exists() else 0


def wait_held(log: Path, count: int, timeout: float = 120) -> list[int]:
    """Wait until the gate has logged ``count`` held requests; the prompt lengths held at the last one."""
    deadline = time.monotonic() + timeout
    while held_lines(log) < count:
        assert time.monotonic() < deadline, (
            f"the admission gate held {held_lines(log)} requests, not {count}, within {timeout:.0f}s"
        )
        time.sleep(0.01)
    held: list[int] = json.loads(log.read_text().splitlines()[count - 1])["held"]
    return held
