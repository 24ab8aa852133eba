"""The client side of the ``custom_patches`` endpoint: ``status``, ``rollback``, ``apply`` and ``promote``
against a running server.

Exit codes (for CI and health checks): ``status``: 0 every process of each
role has the same patches (an active canary's patch on exactly its ranks
counts as the same); 1 some process lacks a patch others of its role have,
or could not answer (each named, with rank and host); 2 the server cannot be
reached, refuses the key, or does not serve the endpoint (with how to enable
it).  ``rollback``/``apply``/``promote``: 0 done in every process asked (a
canary: those of its ranks); 1 refused, nothing changed: by the server's
processes, each put back (each process's reason), or by the server before
any change (a canary of a patch that has one, a promote without a canary:
one line saying why); 2 the request did not get that far (unreachable,
control disabled, wrong token, unknown patch, bad request, a malformed guard,
a rank no engine core has); 3 INCONSISTENT: refused, and some process could
not be put back (named), so the patch is in effect in some processes only.

Anything the client cannot read (a malformed URL, a peer that is not HTTP, a
time-out, an answer of the wrong shape) is exit 2 with one line, never 1; a
change sent without a readable answer is of unknown outcome (the line says to
run ``status``).  Redirects are refused, never followed: the request carries
the API key or the control token, which must go only to the address given.
"""

from __future__ import annotations

import http.client
import json
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from .fleet import describe_process

__all__ = [
    "RemoteError", "control_exit_code", "fetch_metrics", "fetch_status", "post_control", "print_control", "print_status",
    "status_exit_code",
]  # fmt: skip

ENDPOINT = "/custom_patches"

_ENABLE_HINT = (
    "start the server with vllm-custom-patches installed and VLLM_PLUGINS including custom_patches "
    "(vLLM loads endpoint plugins only when VLLM_PLUGINS names them), e.g. VLLM_PLUGINS=custom_patches vllm serve ..."
)


class RemoteError(Exception):
    """The server could not give its status; the message says why and what to do."""

    def __init__(self, message: str) -> None:
        # One line whatever a server, a URL or an OS error put in it: the CLI prints exactly one.
        super().__init__(_one_line(message))


def _one_line(text: str) -> str:
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


_URL_HINT = "give the server's base address, e.g. http://127.0.0.1:8000"


@dataclass(frozen=True)
class _Address:
    scheme: str
    host: str
    port: int
    path: str
    """The base path (a prefix a reverse proxy may add), without the trailing slash."""


def _parse_url(url: str) -> _Address:
    """``--url`` as the request needs it, or a RemoteError naming what is wrong with it."""
    if not url.startswith(("http://", "https://")):
        raise RemoteError(f"--url {url!r} is not an http(s) URL; {_URL_HINT}")
    if any(c.isspace() or not c.isprintable() for c in url):
        raise RemoteError(f"--url {url!r} contains spaces or control characters; {_URL_HINT}")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:  # 'Invalid IPv6 URL', a port that is not a number or out of range
        raise RemoteError(f"--url {url!r} is not a valid URL ({exc}); {_URL_HINT}") from None
    if not parts.hostname:
        raise RemoteError(f"--url {url!r} names no host; {_URL_HINT}")
    if parts.username is not None or parts.password is not None:
        raise RemoteError(
            f"--url {url!r} carries credentials; pass the API key with --api-key, the control token with --token"
        )
    if parts.query or parts.fragment:
        raise RemoteError(f"--url {url!r} has a query or fragment; {_URL_HINT}")
    # An explicit port: http.client would read one out of a bare IPv6 host ('::1' as '::' port 1).
    default = 443 if parts.scheme == "https" else 80
    return _Address(parts.scheme, parts.hostname, default if port is None else port, parts.path.rstrip("/"))


def _check_credential(option: str, value: str) -> None:
    # http.client would refuse it with a ValueError; say which option is wrong instead.
    if not (value.isascii() and value.isprintable()) or value != value.strip():
        raise RemoteError(
            f"{option} contains characters an HTTP header cannot carry (control characters, non-ASCII, "
            "surrounding spaces); give it exactly as the server has it"
        )


def _exchange(
    url: str, method: str, path: str, headers: Mapping[str, str], body: bytes | None, timeout: float
) -> tuple[int, bytes]:
    """Send one request to the server at ``url``: (HTTP status, body), whatever the status.

    http.client, not urllib: urllib follows a redirect to any host and sends the
    Authorization header there (a POST turning into a GET that carries the
    token), and it does not say whether a failure came before or after the
    request went out, which decides whether a change may have been made.
    """
    address = _parse_url(url)
    target = f"{address.path}{path}"
    endpoint = f"{url.rstrip('/')}{path}"
    changes = method != "GET"
    if address.scheme == "https":
        connection: http.client.HTTPConnection = http.client.HTTPSConnection(
            address.host, address.port, timeout=timeout
        )
    else:
        connection = http.client.HTTPConnection(address.host, address.port, timeout=timeout)
    try:
        try:
            connection.connect()
            connection.putrequest(method, target)
            for key, value in headers.items():
                connection.putheader(key, value)
            if body is not None:
                connection.putheader("Content-Length", str(len(body)))
        except OSError as exc:  # refused, unknown host, TLS, no connection in time: nothing was sent
            raise RemoteError(
                f"cannot reach {url}: {_reason(exc)} (is the server running, and is this its address?)"
            ) from None
        try:
            connection.endheaders(body)
            response = connection.getresponse()
            status, data = response.status, response.read()
            location = response.getheader("Location")
        except (OSError, http.client.HTTPException) as exc:
            raise RemoteError(_no_answer(url, method, endpoint, exc, timeout, changes)) from None
    finally:
        connection.close()
    if 300 <= status < 400:
        where = f"a redirect to {location}" if location else "a redirect without a Location"
        raise RemoteError(
            f"{endpoint} answered HTTP {status}, {where}: not followed, because the request carries the "
            f"{'control token' if changes else 'API key'}, which goes only to the address given; "
            "if the server is elsewhere, pass that address with --url"
        )
    return status, data


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return (
        f"{type(exc).__name__}: {exc}" if isinstance(exc, http.client.HTTPException) else str(exc) or type(exc).__name__
    )


def _no_answer(url: str, method: str, endpoint: str, exc: BaseException, timeout: float, changes: bool) -> str:
    """The request went out (or partly) and no usable answer came back."""
    if isinstance(exc, TimeoutError):
        what = f"no answer within {timeout:g} s"
    elif isinstance(exc, http.client.RemoteDisconnected):
        what = "the connection was closed without an answer"
    elif isinstance(exc, OSError):
        what = f"the connection failed ({_reason(exc)})"
    else:
        what = f"the answer was not HTTP ({_reason(exc)})"
    if changes:
        return (
            f"sent {method} {endpoint} but {what}: the server may have made the change, so the outcome is "
            f"unknown; run 'vllm-custom-patches status --url {url}' to see each process's state"
        )
    if isinstance(exc, TimeoutError):
        return f"asked {endpoint} but {what} (raise --timeout, or check the server's health)"
    return f"asked {endpoint} but {what}; is this the server's address and port?"


# What the printers and exit codes read of an answer: a dict names its keys ("?" before an
# optional one), a one-item list is a list of that, a type or tuple of types is isinstance.
_NUMBER = (int, float)
_STATUS_SHAPE: dict[str, Any] = {
    "consistent": bool,
    "processes": [
        {
            "?applied": [str],
            "?patches": [{"name": str, "state": object}],
            "?stacks": [str],
            "?telemetry": [
                {"patch": str, "member": str, "calls": int, "own_s": _NUMBER, "total_s": _NUMBER, "errors": int}
            ],
        }
    ],
    "?inconsistencies": [
        {
            "patch": str,
            "role": object,
            "applied_in": object,
            "missing_in": [{"description": object, "why": object}],
            "?unexpected_in": [{"description": object, "why": object}],
        }
    ],
    "?rollouts": [
        {
            "id": str,
            "patch": str,
            "dp_ranks": [int],
            "state": str,
            "since": _NUMBER,
            "?ended": (int, float, type(None)),
            "?requester": object,
            "?reason": object,
            "?guards": [str],
            "?window_s": (int, float, type(None)),
            "?ended_by": object,
            "?end_reason": object,
        }
    ],
    "?errors": [{"description": object, "error": object}],
    "?unsettled": [{"action": object, "patch": object, "op_id": object, "processes": [str]}],
}
_CONTROL_SHAPE: dict[str, Any] = {
    "ok": bool,
    "action": str,
    "patch": object,
    "op_id": object,
    "elapsed_s": _NUMBER,
    "processes": [{"ok": object}],
    "?outcome": str,
    "?undo_failed": [{"description": object, "error": object}],
    "?error": object,
    "?dp_ranks": [int],
    "?rollout": (dict, type(None)),
}


def _mismatch(value: Any, shape: Any, where: str) -> str | None:
    """Where ``value`` departs from ``shape``, or None."""
    if isinstance(shape, dict):
        if not isinstance(value, dict):
            return f"{where} is not an object"
        for key, inner in shape.items():
            name = key.lstrip("?")
            if name not in value:
                if key.startswith("?"):
                    continue
                return f"{where}.{name} is missing"
            problem = _mismatch(value[name], inner, f"{where}.{name}")
            if problem:
                return problem
        return None
    if isinstance(shape, list):
        if not isinstance(value, list):
            return f"{where} is not a list"
        for index, item in enumerate(value):
            problem = _mismatch(item, shape[0], f"{where}[{index}]")
            if problem:
                return problem
        return None
    if shape is object or (isinstance(value, shape) and not (isinstance(value, bool) and shape is _NUMBER)):
        return None
    return f"{where} is {type(value).__name__}, not {getattr(shape, '__name__', 'a number')}"


def fetch_status(url: str, api_key: str | None = None, timeout: float = 30.0) -> dict[str, Any]:
    """``GET {url}/custom_patches`` and return its JSON."""
    body = _get(url, ENDPOINT, "application/json", api_key, timeout,
                missing=f"the endpoint is not enabled; {_ENABLE_HINT}")  # fmt: skip
    try:
        report = json.loads(body)
    except ValueError:
        raise RemoteError(f"{url}{ENDPOINT} did not answer JSON; is this a vLLM server?") from None
    if not isinstance(report, dict) or not isinstance(report.get("processes"), list):
        raise RemoteError(
            f"{url}{ENDPOINT} answered JSON without a 'processes' list; is this vllm-custom-patches' endpoint?"
        )
    problem = _mismatch(report, _STATUS_SHAPE, "answer")
    if problem:
        raise RemoteError(
            f"{url}{ENDPOINT} answered JSON of an unexpected shape ({problem}); is this vllm-custom-patches' "
            "endpoint, of a version matching this command's?"
        )
    return report


METRICS = "/metrics"


def fetch_metrics(url: str, api_key: str | None = None, timeout: float = 30.0) -> str:
    """``GET {url}/metrics``: vLLM's Prometheus text, as the same hardened client reads the status."""
    body = _get(url, METRICS, "text/plain", api_key, timeout,
                missing="is this a vLLM server (its OpenAI-compatible API)?")  # fmt: skip
    try:
        return body.decode()
    except UnicodeDecodeError:
        raise RemoteError(f"{url}{METRICS} did not answer text; is this a vLLM server?") from None


def _get(url: str, endpoint: str, accept: str, api_key: str | None, timeout: float, *, missing: str) -> bytes:
    """``GET {url}{endpoint}``'s body if the answer is 200; else one line saying why (``missing``: a 404's hint)."""
    _parse_url(url)
    headers = {"Accept": accept}
    if api_key:
        _check_credential("--api-key", api_key)
        headers["Authorization"] = f"Bearer {api_key}"
    code, body = _exchange(url, "GET", endpoint, headers, None, timeout)
    if code == 404:
        raise RemoteError(f"{url} does not serve {endpoint}: {missing}")
    if code == 401:
        hint = "pass the server's API key with --api-key" if not api_key else "the API key given was refused"
        raise RemoteError(f"{url}{endpoint} answered 401 Unauthorized: {hint}")
    if code != 200:
        raise RemoteError(f"{url}{endpoint} answered HTTP {code}: {body[:500]!r}")
    return body


_CONTROL_HINT = (
    "the control routes exist only when the server was started with VLLM_CUSTOM_PATCHES_CONTROL_TOKEN set "
    "(at least 16 characters) and VLLM_PLUGINS including custom_patches"
)


def post_control(
    url: str,
    action: str,
    name: str,
    token: str | None,
    reason: str = "",
    timeout: float = 60.0,
    *,
    dp_ranks: Sequence[int] | None = None,
    guards: Sequence[str] = (),
    window_s: float | None = None,
) -> dict[str, Any]:
    """``POST {url}/custom_patches/{name}/{action}``; the report (``ok`` false: refused, nothing changed).

    ``dp_ranks``: only on those data-parallel ranks (a canary); ``guards`` and ``window_s`` watch it.
    """
    from urllib.parse import quote

    _parse_url(url)
    if not token:
        raise RemoteError("no control token: pass --token or set VLLM_CUSTOM_PATCHES_CONTROL_TOKEN")
    _check_credential("--token", token)
    path = f"{ENDPOINT}/{quote(name, safe='')}/{action}"
    endpoint = f"{url.rstrip('/')}{path}"
    fields: dict[str, Any] = {"reason": reason} if reason else {}
    if dp_ranks is not None:
        fields["dp_ranks"] = list(dp_ranks)
    if guards:
        fields["guards"] = list(guards)
    if window_s is not None:
        fields["window_s"] = window_s
    data = json.dumps(fields).encode()
    headers = {"Content-Type": "application/json", "Accept": "application/json", "Authorization": f"Bearer {token}"}
    code, body = _exchange(url, "POST", path, headers, data, timeout)
    try:
        answer = json.loads(body)
    except ValueError:
        answer = None
    # 500 with a report: refused, and not put back everywhere (``outcome`` "inconsistent").
    if code in (200, 409, 500) and isinstance(answer, dict) and isinstance(answer.get("processes"), list):
        problem = _mismatch(answer, _CONTROL_SHAPE, "answer")
        if problem:
            raise RemoteError(
                f"{endpoint} answered HTTP {code} with JSON of an unexpected shape ({problem}), so the outcome "
                f"is unknown; run 'vllm-custom-patches status --url {url}' to see each process's state"
            )
        return answer
    detail = answer.get("error") if isinstance(answer, dict) else None
    if code == 404 and isinstance(answer, dict) and isinstance(answer.get("known"), list):
        raise RemoteError(f"{detail}; known patches: {', '.join(map(str, answer['known'])) or 'none'}")
    if code in (404, 405):
        raise RemoteError(f"{url} does not serve {ENDPOINT}/NAME/{action}: {_CONTROL_HINT}")
    if code == 403:
        raise RemoteError(f"{endpoint} answered 403 Forbidden: the token was refused")
    if code in (200, 409):
        raise RemoteError(
            f"{endpoint} answered HTTP {code} without a report of each process, so the outcome is unknown; "
            f"run 'vllm-custom-patches status --url {url}' to see each process's state"
        )
    raise RemoteError(f"{endpoint} answered HTTP {code}: {detail or body[:500]!r}")


def print_control(report: Mapping[str, Any], out: TextIO) -> None:
    """Per process: what happened; then the verdict, and the rollout's record if it changed."""
    if report.get("error") and not report["processes"]:  # refused by the server before anything changed
        print(f"REFUSED: {report['error']}; nothing changed", file=out)
        return
    for process in report["processes"]:
        if not process.get("relevant", True):
            outcome = "not relevant here"
        elif process["ok"] and process.get("waiting") and process.get("changed"):
            # Its target is not imported in that process: what changed is what its import will do.
            outcome = (
                "disarmed before its target's import"
                if report["action"] == "rollback"
                else "armed for its target's import"
            )
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
    ranks = report.get("dp_ranks")
    where = f"on dp rank(s) {', '.join(map(str, ranks))}" if ranks is not None else "in every process"
    if report["ok"]:
        print(f"patch {report['patch']!r} {verb} {where} where it applies "
              f"({report['elapsed_s'] * 1000:.0f} ms, op {report['op_id']})", file=out)  # fmt: skip
        rollout = report.get("rollout")
        if isinstance(rollout, Mapping):
            print(_rollout_line(rollout), file=out)
    elif report.get("outcome") == "inconsistent":
        stuck = ", ".join(f"{p['description']} ({p['error']})" for p in report.get("undo_failed", []))
        print(f"INCONSISTENT: patch {report['patch']!r} was not {verb}, and NOT every process could be put back: "
              f"{stuck} (op {report['op_id']}). It may be in effect in some processes and not in others: check with "
              f"'vllm-custom-patches status', then send the rollback or apply you want again (processes already "
              f"so report unchanged).", file=out)  # fmt: skip
    else:
        print(f"REFUSED: patch {report['patch']!r} was not {verb} {where}; every process was put back as it was "
              f"(op {report['op_id']})" + (f": {report['error']}" if report.get("error") else ""), file=out)  # fmt: skip


def _when(unix: Any) -> str:
    import time

    try:
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(unix)))
    except (TypeError, ValueError, OverflowError):
        return "?"


def _rollout_line(rollout: Mapping[str, Any]) -> str:
    """``rollout 3f2a... shortest_prompt_first on dp ranks [1]: active since ... by ... (reason); guards ...``."""
    ranks = ", ".join(map(str, rollout.get("dp_ranks", [])))
    text = f"rollout {rollout.get('id')} {rollout.get('patch')} on dp rank(s) {ranks}: {rollout.get('state')}"
    if rollout.get("state") == "active":
        text += f" since {_when(rollout.get('since'))} by {rollout.get('requester')}"
    else:
        text += (
            f" at {_when(rollout.get('ended'))} by {rollout.get('ended_by')} (started {_when(rollout.get('since'))})"
        )
    reason = rollout.get("end_reason") or rollout.get("reason")
    if reason:
        text += f" ({reason})"
    if rollout.get("guards"):
        text += f"; guards {', '.join(map(str, rollout['guards']))} over {rollout.get('window_s')} s"
    return _one_line(text)


def control_exit_code(report: Mapping[str, Any]) -> int:
    """0 done everywhere, 1 refused and put back everywhere, 3 inconsistent (not put back everywhere)."""
    if report["ok"]:
        return 0
    return 3 if report.get("outcome") == "inconsistent" else 1


def status_exit_code(report: Mapping[str, Any]) -> int:
    return 0 if report.get("consistent") else 1


def _telemetry_lines(processes: Sequence[Mapping[str, Any]]) -> list[str]:
    """One line per timed member of a patch: its figures summed over the processes that report telemetry."""
    sums: dict[tuple[str, str], list[Any]] = {}
    for process in processes:
        for row in process.get("telemetry") or []:
            entry = sums.setdefault((row["patch"], row["member"]), [0, 0.0, 0.0, 0, 0, None])
            entry[0] += row["calls"]
            entry[1] += row["own_s"]
            entry[2] += row["total_s"]
            entry[3] += row["errors"]
            entry[4] += 1
            entry[5] = row.get("last_error") or entry[5]
    lines = []
    for (patch, member), (calls, own, total, errors, count, last) in sorted(sums.items()):
        per_call = f", own {_duration(own / calls)}/call, total {_duration(total / calls)}/call" if calls else ""
        line = (
            f"telemetry  {patch}.{member}: {calls} call(s) in {count} process(es){per_call} "
            f"(own {own:.3f} s, total {total:.3f} s), {errors} error(s)"
        )
        lines.append(line + (f", last: {last}" if errors and last else ""))
    return lines


def _duration(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


def print_status(report: Mapping[str, Any], out: TextIO) -> None:
    """A table of processes x patches, then what is inconsistent, for humans."""
    processes: Sequence[Mapping[str, Any]] = report["processes"]
    names = sorted(
        {name for p in processes for name in p.get("applied", [])}
        | {patch["name"] for p in processes for patch in p.get("patches", [])}
    )
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
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip(), file=out)
    print(file=out)
    # Each stack's chain, and how many processes have it so: a chain that differs between
    # processes shows as two lines.
    chains: dict[str, list[str]] = {}
    for process in processes:
        for line in process.get("stacks", []):
            chains.setdefault(str(line), []).append(describe_process(process))
    for line, where in sorted(chains.items()):
        print(f"stack  {line}   ({len(where)} process(es))", file=out)
    if chains:
        print(file=out)
    timed = _telemetry_lines(processes)
    for line in timed:
        print(line, file=out)
    if timed:
        print(file=out)
    for rollout in report.get("rollouts", []):
        print(_rollout_line(rollout), file=out)
    if report.get("rollouts"):
        print(file=out)
    for issue in report.get("inconsistencies", []):
        for missing in issue["missing_in"]:
            print(
                f"INCONSISTENT: {issue['patch']} is applied in {issue['applied_in']} {issue['role']} process(es) "
                f"but not in {missing['description']}: {missing['why']}",
                file=out,
            )
        for unexpected in issue.get("unexpected_in", []):
            print(f"INCONSISTENT: {issue['patch']} is applied in {unexpected['description']}: {unexpected['why']}",
                  file=out)  # fmt: skip
    for error in report.get("errors", []):
        print(f"NO ANSWER: {error['description']}: {error['error']}", file=out)
    for left in report.get("unsettled", []):
        print(
            f"INCONSISTENT: the kill switch's {left['action']} of {left['patch']} (op {left['op_id']}) was refused "
            f"and could not be undone in {', '.join(left['processes'])}; send the rollback or apply you want again",
            file=out,
        )
    verdict = "consistent" if report.get("consistent") else "NOT consistent"
    print(f"{len(processes)} process(es), {len(names)} patch(es): {verdict}", file=out)
