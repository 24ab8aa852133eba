"""The vLLM endpoint plugin: ``GET /custom_patches``, every process's patches, live.

Registered under ``vllm.endpoint_plugins`` with the name ``custom_patches``,
the same name as the general plugin, so ``VLLM_PLUGINS=custom_patches`` turns
on both (vLLM loads endpoint plugins only when ``VLLM_PLUGINS`` names them).

The route answers JSON with one entry per live process of the server: this
API server, every engine core of every data-parallel rank (on every node) and
every worker of every rank (see ``_fleet`` and ``_agent``), plus
``consistent``: false when a patch is applied in some processes of a role and
not in others, or a process could not answer.  It only reads, and costs the
engines the same however often it is asked: concurrent requests share one
collection, and a view up to about a second old (its ``age_s``) answers the
next ones (``_fleet.SharedCollection``); a kill-switch change collects afresh
at once, in every API server of the server (``_ops.epoch``).  When the
server has an API key (``--api-key`` or ``VLLM_API_KEY``) the route requires
it as ``Authorization: Bearer <key>``, like vLLM's ``/v1`` routes (vLLM's own
middleware guards only those).

The same facts go to vLLM's ``/metrics`` as ``vllm_custom_patches_applied``
(see ``_metrics``), refreshed every :data:`REFRESH_S` seconds and with each
collection the route makes.

The kill switch, ``POST /custom_patches/{name}/rollback`` and
``POST /custom_patches/{name}/apply``, changes a patch in every process of the
running server, or in none (``_switch``): 200 done, 409 refused and undone
everywhere, 500 when some process could not be put back (the report's
``outcome`` is ``inconsistent`` and names them).  Those routes exist only when
``VLLM_CUSTOM_PATCHES_CONTROL_TOKEN`` is set in the server's environment (at
least 16 printable ASCII characters, no spaces), and require
``Authorization: Bearer <that token>``: 403 without it or with another, 404
for an unknown patch (listing the known ones), 422 for a body that is not a
JSON object with at most a string ``reason``; none of these changes anything.
Every request, refused or not, is logged in vLLM's log with the client's
address (and the reason given, control characters escaped); one change at a
time.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the route's
# annotations at run time, and ``Request`` is imported where the route is made.
import asyncio
import hashlib
import hmac
import os
import time
from argparse import Namespace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

    from fastapi import FastAPI
    from starlette.datastructures import State

__all__ = ["ROUTE", "CustomPatchesEndpoint"]

ROUTE = "/custom_patches"
CONTROL_ROUTE = ROUTE + "/{name}/{action}"
REFRESH_S = 15.0
"""How often the metric's view of the server is refreshed in the background."""


class CustomPatchesEndpoint:
    """vLLM's ``EndpointPlugin`` protocol (``vllm/plugins/endpoint_plugins/interface.py``)."""

    name = "custom_patches"
    required_tasks = None  # every server, generate or pooling; a render server has no engine

    def __init__(self, clock: "Callable[[], float]" = time.monotonic) -> None:
        from ._ops.epoch import ChangeEpoch
        from ._ops.fleet import SharedCollection

        self._engine_client: Any = None
        self._epoch = ChangeEpoch(None)  # the server's address, which names it, comes with init_state
        self._status = SharedCollection(self._collect, clock=clock, epoch=self._read_epoch)
        self._api_key_hashes: list[bytes] = []
        self._refresher: asyncio.Task[None] | None = None
        self._control_token_hash: bytes | None = None
        self._control_lock: asyncio.Lock | None = None

    def attach_router(self, app: "FastAPI") -> None:
        from fastapi import APIRouter, Request
        from fastapi.responses import JSONResponse

        router = APIRouter()

        @router.get(ROUTE, include_in_schema=True, summary="vllm-custom-patches: the patches of every process")
        async def custom_patches_status(request: Request) -> JSONResponse:
            if not self._authorized(request.headers.get("Authorization")):
                return JSONResponse({"error": "Unauthorized"}, status_code=401)
            return JSONResponse(await self._status.get())

        self._control_token_hash = _control_token_hash()
        if self._control_token_hash is not None:

            @router.post(CONTROL_ROUTE, summary="vllm-custom-patches: roll a patch back or apply it in every process")
            async def custom_patches_control(name: str, action: str, request: Request) -> JSONResponse:
                status, body = await self._control(name, action, request)
                return JSONResponse(body, status_code=status)

        app.include_router(router)

    async def init_state(self, engine_client: Any, state: "State", args: Namespace) -> None:
        from ._ops.epoch import ChangeEpoch

        self._engine_client = engine_client
        # Shared with the server's other API servers (vLLM may start several): a change made through
        # any of them makes every one collect afresh.
        self._epoch = ChangeEpoch.for_server(args)
        keys = [key for key in (getattr(args, "api_key", None) or [os.environ.get("VLLM_API_KEY")]) if key]
        self._api_key_hashes = [hashlib.sha256(key.encode()).digest() for key in keys]
        self._refresher = asyncio.get_running_loop().create_task(self._refresh_forever())

    def _authorized(self, header: "str | None") -> bool:
        if not self._api_key_hashes:
            return True
        scheme, _, token = (header or "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        digest = hashlib.sha256(token.encode()).digest()
        # Compare with every key, in constant time, as vLLM's middleware does: a list, not a
        # generator, so that any() cannot stop at the first match and tell which key it was.
        matches = [hmac.compare_digest(digest, known) for known in self._api_key_hashes]
        return any(matches)

    async def _control(self, name: str, action: str, request: Any) -> "tuple[int, dict[str, Any]]":
        from ._core.log import logger
        from ._ops.control import ACTIONS
        from ._ops.switch import HTTP_STATUS, change, known_patches, summary

        client = request.client
        who = f"{client.host}:{client.port}" if client else "unknown client"
        header = request.headers.get("Authorization") or ""
        scheme, _, token = header.partition(" ")
        expected = self._control_token_hash
        if (
            expected is None
            or scheme.lower() != "bearer"
            or not hmac.compare_digest(hashlib.sha256(token.encode()).digest(), expected)
        ):
            logger.warning(
                "vllm-custom-patches control: %s of %r from %s refused: %s",
                action, name, who, "no bearer token" if not header else "wrong token",
            )  # fmt: skip
            return 403, {"error": "Forbidden: send Authorization: Bearer <VLLM_CUSTOM_PATCHES_CONTROL_TOKEN>"}
        if action not in ACTIONS:
            return 404, {"error": f"unknown action {action!r}; use one of: {', '.join(ACTIONS)}"}
        reason, problem = _parse_body(await request.body())
        if problem:
            logger.warning("vllm-custom-patches control: %s of %r from %s refused: %s", action, name, who, problem)
            return 422, {"error": problem}
        known = known_patches()
        if name not in known:
            logger.warning("vllm-custom-patches control: %s of unknown patch %r from %s refused", action, name, who)
            return 404, {"error": f"no patch named {name!r}", "known": known}
        if self._control_lock is None:
            self._control_lock = asyncio.Lock()
        requester = f"{who}" + (f" ({reason})" if reason else "")
        async with self._control_lock:  # one change at a time; the next waits
            logger.warning("vllm-custom-patches control: %s of patch %r requested by %s", action, name, requester)
            try:
                report = await change(self._engine_client, action, name, requester)
            finally:
                self._epoch.advance()  # before the answer: no API server of this server serves an older view
            logger.warning("vllm-custom-patches control: %s", summary(report))
            try:
                await self._status.refresh()  # the status route and the metric show the new state at once
            except Exception:
                logger.warning("vllm-custom-patches: refreshing the status after a change failed", exc_info=True)
        return HTTP_STATUS[report["outcome"]], report

    def _read_epoch(self) -> str:
        return self._epoch.read()  # the epoch of the address init_state was given, once it was

    async def _collect(self) -> "dict[str, Any]":
        from ._ops.fleet import collect
        from ._ops.metrics import publish
        from ._ops.switch import note_unsettled

        # What a failed undo left (several roles out of step) is the API server's to tell.
        report = note_unsettled(await collect(self._engine_client))
        publish(report)
        return report

    async def _refresh_forever(self) -> None:
        from ._core.log import logger

        while True:
            try:
                await self._status.get()
            except asyncio.CancelledError:
                raise
            except Exception:  # the metric goes stale; the server must not notice
                logger.warning("vllm-custom-patches: refreshing the patch status failed", exc_info=True)
            await asyncio.sleep(REFRESH_S)


def _control_token_hash() -> "bytes | None":
    """The control token's hash, or None (the routes are not made) if it is unset or unusable."""
    from ._core.log import logger
    from ._env import ENV_CONTROL_TOKEN
    from ._ops.auth import MIN_TOKEN_LENGTH, token_problem

    token = os.environ.get(ENV_CONTROL_TOKEN)
    if token is None or not token.strip():
        return None
    problem = token_problem(token)
    if problem is not None:
        # Not the routes with a token a client can send in only one of several encodings, or not at all.
        logger.error(
            "vllm-custom-patches: %s is set but unusable: %s (it must be at least %d printable ASCII characters, "
            "no spaces); the control routes are disabled. Set it to a long random secret, e.g. $(openssl rand -hex 32).",
            ENV_CONTROL_TOKEN,
            problem,
            MIN_TOKEN_LENGTH,
        )
        return None
    from ._core.log import route_to_vllm_handler

    route_to_vllm_handler()
    logger.warning(
        "vllm-custom-patches: %s is set: POST %s/{name}/rollback and /apply change patches in every process "
        "of this server for whoever holds that token",
        ENV_CONTROL_TOKEN,
        ROUTE,
    )
    return hashlib.sha256(token.encode()).digest()


def _parse_body(raw: bytes) -> "tuple[str, str | None]":
    """The optional body: ``{"reason": "..."}``; returns (reason, problem)."""
    import json

    if not raw.strip():
        return "", None
    try:
        body = json.loads(raw)
    except ValueError as exc:
        return "", f'the body is not JSON ({exc}); send none, or a JSON object such as {{"reason": "..."}}'
    if not isinstance(body, dict):
        return "", f'the body must be a JSON object such as {{"reason": "..."}}, not {type(body).__name__}'
    unknown = sorted(set(body) - {"reason"})
    if unknown:
        return "", f"unknown field(s) {', '.join(map(repr, unknown))} in the body; the only one is 'reason'"
    reason = body.get("reason", "")
    if not isinstance(reason, str) or len(reason) > 500:
        return "", "'reason' must be a string of at most 500 characters"
    return _printable(reason), None


def _printable(text: str) -> str:
    """``text`` safe for one log line in every process: line breaks as spaces, other control
    and format characters (terminal escapes, ``\\r``, bidirectional overrides) escaped."""
    import unicodedata

    out = []
    for char in text:
        if char in "\n\r\t\v\f\x85\u2028\u2029":
            out.append(" ")
        elif unicodedata.category(char) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"):
            out.append(ascii(char)[1:-1])
        else:
            out.append(char)
    return "".join(out)
