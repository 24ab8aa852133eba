"""A deliberately slow, stackable test patch on ``Scheduler.schedule``: what a guardrail must catch.

Each scheduler step of the engine core it is applied in sleeps
``VCP_SLOW_SCHEDULE_S`` seconds (0.1 by default) before calling the next
layer inward; nothing else changes (outputs equal vLLM's).  vLLM's
time-to-first-token histogram has coarse buckets (0.1, 0.25, 0.5 s ... here),
so the delay must be tens of milliseconds at least to move its quantiles.
Loaded from a file in ``VLLM_CUSTOM_PATCHES_PATH``: registered in every
process at start-up, applied only when asked (the kill switch or a canary).
"""

from __future__ import annotations

from pathlib import Path

from _engine import write_patch_file

NAME = "SlowSchedule"

SLOW_SCHEDULE_PATCH = '''
import os
import time

from vllm_custom_patches import VLLMPatch


class SlowSchedule(VLLMPatch["vllm.v1.core.sched.scheduler:Scheduler"], stackable=True, order=-10):
    """Test only: every scheduler step sleeps VCP_SLOW_SCHEDULE_S seconds, then schedules as the next layer does."""

    name = "SlowSchedule"

    def schedule(self, *args, **kwargs):
        time.sleep(float(os.environ.get("VCP_SLOW_SCHEDULE_S", "0.1")))
        return SlowSchedule.original("schedule")(self, *args, **kwargs)
'''


def write_slow_schedule(directory: Path) -> Path:
    """Write the SlowSchedule patch file into ``directory`` (made for VLLM_CUSTOM_PATCHES_PATH); return it."""
    return write_patch_file(directory, "slow_schedule.py", SLOW_SCHEDULE_PATCH)
