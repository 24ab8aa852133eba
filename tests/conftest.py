from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import settings

from vllm_custom_patches.testing import isolated_registry

# Timing belongs in the benchmarks: on a loaded 2-core machine a per-example
# deadline only turns a slow example into a flaky failure.
settings.register_profile("vcp", deadline=None)
settings.load_profile("vcp")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The unit tests first (pytest would collect tests/real_vllm/ before them): a broken core
    # fails in seconds, before any test imports vLLM or starts an engine.  Stable: each group
    # keeps its own order.
    items.sort(key=lambda item: "real_vllm" in item.path.parts)


@pytest.fixture(autouse=True)
def _isolated_registry() -> Iterator[None]:
    # Every test defines its own patch classes; keep them from leaking into the next.
    with isolated_registry():
        yield
