"""The client side of the ``custom_patches`` endpoint: ``status``, ``rollback`` and ``apply`` against a running server.

Exit codes (for CI and health checks): ``status``: 0 every process of each
role has the same patches; 1 some process lacks a patch others of its role
have, or could not answer (each named, with rank and host); 2 the server
cannot be reached, refuses the key, or does not serve the endpoint (with how
to enable it).  ``rollback``/``apply``: 0 done in every process; 1 refused
by the server's processes and undone everywhere (each process's reason); 2
the request did not get that far (unreachable, control disabled, wrong token,
unknown patch, bad request).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from ._fleet import describe_process

__all__ = ["RemoteError", "fetch_status", "post_control", "print_control", "print_status", "status_exit_code"]

ENDPOINT = "/custom_patches"

_ENABLE_HINT = (
    "start the server with vllm-custom-patches installed and VLLM_PLUGINS including custom_patches "
    "(vLLM loads endpoint plugins only when VLLM_PLUGINS names them), e.g. VLLM_PLUGINS=custom_patches vllm serve ..."
)


class RemoteError(Exception):
    """The server could not give its status; the message says why and what to do."""


def _exchange(url: str, request: urllib.request.Request, timeout: float) -> tuple[int, bytes]:
    """Send ``request`` to the server at ``url``: (HTTP status, body), whatever the status."""
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise RemoteError(f"cannot reach {url}: {reason} (is the server running, and is this its address?)") from None


def _check_url(url: str) -> None:
    if not url.startswith(("http://", "https://")):
        raise RemoteError(f"--url {url!r} is not an http(s) URL; give the server's address, e.g. http://127.0.0.1:8000")


def fetch_status(url: str, api_key: str | None = None, timeout: float = 30.0) -> dict[str, Any]:
    """``GET {url}/custom_patches`` and return its JSON."""
    _check_url(url)
    request = urllib.request.Request(url.rstrip("/") + ENDPOINT, headers={"Accept": "application/json"})
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    code, body = _exchange(url, request, timeout)
    if code == 404:
        raise RemoteError(f"{url} does not serve {ENDPOINT}: the endpoint is not enabled; {_ENABLE_HINT}")
    if code == 401:
        hint = "pass the server's API key with --api-key" if not api_key else "the API key given was refused"
        raise RemoteError(f"{url}{ENDPOINT} answered 401 Unauthorized: {hint}")
    if code != 200:
        raise RemoteError(f"{url}{ENDPOINT} answered HTTP {code}: {body[:500]!r}")
    try:
        report = json.loads(body)
    except ValueError:
        raise RemoteError(f"{url}{ENDPOINT} did not answer JSON; is this a vLLM server?") from None
    if not isinstance(report, dict) or not isinstance(report.get("processes"), list):
        raise RemoteError(f"{url}{ENDPOINT} answered JSON without a 'processes' list; is this vllm-custom-patches' endpoint?")
    return report


_CONTROL_HINT = (
    "the control routes exist only when the server was started with VLLM_CUSTOM_PATCHES_CONTROL_TOKEN set "
    "(at least 16 characters) and VLLM_PLUGINS including custom_patches"
)


def post_control(
    url: str, action: str, name: str, token: str | None, reason: str = "", timeout: float = 60.0
) -> dict[str, Any]:
    """``POST {url}/custom_patches/{name}/{action}``; the report (``ok`` false: refused and undone everywhere)."""
    from urllib.parse import quote

    _check_url(url)
    if not token:
        raise RemoteError("no control token: pass --token or set VLLM_CUSTOM_PATCHES_CONTROL_TOKEN")
    endpoint = f"{url.rstrip('/')}{ENDPOINT}/{quote(name, safe='')}/{action}"
    data = json.dumps({"reason": reason} if reason else {}).encode()
    request = urllib.request.Request(
        endpoint, data=data, method="POST",
        headers={"Content-Type": "application/json", "Accept": "application/json", "Authorization": f"Bearer {token}"},
    )  # fmt: skip
    code, body = _exchange(url, request, timeout)
    try:
        answer = json.loads(body)
    except ValueError:
        answer = None
    if code in (200, 409) and isinstance(answer, dict) and isinstance(answer.get("processes"), list):
        return answer
    detail = answer.get("error") if isinstance(answer, dict) else None
    if code == 404 and isinstance(answer, dict) and "known" in answer:
        raise RemoteError(f"{detail}; known patches: {', '.join(answer['known']) or 'none'}")
    if code in (404, 405):
        raise RemoteError(f"{url} does not serve {ENDPOINT}/NAME/{action}: {_CONTROL_HINT}")
    if code == 403:
        raise RemoteError(f"{endpoint} answered 403 Forbidden: the token was refused")
    raise RemoteError(f"{endpoint} answered HTTP {code}: {detail or body[:500]!r}")


def print_control(report: Mapping[str, Any], out: TextIO) -> None:
    """Per process: what happened; then the verdict."""
    for process in report["processes"]:
        if not process.get("relevant", True):
            outcome = "not relevant here"
        elif process["ok"]:
            outcome = "changed" if process.get("changed") else "unchanged (already so)"
        else:
            outcome = f"FAILED: {process.get('error')}"
        if process.get("reverted"):
            outcome += " (reverted)"
        if process.get("undo_error"):
            outcome += f" (undo FAILED: {process['undo_error']})"
        print(f"{describe_process(process)}: {outcome}; now {process.get('state')}", file=out)
    verb = "rolled back" if report["action"] == "rollback" else "applied"
    if report["ok"]:
        print(f"patch {report['patch']!r} {verb} in every process where it applies "
              f"({report['elapsed_s'] * 1000:.0f} ms, op {report['op_id']})", file=out)  # fmt: skip
    else:
        print(f"REFUSED: patch {report['patch']!r} was not {verb}; every process was put back as it was "
              f"(op {report['op_id']})", file=out)  # fmt: skip


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
