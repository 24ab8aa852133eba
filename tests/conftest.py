from __future__ import annotations

from collections.abc import Iterator

import pytest

from vllm_custom_patches.testing import isolated_registry


@pytest.fixture(autouse=True)
def _isolated_registry() -> Iterator[None]:
    # Every test defines its own patch classes; keep them from leaking into the next.
    with isolated_registry():
        yield
