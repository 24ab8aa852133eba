"""Run the benchmarks, print a table per section and write the results as JSON.

    python benchmarks/run.py [--json PATH] [--quick] [--only SECTION ...] [--rounds N] [--offline]

Every section reports ratios measured side by side in the same run, since
absolute times on shared machines are noisy.  Sections live in their own
modules of this package (see ``_common.py`` for the contract) and are listed
in :data:`SECTIONS`; a section that fails is reported and the others still run.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable as a package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import RESULTS_DIR, ROOT, RunOptions, SectionResult, machine_info

SECTIONS: dict[str, str] = {
    # name -> module in this package, in the order they run.
    "percall": "benchmarks.percall",
    "stacks": "benchmarks.stacks",
    "telemetry": "benchmarks.telemetry",
    "throughput": "benchmarks.throughput",
    "startup": "benchmarks.startup",
    "engine": "benchmarks.engine",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--json",
        type=Path,
        default=RESULTS_DIR / "latest.json",
        help="where to write the results (default: %(default)s)",
    )
    parser.add_argument("--quick", action="store_true", help="few rounds, about 20 s in all: a smoke run")
    parser.add_argument(
        "--only", nargs="+", choices=list(SECTIONS), metavar="SECTION", help=f"run only these ({', '.join(SECTIONS)})"
    )
    parser.add_argument("--rounds", type=int, help="rounds per section (overrides the defaults and time caps)")
    parser.add_argument("--offline", action="store_true", help="download nothing; variants needing it are unavailable")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    options = RunOptions(quick=args.quick, rounds=args.rounds, offline=args.offline)
    started = time.perf_counter()
    report: dict[str, Any] = {
        "schema": 1,
        "command": " ".join(["python", "benchmarks/run.py", *(argv if argv is not None else sys.argv[1:])]),
        "quick": args.quick,
        "machine": machine_info(),
        "sections": {},
    }
    failed = False
    for name in args.only or list(SECTIONS):
        module = importlib.import_module(SECTIONS[name])
        sys.stdout.flush()
        print(f"running {name} ...", file=sys.stderr, flush=True)
        try:
            result: SectionResult = module.run(options)
        except Exception as exc:
            failed = True
            traceback.print_exc()
            report["sections"][name] = {"title": module.TITLE, "error": f"{type(exc).__name__}: {exc}"}
            print(f"\n{module.TITLE}\n  FAILED: {type(exc).__name__}: {exc}\n")
            continue
        report["sections"][name] = {"title": result.title, "seconds": round(result.seconds, 2), **result.data}
        for table in result.tables:
            print()
            print(table.render())
        print(f"  ({result.seconds:.1f} s)")
    total = time.perf_counter() - started
    report["seconds"] = round(total, 2)
    with contextlib.suppress(OSError):  # no load average on this platform
        report["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    shown = args.json.resolve()
    print(f"\nwrote {shown.relative_to(ROOT) if shown.is_relative_to(ROOT) else shown} in {total:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
