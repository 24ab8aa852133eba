"""The HTTP client behind ``status``, ``rollback`` and ``apply``, against real local servers.

Two promises: credentials go only to the address given (a redirect is
refused, never followed), and the exit codes keep their meaning (1 only when
the server's processes disagree or refused; anything the client cannot read
is exit 2 with one line saying why, and a change whose answer never came is
reported as of unknown outcome).
"""

from __future__ import annotations

import copy
import http.server
import json
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from vllm_custom_patches._cli.main import main as cli_main
from vllm_custom_patches._ops.fleet import analyse

HANG_GUARD_S = 60.0
TOKEN = "t" * 32


class _Recorder(http.server.BaseHTTPRequestHandler):
    """Answers every request with ``answer`` and records what it was sent."""

    answer: ClassVar[tuple[int, dict[str, str], bytes]] = (404, {}, b"{}")
    seen: ClassVar[list[tuple[str, str, str | None]]] = []

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        type(self).seen.append((self.command, self.path, self.headers.get("Authorization")))
        code, headers, body = type(self).answer
        self.send_response(code)
        for key, value in {"Content-Type": "application/json", **headers}.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_HEAD = _handle

    def log_message(self, *args: object) -> None:
        pass


class _Server:
    def __init__(self) -> None:
        self.handler: type[_Recorder] = type("Recorder", (_Recorder,), {"seen": []})
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self.handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def answer(self, code: int, body: bytes = b"{}", **headers: str) -> None:
        self.handler.answer = (code, headers, body)

    @property
    def seen(self) -> list[tuple[str, str, str | None]]:
        return self.handler.seen

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def servers() -> Iterator[Callable[[], _Server]]:
    made: list[_Server] = []

    def make() -> _Server:
        made.append(_Server())
        return made[-1]

    yield make
    for server in made:
        server.close()


def _one_clear_line(err: str) -> str:
    assert "Traceback" not in err
    assert err.startswith("vllm-custom-patches: ") and err.count("\n") == 1, err
    return err


def _argv(command: str, url: str, *extra: str) -> list[str]:
    if command == "status":
        return ["status", "--url", url, "--api-key", "secret-api-key", *extra]
    return [command, "fair_share", "--url", url, "--token", TOKEN, *extra]


# -- item 3: redirects are refused, credentials never leave for another address ----------


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
@pytest.mark.parametrize("command", ["status", "rollback", "apply"])
def test_a_redirect_is_refused_and_nothing_reaches_where_it_points(
    servers: Callable[[], _Server], capsys: pytest.CaptureFixture[str], command: str, code: int
) -> None:
    server, elsewhere = servers(), servers()
    elsewhere.answer(200, json.dumps(analyse([])).encode())  # what a hostile host would say: all fine
    location = f"{elsewhere.url}/custom_patches/collect"
    server.answer(code, Location=location)
    assert cli_main(_argv(command, server.url)) == 2
    err = _one_clear_line(capsys.readouterr().err)
    assert f"answered HTTP {code}, a redirect to {location}: not followed" in err
    assert elsewhere.seen == []  # neither the API key nor the control token went there
    assert [(method, auth) for method, _, auth in server.seen] == [
        ("GET", "Bearer secret-api-key") if command == "status" else ("POST", f"Bearer {TOKEN}")
    ]


def test_a_redirect_without_a_location_is_refused_too(
    servers: Callable[[], _Server], capsys: pytest.CaptureFixture[str]
) -> None:
    server = servers()
    server.answer(302)
    assert cli_main(_argv("status", server.url)) == 2
    assert "a redirect without a Location: not followed" in _one_clear_line(capsys.readouterr().err)


def test_the_installed_command_refuses_a_redirect(servers: Callable[[], _Server]) -> None:
    server, elsewhere = servers(), servers()
    # 302 to a POST: urllib turned it into a GET carrying the token to the other host.
    server.answer(302, Location=f"{elsewhere.url}/custom_patches/fair_share/rollback")
    script = Path(sys.executable).parent / "vllm-custom-patches"
    assert script.exists(), "the console script is installed with the package"
    done = subprocess.run(
        [str(script), *_argv("rollback", server.url)], capture_output=True, text=True, timeout=HANG_GUARD_S, check=False
    )
    assert elsewhere.seen == [] and [m for m, _, _ in server.seen] == ["POST"]
    assert done.returncode == 2
    _one_clear_line(done.stderr)
    assert f"a redirect to {elsewhere.url}/custom_patches/fair_share/rollback: not followed" in done.stderr


# -- item 9: every way an answer can be unusable is exit 2 with one line --------------------


class _RawServer:
    """A TCP server that is not HTTP: reads a request, then answers ``reply`` (None: says nothing)."""

    def __init__(self, reply: bytes | None, close: bool = True) -> None:
        self.reply = reply
        self.received = b""
        self.got_request = threading.Event()
        self.release = threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            conn.settimeout(HANG_GUARD_S)
            while not self._complete():
                chunk = conn.recv(65536)
                if not chunk:
                    break
                self.received += chunk
            self.got_request.set()
            if self.reply is None:
                self.release.wait(HANG_GUARD_S)  # hold the connection open, silent, until the test is done
            else:
                conn.sendall(self.reply)

    def _complete(self) -> bool:
        # The whole request, body included: closing with unread bytes would be a reset, not a close.
        head, found, body = self.received.partition(b"\r\n\r\n")
        length = next(
            (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0
        )
        return bool(found) and len(body) >= length

    def close(self) -> None:
        self.release.set()
        self.thread.join(HANG_GUARD_S)
        self.sock.close()


@pytest.fixture
def raw_server() -> Iterator[Callable[[bytes | None], _RawServer]]:
    made: list[_RawServer] = []

    def make(reply: bytes | None) -> _RawServer:
        made.append(_RawServer(reply))
        return made[-1]

    yield make
    for server in made:
        server.close()


@pytest.mark.parametrize(
    ("reply", "what"),
    [
        (b"SSH-2.0-OpenSSH_9.6\r\n", "the answer was not HTTP (BadStatusLine"),
        (b"HTTP/1.1 abc nonsense\r\n\r\n", "the answer was not HTTP (BadStatusLine"),
        (b"", "the connection was closed without an answer"),
    ],
)
@pytest.mark.parametrize("command", ["status", "rollback", "apply"])
def test_a_peer_that_does_not_answer_http(
    raw_server: Callable[[bytes | None], _RawServer],
    capsys: pytest.CaptureFixture[str],
    command: str,
    reply: bytes,
    what: str,
) -> None:
    server = raw_server(reply)
    assert cli_main(_argv(command, server.url, "--timeout", "30")) == 2
    err = _one_clear_line(capsys.readouterr().err)
    assert what in err and server.got_request.wait(HANG_GUARD_S)
    if command != "status":
        # The POST went out: whether the change was made is unknown, and the line says how to find out.
        assert server.received.startswith(f"POST /custom_patches/fair_share/{command} ".encode())
        assert f"the outcome is unknown; run 'vllm-custom-patches status --url {server.url}'" in err
    else:
        assert "outcome" not in err and "is this the server's address and port?" in err


@pytest.mark.parametrize("command", ["status", "rollback", "apply"])
def test_a_server_that_takes_the_request_and_never_answers(
    raw_server: Callable[[bytes | None], _RawServer], capsys: pytest.CaptureFixture[str], command: str
) -> None:
    server = raw_server(None)
    assert cli_main(_argv(command, server.url, "--timeout", "0.5")) == 2
    err = _one_clear_line(capsys.readouterr().err)
    assert server.got_request.wait(HANG_GUARD_S)  # the request did reach the server
    assert "no answer within 0.5 s" in err and "cannot reach" not in err
    if command == "status":
        assert "raise --timeout" in err
    else:
        assert server.received.startswith(b"POST ")
        assert "the server may have made the change, so the outcome is unknown" in err
        assert f"run 'vllm-custom-patches status --url {server.url}'" in err


def test_connection_refused_says_it_cannot_reach(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for command in ("status", "rollback"):
        assert cli_main(_argv(command, f"http://127.0.0.1:{port}")) == 2
        err = _one_clear_line(capsys.readouterr().err)
        assert "cannot reach" in err and "Connection refused" in err and "outcome" not in err


@pytest.mark.parametrize(
    ("url", "what"),
    [
        ("http://127.0.0.1:notaport", "is not a valid URL (Port could not be cast to integer value as 'notaport')"),
        ("http://[::1", "is not a valid URL (Invalid IPv6 URL)"),
        ("http://127.0.0.1:70000", "is not a valid URL (Port out of range"),
        ("http://", "names no host"),
        ("http://:8000", "names no host"),
        ("http://user:pw@127.0.0.1:8000", "carries credentials"),
        ("http://127.0.0.1:8000/?x=1", "has a query or fragment"),
        ("http://127.0.0.1:8000/a b", "contains spaces or control characters"),
        ("http://127.0.0.1:8000/\r\nX-Injected: 1", "contains spaces or control characters"),
        ("127.0.0.1:8000", "is not an http(s) URL"),
        ("ftp://127.0.0.1", "is not an http(s) URL"),
    ],
)
@pytest.mark.parametrize("command", ["status", "rollback"])
def test_a_malformed_url(capsys: pytest.CaptureFixture[str], command: str, url: str, what: str) -> None:
    assert cli_main(_argv(command, url)) == 2
    err = _one_clear_line(capsys.readouterr().err)
    assert f"--url {url!r} {what}" in err
    assert (
        "give the server's base address, e.g. http://127.0.0.1:8000" in err or "pass the API key with --api-key" in err
    )


@pytest.mark.parametrize("command", ["status", "rollback"])
def test_a_credential_a_header_cannot_carry(
    servers: Callable[[], _Server], capsys: pytest.CaptureFixture[str], command: str
) -> None:
    server = servers()
    option = "--api-key" if command == "status" else "--token"
    argv = _argv(command, server.url)
    argv[argv.index(option) + 1] = "abc\r\nX-Injected: 1" + "x" * 16
    assert cli_main(argv) == 2
    assert f"{option} contains characters an HTTP header cannot carry" in _one_clear_line(capsys.readouterr().err)
    assert server.seen == []


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon"])
def test_a_timeout_that_is_not_a_positive_number_is_refused_by_the_parser(
    capsys: pytest.CaptureFixture[str], value: str
) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli_main(["status", "--url", "http://127.0.0.1:8000", "--timeout", value])
    assert exit_.value.code == 2 and "is not a positive number of seconds" in capsys.readouterr().err


# -- answers of the wrong shape ----------------------------------------------------------------


def _process(role: str, applied: list[str], **extra: Any) -> dict[str, Any]:
    return {
        "role": role, "pid": 100, "host": "node-a", "dp_rank": None, "tp_rank": None, "pp_rank": None,
        "selection": ",".join(applied), "applied": applied,
        "patches": [{"name": n, "state": "applied", "reason": ""} for n in applied], "error": None, **extra,
    }  # fmt: skip


def _status_report() -> dict[str, Any]:
    """A real report with every part the printer reads: an inconsistency, an error, a change not undone."""
    report = analyse(
        [
            _process("engine_core", ["trace"], dp_rank=0),
            _process("engine_core", [], dp_rank=1),
            {**_process("worker", [], dp_rank=1), "error": "did not answer in time"},
        ]
    )
    left = {"action": "rollback", "patch": "trace", "op_id": "abc", "processes": ["engine_core dp_rank=1 pid=100"]}
    return {**report, "unsettled": [left]}


def _control_report(ok: bool) -> dict[str, Any]:
    processes = [
        {**_process("api_server", []), "ok": True, "changed": True, "relevant": True, "state": "available", "reverted": not ok},
        {**_process("engine_core", [], dp_rank=0), "ok": ok, "changed": False, "relevant": True, "state": "applied",
         "error": None if ok else "PatchConflictError: outside change", "undo_error": None},
    ]  # fmt: skip
    return {
        "ok": ok,
        "action": "rollback",
        "patch": "fair_share",
        "op_id": "abc",
        "elapsed_s": 0.01,
        "processes": processes,
    }


@pytest.mark.parametrize(
    ("report", "what"),
    [
        ({"processes": [1], "consistent": True}, "answer.processes[0] is not an object"),
        ({"processes": [], "consistent": "yes"}, "answer.consistent is str, not bool"),
        ({"processes": []}, "answer.consistent is missing"),
        ({"processes": [{"applied": "trace"}], "consistent": True}, "answer.processes[0].applied is not a list"),
        (
            {"processes": [{"applied": [["trace"]]}], "consistent": True},
            "answer.processes[0].applied[0] is list, not str",
        ),
        (
            {"processes": [{"patches": [{"state": "x"}]}], "consistent": True},
            "answer.processes[0].patches[0].name is missing",
        ),
        ({"processes": [], "consistent": False, "errors": [{"error": "x"}]}, "answer.errors[0].description is missing"),
        ({"processes": [], "consistent": False, "inconsistencies": {}}, "answer.inconsistencies is not a list"),
    ],
)
@pytest.mark.parametrize("as_json", [False, True])
def test_a_status_answer_of_the_wrong_shape(
    servers: Callable[[], _Server], capsys: pytest.CaptureFixture[str], report: dict[str, Any], what: str, as_json: bool
) -> None:
    server = servers()
    server.answer(200, json.dumps(report).encode())
    assert cli_main(_argv("status", server.url, *(["--json"] if as_json else []))) == 2
    captured = capsys.readouterr()
    assert f"answered JSON of an unexpected shape ({what})" in _one_clear_line(captured.err)
    assert captured.out == ""


@pytest.mark.parametrize(
    ("report", "what"),
    [
        ({"processes": [1], "ok": True, "action": "rollback", "patch": "p", "op_id": "o", "elapsed_s": 1}, "answer.processes[0] is not an object"),
        ({"processes": [], "ok": "yes", "action": "rollback", "patch": "p", "op_id": "o", "elapsed_s": 1}, "answer.ok is str, not bool"),
        ({"processes": [], "ok": True, "action": "rollback", "patch": "p", "op_id": "o"}, "answer.elapsed_s is missing"),
        ({"processes": [], "ok": True, "action": "rollback", "patch": "p", "op_id": "o", "elapsed_s": "1"}, "answer.elapsed_s is str, not a number"),
        ({"processes": [{"state": "applied"}], "ok": False, "action": "rollback", "patch": "p", "op_id": "o", "elapsed_s": 1}, "answer.processes[0].ok is missing"),
        ({"processes": [], "ok": True, "action": 1, "patch": "p", "op_id": "o", "elapsed_s": 1}, "answer.action is int, not str"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("code", [200, 409])
@pytest.mark.parametrize("command", ["rollback", "apply"])
def test_a_control_answer_of_the_wrong_shape(
    servers: Callable[[], _Server], capsys: pytest.CaptureFixture[str], command: str, code: int,
    report: dict[str, Any], what: str,
) -> None:  # fmt: skip
    server = servers()
    server.answer(code, json.dumps(report).encode())
    assert cli_main(_argv(command, server.url)) == 2
    err = _one_clear_line(capsys.readouterr().err)
    assert f"answered HTTP {code} with JSON of an unexpected shape ({what}), so the outcome is unknown" in err
    assert f"run 'vllm-custom-patches status --url {server.url}'" in err


@pytest.mark.parametrize("body", [b"[]", b'"ok"', b"{}", b'{"ok": true}', b"not json"])
def test_a_control_answer_of_200_without_a_report(
    servers: Callable[[], _Server], capsys: pytest.CaptureFixture[str], body: bytes
) -> None:
    server = servers()
    server.answer(200, body)
    assert cli_main(_argv("rollback", server.url)) == 2
    assert "without a report of each process, so the outcome is unknown" in _one_clear_line(capsys.readouterr().err)


_WRONG_VALUES: list[Any] = [None, 0, 2.5, True, "x", [], {}, [None], [{}], {"x": None}]


def _mutations(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Any]]:
    """Every (path, replacement) that puts a wrong value, or nothing, at one place of ``value``."""
    if path:
        for wrong in _WRONG_VALUES:
            yield path, wrong
        if isinstance(path[-1], str):
            yield path, _DELETE
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else []
    for key, child in children:
        yield from _mutations(child, (*path, key))


_DELETE = object()


def _mutated(report: dict[str, Any], path: tuple[Any, ...], wrong: Any) -> dict[str, Any]:
    result = copy.deepcopy(report)
    parent = result
    for key in path[:-1]:
        parent = parent[key]
    if wrong is _DELETE:
        del parent[path[-1]]
    else:
        parent[path[-1]] = copy.deepcopy(wrong)
    return result


@pytest.mark.parametrize(
    ("command", "report", "exit_codes"),
    [
        ("status", _status_report(), {0, 1}),
        ("rollback", _control_report(ok=True), {0}),
        ("rollback", _control_report(ok=False), {1, 3}),  # 3: a helper may mark an undo that failed
    ],
)
def test_no_wrong_value_anywhere_in_an_answer_makes_a_traceback_or_a_false_exit_code(
    servers: Callable[[], _Server], capsys: pytest.CaptureFixture[str], command: str, report: dict[str, Any],
    exit_codes: set[int],
) -> None:  # fmt: skip
    server = servers()
    tried = 0
    for path, wrong in _mutations(report):
        server.answer(200 if report.get("ok", True) else 409, json.dumps(_mutated(report, path, wrong)).encode())
        code = cli_main(_argv(command, server.url))
        captured = capsys.readouterr()
        where = f"{'.'.join(map(str, path))} = {'deleted' if wrong is _DELETE else wrong!r}"
        if code == 2:
            err = _one_clear_line(captured.err)
            assert "internal error" not in err, where
        else:
            # Still read as a report: then it was one the printer can show without failing.
            assert code in {0, 1, 3} and captured.err == "", where
        tried += 1
    assert tried > 100  # every part of the answer was tried
    server.answer(200 if report.get("ok", True) else 409, json.dumps(report).encode())
    assert cli_main(_argv(command, server.url)) in exit_codes  # the unmutated answer is read as such
