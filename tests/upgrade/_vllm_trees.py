"""Hand-made vLLM trees that doctor accepts as a whole vLLM: with the integration points the framework uses.

doctor checks, in every vLLM it reads, the points the framework itself relies
on (``_upgrade.framework``); a tree holding only a ``Scheduler`` fails those
checks, rightly.  Tests about patches give their tree the framework's points
from ``test_framework.GOOD`` (the tree that holds every one of them), so that
the findings left are about the patches.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from test_framework import GOOD  # tests/upgrade is on sys.path: pytest prepends a test module's directory


def add_framework(root: Path) -> Path:
    """Write into the vLLM tree under ``root`` every framework point it does not have yet (its own files win)."""
    for name, text in GOOD.items():
        path = root / name
        if name == "vllm/_version.py" or path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root
