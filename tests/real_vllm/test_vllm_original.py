"""vLLM's own unit tests call ``Scheduler`` methods unbound with stand-ins as ``self``.

A patch that reaches its original through ``self._original_x`` fails there; one
that uses ``MyPatch.original("x")`` works, on the real ``Scheduler``.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from vllm_custom_patches import VLLMPatch
from vllm_custom_patches.testing import applied, snapshot_namespace

pytestmark = pytest.mark.vllm


def test_a_stub_self_reaches_the_real_schedulers_original_through_the_patch() -> None:
    from vllm.v1.core.sched.scheduler import Scheduler

    class CountsThroughSelf(VLLMPatch[Scheduler]):
        def get_request_counts(self) -> tuple[int, int]:
            return self._original_get_request_counts()  # type: ignore[attr-defined,no-any-return]

    class CountsThroughPatch(VLLMPatch[Scheduler]):
        def get_request_counts(self) -> tuple[int, int]:
            return CountsThroughPatch.original("get_request_counts")(self)  # type: ignore[no-any-return]

    stub = SimpleNamespace(running=["a"], waiting=["b", "c"], kv_holding_waiting=["d"])
    before = snapshot_namespace(Scheduler)
    assert Scheduler.get_request_counts(stub) == (1, 3)  # type: ignore[arg-type]
    with applied(CountsThroughSelf), pytest.raises(AttributeError, match="_original_get_request_counts"):
        Scheduler.get_request_counts(stub)  # type: ignore[arg-type]
    with applied(CountsThroughPatch):
        assert Scheduler.get_request_counts(stub) == (1, 3)  # type: ignore[arg-type]
    before.assert_unchanged()
