"""``vllm-custom-patches compare NAME --url URL``: a canary against the other ranks, side by side.

Reads the server's status (the active rollout of NAME: its ``dp_ranks``,
guards, and the reading the record kept of its start) and vLLM's own
``/metrics``, both over the hardened client of ``_ops.remote``. The canary is
the rollout's ranks; the baseline, every other data-parallel rank. Figures:
time to first token, inter-token latency, end-to-end latency and queue time
(p50, p90, p99 from vLLM's histograms), requests, failed requests, request and
generated-token rates, and the patch's own telemetry on the canary ranks.

Over what time:

* by default, the rollout's life: from the reading its record keeps of its
  start (``at_start``, taken by the API server that accepted it) to now;
* ``--window S``: two readings S seconds apart, from now (also when the record
  keeps no start reading: a record written by an older version).

Exit 0 when the canary is within every guard of its rollout (or it has none),
1 when it breaks one, 2 when it cannot tell: no active rollout of NAME, the
server cannot be read, or a guard cannot be evaluated (no request finished on
one side, telemetry off).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TextIO

from .._ops.figures import Reading, judge, telemetry_of
from .._ops.guards import LATENCIES, RATES, GuardError, Verdict, parse_guards
from .._ops.remote import RemoteError, fetch_metrics, fetch_status
from .._ops.vllm_metrics import MetricsError, parse

__all__ = ["add_command", "exit_code", "print_comparison", "run"]

MAX_WINDOW_S = 3600.0
_sleep: Callable[[float], None] = time.sleep
"""How ``--window`` waits (tests replace it)."""
_clock: Callable[[], float] = time.time


class _CannotTell(Exception):
    """Exit 2 with this one line."""


def add_command(commands: Any, seconds: Callable[[str], float]) -> argparse.ArgumentParser:
    compare = commands.add_parser(
        "compare",
        help="compare a canary's data-parallel ranks with the others, from vLLM's own metrics",
        description="Read the active rollout of NAME from URL/custom_patches and vLLM's metrics from URL/metrics: "
        "the canary ranks against the other ranks (latency p50/p90/p99, rates, failed requests, the patch's "
        "telemetry), over the rollout's life or --window seconds from now. Exit 0 within every guard of the "
        "rollout (or none), 1 a guard broken, 2 cannot tell.",
    )
    compare.add_argument("name", help="the patch of the rollout")
    compare.add_argument("--url", required=True, help="the server's base URL, e.g. http://127.0.0.1:8000")
    compare.add_argument(
        "--api-key",
        default=os.environ.get("VLLM_API_KEY") or None,
        help="the server's API key, if it has one (default: $VLLM_API_KEY)",
    )
    compare.add_argument(
        "--window",
        type=seconds,
        default=None,
        metavar="S",
        help=f"compare over S seconds from now (two readings S apart, at most {MAX_WINDOW_S:.0f}) instead of the "
        "rollout's life",
    )
    compare.add_argument("--timeout", type=seconds, default=30.0, help="seconds to wait for each answer (default 30)")
    return compare  # type: ignore[no-any-return]


def run(args: argparse.Namespace) -> int:
    try:
        report = _compare(args)
    except (RemoteError, _CannotTell) as exc:
        print(f"vllm-custom-patches: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        print(f"vllm-custom-patches: internal error, please report it: {RemoteError(repr(exc))}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_comparison(report, sys.stdout)
    return exit_code(report)


def exit_code(report: Mapping[str, Any]) -> int:
    return {"ok": 0, "broken": 1}.get(str(report["verdict"]), 2)


def _rollout(status: Mapping[str, Any], name: str, url: str) -> dict[str, Any]:
    rollouts = [r for r in status.get("rollouts") or [] if isinstance(r, Mapping)]
    mine = [r for r in rollouts if r.get("patch") == name]
    active = [r for r in mine if r.get("state") == "active"]
    if active:
        return dict(active[-1])
    if mine:
        last = mine[-1]
        raise _CannotTell(
            f"the rollout of {name!r} ({last.get('id')}) is no longer active: it ended {last.get('state')}; "
            f"nothing to compare (its record: vllm-custom-patches status --url {url} --json)"
        )
    if "rollouts" not in status:
        raise _CannotTell(f"{url} lists no rollouts: its vllm-custom-patches is older than canary rollouts")
    others = sorted({str(r.get("patch")) for r in rollouts if r.get("state") == "active"})
    raise _CannotTell(
        f"no rollout of {name!r} on {url} (active rollouts: {', '.join(others) or 'none'}); start one with "
        f"'vllm-custom-patches apply {name} --dp-ranks RANKS --url {url}'"
    )


def _engine_ranks(status: Mapping[str, Any]) -> list[int]:
    return sorted(
        {
            p["dp_rank"]
            for p in status.get("processes", [])
            if isinstance(p, Mapping) and p.get("role") == "engine_core" and isinstance(p.get("dp_rank"), int)
        }
    )


def _reading(args: argparse.Namespace, status: Mapping[str, Any], name: str, ranks: Sequence[int]) -> Reading:
    at = _clock()
    text = fetch_metrics(args.url, args.api_key, timeout=args.timeout)
    try:
        metrics = parse(text, at)
    except MetricsError as exc:
        raise _CannotTell(f"{args.url}/metrics: {exc}") from None
    if not metrics.engines:
        raise _CannotTell(
            f"{args.url}/metrics has no per-engine vLLM request metrics (vllm:* series with an engine label); "
            "was the server started with --disable-log-stats?"
        )
    return Reading(metrics, telemetry_of(status.get("processes", []), name, ranks))


def _compare(args: argparse.Namespace) -> dict[str, Any]:
    name = args.name
    if args.window is not None and args.window > MAX_WINDOW_S:
        raise _CannotTell(f"--window {args.window:g} is longer than {MAX_WINDOW_S:.0f} s; give fewer seconds")
    status = fetch_status(args.url, args.api_key, timeout=args.timeout)
    rollout = _rollout(status, name, args.url)
    ranks = sorted(int(rank) for rank in rollout.get("dp_ranks") or [])
    try:
        guards = parse_guards(rollout.get("guards") or [])
    except GuardError as exc:
        raise _CannotTell(f"the rollout's guards cannot be read: {exc}") from None
    if args.window is not None:
        before = _reading(args, status, name, ranks)
        _sleep(args.window)
        status = fetch_status(args.url, args.api_key, timeout=args.timeout)
        again = _rollout(status, name, args.url)
        if again.get("id") != rollout.get("id"):
            raise _CannotTell(f"the rollout of {name!r} changed during the window; compare again")
        ranks = sorted(int(rank) for rank in again.get("dp_ranks") or [])
        span = "window"
    else:
        start = rollout.get("at_start")
        if start is None:
            raise _CannotTell(
                f"the rollout of {name!r} keeps no reading of its start, so its life cannot be compared; pass "
                "--window S to compare over S seconds from now"
            )
        try:
            before = Reading.from_json(start)
        except MetricsError as exc:
            raise _CannotTell(f"the rollout's start reading cannot be read ({exc}); pass --window S") from None
        span = "life"
    now = _reading(args, status, name, ranks)
    canary, baseline, verdicts, duration = judge(guards, before, now, ranks, _engine_ranks(status))
    broken = [v for v in verdicts if v.verdict == "broken"]
    unknown = [v for v in verdicts if v.verdict == "cannot_evaluate"]
    return {
        "patch": name,
        "rollout": rollout.get("id"),
        "since": rollout.get("since"),
        "over": span,
        "window_s": round(duration, 3) if math.isfinite(duration) else None,
        "canary": canary,
        "baseline": baseline,
        "guards": [verdict.as_dict() for verdict in verdicts],
        "verdict": "broken" if broken else "cannot_tell" if unknown else "ok",
    }


def _cell(name: str, value: Any) -> str:
    if value is None:
        return "-"
    if name in LATENCIES:
        return f"{value * 1000:.1f} ms"
    if name in RATES:
        return f"{value:.3g}/s"
    return f"{value:g}"


_ROWS = (*LATENCIES, "requests", "failed_requests", "generation_tokens", *RATES)


def print_comparison(report: Mapping[str, Any], out: TextIO) -> None:
    """The comparison for people: one row per figure, the telemetry, each guard's verdict, the verdict."""
    canary, baseline = report["canary"], report["baseline"]
    over = (
        f"over the rollout's life ({report['window_s']:.1f} s)"
        if report["over"] == "life"
        else f"over {report['window_s']:.1f} s from now"
    )
    print(
        f"rollout {report['rollout']} of {report['patch']}: canary dp ranks {canary['dp_ranks']} vs baseline "
        f"dp ranks {baseline['dp_ranks']}, {over}",
        file=out,
    )
    rows = [["figure", "canary", "baseline", "canary/baseline"]]
    for name in _ROWS:
        mine, theirs = canary.get(name), baseline.get(name)
        ratio = f"{mine / theirs:.2f}x" if mine is not None and theirs else ""
        rows.append([name, _cell(name, mine), _cell(name, theirs), ratio])
    _table(rows, out)
    notes = [
        f"  {side} {name}: {why}"
        for side, figures in (("canary", canary), ("baseline", baseline))
        for name, why in sorted((figures.get("notes") or {}).items())
        if name in _ROWS and figures.get(name) is None
    ]
    if notes:
        print("unknown:", file=out)
        for line in _dedupe(notes):
            print(line, file=out)
    telemetry = canary.get("telemetry")
    if telemetry:
        print(
            f"patch telemetry on the canary ranks: {telemetry['calls']:g} calls, own {telemetry['own_s']:.3f} s, "
            f"total {telemetry['total_s']:.3f} s, {telemetry['errors']:g} errors",
            file=out,
        )
    else:
        print("patch telemetry on the canary ranks: none (VLLM_CUSTOM_PATCHES_TELEMETRY=1 turns it on)", file=out)
    verdicts = [Verdict(**v) for v in report["guards"]]
    if verdicts:
        print(file=out)
        rows = [["guard", "verdict", "why"]]
        rows += [[v.guard, v.verdict.upper() if v.verdict == "broken" else v.verdict, v.why] for v in verdicts]
        _table(rows, out)
    print(file=out)
    verdict = report["verdict"]
    if verdict == "ok":
        line = "within every guard" if verdicts else "no guards: nothing to judge"
    elif verdict == "broken":
        broken = [v.guard for v in verdicts if v.verdict == "broken"]
        line = f"BROKEN: {', '.join(broken)}"
    else:
        line = "CANNOT TELL: " + ", ".join(v.guard for v in verdicts if v.verdict == "cannot_evaluate")
    print(f"verdict: {line}", file=out)


def _dedupe(lines: list[str]) -> list[str]:
    return list(dict.fromkeys(lines))


def _table(rows: list[list[str]], out: TextIO) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip(), file=out)
