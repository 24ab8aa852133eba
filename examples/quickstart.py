"""Define a patch, apply it, see the effect, roll it back -- no vLLM needed.

Run:  python examples/quickstart.py
"""

from __future__ import annotations

import logging

from vllm_custom_patches import PatchManager, VLLMPatch
from vllm_custom_patches.testing import snapshot_namespace


class Scheduler:
    """Stands in for a vLLM class: first come, first served."""

    def __init__(self) -> None:
        self.waiting: list[str] = []

    def add_request(self, request: str) -> None:
        self.waiting.append(request)

    def schedule(self) -> list[str]:
        batch, self.waiting = self.waiting, []
        return batch


class ShortestFirst(VLLMPatch[Scheduler]):
    """Serve the shortest waiting request first."""

    def schedule(self) -> list[str]:
        self.waiting.sort(key=len)
        return self._original_schedule()  # type: ignore[attr-defined,no-any-return]


def run() -> list[str]:
    scheduler = Scheduler()
    for request in ("a long request", "hi", "medium one"):
        scheduler.add_request(request)
    return scheduler.schedule()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    before = snapshot_namespace(Scheduler)
    print("unpatched:  ", run())
    ShortestFirst.apply()
    print("patched:    ", run())
    for status in PatchManager.status():
        print(f"status:      {status.name} {status.state} overrides={list(status.overrides)}")
    PatchManager.rollback_all()
    print("rolled back:", run())
    before.assert_unchanged()
    print("Scheduler.__dict__ is exactly as before the patch.")


if __name__ == "__main__":
    main()
