"""The kill switch's secret: checking the control token, and signing each per-process step with it.

``VLLM_CUSTOM_PATCHES_CONTROL_TOKEN`` enables the kill switch and is the
bearer token of its HTTP routes (``endpoint``).  It also authenticates the
step each process of the server runs (``_control``): vLLM lets anyone reach a
worker's methods by name when ``VLLM_SERVER_DEV_MODE=1`` (``POST
/collective_rpc``), so the per-process method must not trust whoever calls
it.  The API server signs every operation (action, patch, operation id,
requester, time issued) with HMAC-SHA256 under a key derived from the token;
every process of the server inherits the token through its environment (the
API server starts the engine cores, they start the workers; other nodes need
the same value, as they need every other setting), derives the same key and
refuses a call whose signature is missing or wrong, that was issued more than
:data:`MAX_AGE_S` away from its own clock, or that it has already run.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import time
from collections.abc import Mapping

from .._core.forksafe import ForkSafeLock
from .._env import ENV_CONTROL_TOKEN

__all__ = [
    "MAX_AGE_S", "MIN_TOKEN_LENGTH", "Replays", "control_token", "sign", "sign_with_payload", "token_problem", "verify",
]  # fmt: skip

MIN_TOKEN_LENGTH = 16
MAX_AGE_S = 300
"""How far from a process's clock an operation's time of issue may be (nodes' clocks differ a little)."""
_DOMAIN = b"vllm-custom-patches control v1"
"""Separates this key from any other use of the token (e.g. its hash, compared by the endpoint)."""


def token_problem(token: str) -> str | None:
    """Why ``token`` cannot serve as the control token, or None.

    Printable ASCII without spaces: an HTTP header carries bytes, and a
    non-ASCII token would match only one of the encodings a client may send.
    The message never repeats the token (it is a secret).
    """
    if not token.strip():
        return "it is empty"
    for position, char in enumerate(token):
        if not "!" <= char <= "~":
            what = "a space" if char == " " else "a non-ASCII character" if ord(char) > 127 else "a control character"
            return f"it contains {what} at position {position + 1}; use printable ASCII characters only, no spaces"
    if len(token) < MIN_TOKEN_LENGTH:
        return f"it has {len(token)} characters; use at least {MIN_TOKEN_LENGTH}"
    return None


def control_token(environ: Mapping[str, str] | None = None) -> str | None:
    """The control token from the environment if set and usable; None means the kill switch is off here."""
    token = (os.environ if environ is None else environ).get(ENV_CONTROL_TOKEN)
    if token is None or token_problem(token) is not None:
        return None
    return token


def _key(token: str) -> bytes:
    return hmac.new(token.encode("ascii"), _DOMAIN, hashlib.sha256).digest()


def _message(action: str, name: str, op_id: str, who: str, issued: str, payload: str | None = None) -> bytes:
    # A JSON list: unambiguous whatever the fields contain (a step with a payload is a longer list, so
    # it never verifies as one without, nor the reverse).
    fields = [_DOMAIN.decode(), action, name, op_id, who, issued, *([] if payload is None else [payload])]
    return json.dumps(fields, separators=(",", ":")).encode()


def sign(action: str, name: str, op_id: str, who: str) -> tuple[str, str, str, str, str, str]:
    """The arguments of one signed per-process step: ``(action, name, op_id, who, issued, mac)``.

    Raises :class:`RuntimeError` if the kill switch is off in this process.
    """
    token = _signing_token()
    issued = str(int(time.time()))
    mac = hmac.new(_key(token), _message(action, name, op_id, who, issued), hashlib.sha256).hexdigest()
    return action, name, op_id, who, issued, mac


def sign_with_payload(
    action: str, name: str, op_id: str, who: str, payload: str
) -> tuple[str, str, str, str, str, str, str]:
    """A signed step that carries data (a rollout record, ``_rollouts``): ``(action, name, op_id, who, issued, mac,
    payload)``, the payload under the signature too.  Only :func:`verify` with ``with_payload`` accepts it."""
    token = _signing_token()
    issued = str(int(time.time()))
    mac = hmac.new(_key(token), _message(action, name, op_id, who, issued, payload), hashlib.sha256).hexdigest()
    return action, name, op_id, who, issued, mac, payload


def _signing_token() -> str:
    token = control_token()
    if token is None:
        raise RuntimeError(f"{ENV_CONTROL_TOKEN} is not set (or unusable) in this process: the kill switch is off")
    return token


class Replays:
    """The operations this process has accepted, for :data:`MAX_AGE_S`: each is accepted once.

    Older ones need no memory: their time of issue refuses them.
    """

    def __init__(self) -> None:
        self._lock = ForkSafeLock()  # vLLM forks its workers; a lock held then must not stay held
        self._seen: dict[tuple[str, ...], int] = {}

    def first_time(self, key: tuple[str, ...], issued: int, now: float) -> bool:
        with self._lock:
            for old in [k for k, at in self._seen.items() if at < now - MAX_AGE_S]:
                del self._seen[old]
            if key in self._seen:
                return False
            self._seen[key] = issued
            return True


def verify(args: tuple[object, ...], scope: str, replays: Replays, *, with_payload: bool = False) -> str | None:
    """Why the step ``args`` (from :func:`sign`, or :func:`sign_with_payload` if ``with_payload``) must be
    refused in this process, or None if it is authentic.

    ``scope`` names the part of this process that runs it (an engine core and
    its worker can share one process, and each runs the operation once).
    """
    if len(args) != 6 + with_payload or not all(isinstance(arg, str) for arg in args):
        return "not a signed kill-switch operation (it must come from this server's control route)"
    action, name, op_id, who, issued, mac = (str(arg) for arg in args[:6])
    payload = str(args[6]) if with_payload else None
    token = control_token()
    if token is None:
        return f"the kill switch is off in this process ({ENV_CONTROL_TOKEN} is not set or unusable here)"
    expected = hmac.new(_key(token), _message(action, name, op_id, who, issued, payload), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected.encode(), mac.encode("utf-8", "replace")):
        return (
            f"bad signature: not signed with this process's {ENV_CONTROL_TOKEN} (it must come from this server's "
            "control route, and every node of the server needs the same token)"
        )
    now = time.time()
    if not issued.isdigit() or abs(now - int(issued)) > MAX_AGE_S:
        return (
            f"issued at {issued} by the API server's clock, more than {MAX_AGE_S} s from this process's "
            f"({int(now)}): a replay, or clocks out of step (synchronise the nodes' clocks)"
        )
    if not replays.first_time((scope, action, op_id), int(issued), now):
        return f"operation {op_id} was already run here (a replay)"
    return None
