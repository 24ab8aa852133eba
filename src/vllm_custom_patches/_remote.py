"""``vllm-custom-patches status --url``: a running server's patches, per process, from its endpoint.

Exit codes (for CI and health checks): 0 every process of each role has the
same patches; 1 some process lacks a patch others of its role have, or could
not answer (each named, with rank and host); 2 the server cannot be reached,
refuses the key, or does not serve the endpoint (with how to enable it).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from ._fleet import describe_process

__all__ = ["RemoteError", "fetch_status", "print_status", "status_exit_code"]

ENDPOINT = "/custom_patches"

_ENABLE_HINT = (
    "start the server with vllm-custom-patches installed and VLLM_PLUGINS including custom_patches "
    "(vLLM loads endpoint plugins only when VLLM_PLUGINS names them), e.g. VLLM_PLUGINS=custom_patches vllm serve ..."
)


class RemoteError(Exception):
    """The server could not give its status; the message says why and what to do."""


def fetch_status(url: str, api_key: str | None = None, timeout: float = 30.0) -> dict[str, Any]:
    """``GET {url}/custom_patches`` and return its JSON."""
    if not url.startswith(("http://", "https://")):
        raise RemoteError(f"--url {url!r} is not an http(s) URL; give the server's address, e.g. http://127.0.0.1:8000")
    request = urllib.request.Request(url.rstrip("/") + ENDPOINT, headers={"Accept": "application/json"})
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise RemoteError(f"{url} does not serve {ENDPOINT}: the endpoint is not enabled; {_ENABLE_HINT}") from None
        if exc.code == 401:
            hint = "pass the server's API key with --api-key" if not api_key else "the API key given was refused"
            raise RemoteError(f"{url}{ENDPOINT} answered 401 Unauthorized: {hint}") from None
        raise RemoteError(f"{url}{ENDPOINT} answered HTTP {exc.code}: {exc.read()[:500]!r}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise RemoteError(f"cannot reach {url}: {reason} (is the server running, and is this its address?)") from None
    try:
        report = json.loads(body)
    except ValueError:
        raise RemoteError(f"{url}{ENDPOINT} did not answer JSON; is this a vLLM server?") from None
    if not isinstance(report, dict) or not isinstance(report.get("processes"), list):
        raise RemoteError(f"{url}{ENDPOINT} answered JSON without a 'processes' list; is this vllm-custom-patches' endpoint?")
    return report


def status_exit_code(report: Mapping[str, Any]) -> int:
    return 0 if report.get("consistent") else 1


def print_status(report: Mapping[str, Any], out: TextIO) -> None:
    """A table of processes x patches, then what is inconsistent, for humans."""
    processes: Sequence[Mapping[str, Any]] = report["processes"]
    names = sorted({name for p in processes for name in p.get("applied", [])}
                   | {patch["name"] for p in processes for patch in p.get("patches", [])})
    rows = []
    for process in processes:
        states = {patch["name"]: patch["state"] for patch in process.get("patches", [])}
        if process.get("error"):
            cells = ["?" for _ in names]
        else:
            cells = ["applied" if n in process.get("applied", []) else states.get(n, "-") for n in names]
        rows.append([describe_process(process), *cells])
    header = ["process", *names]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip(), file=out)
    print(file=out)
    for issue in report.get("inconsistencies", []):
        for missing in issue["missing_in"]:
            print(
                f"INCONSISTENT: {issue['patch']} is applied in {issue['applied_in']} {issue['role']} process(es) "
                f"but not in {missing['description']}: {missing['why']}",
                file=out,
            )
    for error in report.get("errors", []):
        print(f"NO ANSWER: {error['description']}: {error['error']}", file=out)
    verdict = "consistent" if report.get("consistent") else "NOT consistent"
    print(f"{len(processes)} process(es), {len(names)} patch(es): {verdict}", file=out)
