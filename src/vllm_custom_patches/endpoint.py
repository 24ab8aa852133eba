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
``outcome`` is ``inconsistent`` and names them).  With ``"dp_ranks": [...]``
in the body the change is made in the engine cores and workers of those
data-parallel ranks only (a canary, with its rollout record, ``_rollouts``);
``POST /custom_patches/{name}/promote`` then applies it everywhere.  Those
routes exist only when ``VLLM_CUSTOM_PATCHES_CONTROL_TOKEN`` is set in the
server's environment (at least 16 printable ASCII characters, no spaces), and
require ``Authorization: Bearer <that token>``: 403 without it or with another
(before the body is read), 404 for an unknown patch (listing the known ones),
422 for a body that is not a JSON object of the action's fields (``reason``;
for apply ``dp_ranks``, ``guards``, ``window_s``; for rollback ``dp_ranks``),
naming what is wrong, or for a rank no engine core has; none of these changes
anything.
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
from dataclasses import dataclass
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
    read_metrics: "Callable[[], str] | None" = None
    """vLLM's metrics text for a canary's start reading; None: this API server's, as ``/metrics`` serves it."""

    def __init__(self, clock: "Callable[[], float]" = time.monotonic) -> None:
        from ._ops.epoch import ChangeEpoch
        from ._ops.fleet import SharedCollection

        self._engine_client: Any = None
        self._epoch = ChangeEpoch(None)  # the server's address, which names it, comes with init_state
        self._status = SharedCollection(self._collect, clock=clock, epoch=self._read_epoch)
        self._api_key_hashes: list[bytes] = []
        self._refresher: asyncio.Task[None] | None = None
        self._control_token_hash: bytes | None = None

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

            @router.post(
                CONTROL_ROUTE,
                summary="vllm-custom-patches: roll a patch back, apply it or promote its canary (every process, "
                "or the chosen data-parallel ranks)",
            )
            async def custom_patches_control(name: str, action: str, request: Request) -> JSONResponse:
                status, body = await self._control(name, action, request)
                return JSONResponse(body, status_code=status)

        app.include_router(router)

    async def init_state(self, engine_client: Any, state: "State", args: Namespace) -> None:
        from ._ops.epoch import ChangeEpoch
        from ._ops.switch import share_unsettled

        self._engine_client = engine_client
        # Shared with the server's other API servers (vLLM may start several): a change made through
        # any of them makes every one collect afresh.
        self._epoch = ChangeEpoch.for_server(args)
        share_unsettled(self._epoch.path)  # and what an inconsistent change left, whichever made it
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
        from ._ops.fleet import engine_ranks
        from ._ops.guards import GuardError, parse_guards
        from ._ops.switch import HTTP_STATUS, control, known_patches, one_at_a_time, summary

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
        if action not in CONTROL_ACTIONS:
            return 404, {"error": f"unknown action {action!r}; use one of: {', '.join(CONTROL_ACTIONS)}"}
        body, problem = _parse_body(await request.body(), action)
        if problem is None:
            known = known_patches()
            if name not in known:
                logger.warning("vllm-custom-patches control: %s of unknown patch %r from %s refused", action, name, who)
                return 404, {"error": f"no patch named {name!r}", "known": known}
            problem = _unknown_ranks(body.dp_ranks, engine_ranks(self._engine_client))
        guards: list[str] = []
        if problem is None and body.guards:
            try:
                guards = [guard.text for guard in parse_guards(body.guards)]
            except GuardError as exc:
                problem = str(exc)
        if problem:
            logger.warning("vllm-custom-patches control: %s of %r from %s refused: %s", action, name, who, problem)
            return 422, {"error": problem}
        reason = body.reason
        requester = f"{who}" + (f" ({reason})" if reason else "")
        where = f" on dp ranks {body.dp_ranks}" if body.dp_ranks is not None else ""
        async with one_at_a_time():  # one change at a time (a guard's included); the next waits
            logger.warning(
                "vllm-custom-patches control: %s of patch %r%s requested by %s", action, name, where, requester
            )
            try:
                ranks = body.dp_ranks or []
                report = await control(
                    self._engine_client, action, name, who,
                    reason=reason, dp_ranks=body.dp_ranks, guards=guards, window_s=body.window_s,
                    start_reading=lambda: self._start_reading(name, ranks),
                )  # fmt: skip
            finally:
                self._epoch.advance()  # before the answer: no API server of this server serves an older view
            logger.warning("vllm-custom-patches control: %s", summary(report))
            try:
                await self._status.refresh()  # the status route and the metric show the new state at once
            except Exception:
                logger.warning("vllm-custom-patches: refreshing the status after a change failed", exc_info=True)
        rollout = report.get("rollout")
        if report["ok"] and action == "apply" and rollout and rollout["guards"]:  # a canary began, with guards
            self._watch(rollout)
        return HTTP_STATUS[report["outcome"]], report

    async def _start_reading(self, name: str, dp_ranks: "list[int]") -> "dict[str, Any] | None":
        """vLLM's metrics and the patch's telemetry on ``dp_ranks`` now, as a canary of ``name`` begins (the
        rollout record keeps it as ``at_start``: ``compare`` and the guards measure its life from it)."""
        from ._core.log import logger
        from ._ops.figures import Reading, telemetry_of
        from ._ops.fleet import collect
        from ._ops.vllm_metrics import parse, read_local

        try:
            status = await collect(self._engine_client)
            at = time.time()  # the clock the guardian and compare read
            text = await asyncio.to_thread(self.read_metrics or read_local)
            return Reading(parse(text, at), telemetry_of(status["processes"], name, dp_ranks)).to_json()
        except Exception as exc:  # the canary goes ahead; compare then needs --window
            logger.warning(
                "vllm-custom-patches: the canary of %r keeps no reading of its start (%s: %s); compare it with --window",
                name, type(exc).__name__, exc,
            )  # fmt: skip
            return None

    def _watch(self, rollout: "dict[str, Any]") -> None:
        """Have the guardian (``_ops.guardian``) watch a canary's guards from this API server."""
        from ._core.log import logger
        from ._ops.guardian import watch

        async def end(engine_client: Any, patch: str, figures: "dict[str, Any]", reason: str) -> "dict[str, Any]":
            # Only this rollout: a guard whose canary was ended (and another begun) ends nothing.
            return await self._end_by_guard(patch, figures, reason, rollout["id"])

        try:
            # The status route's shared collection: the guardian's reads cost the engine cores nothing more.
            watch(self._engine_client, rollout, end=end, read_status=self._status.get)
        except Exception:  # the rollout stands; its guards are not watched, and the log says so
            logger.error(
                "vllm-custom-patches: the guards of rollout %s of %r are NOT watched: starting the guardian failed",
                rollout["id"], rollout["patch"], exc_info=True,
            )  # fmt: skip

    async def _end_by_guard(
        self, name: str, figures: "dict[str, Any]", reason: str, rollout_id: "str | None" = None
    ) -> "dict[str, Any]":
        """The guardian's way to roll a canary back: serialized with the control routes, shown at once, logged."""
        from ._core.log import logger
        from ._ops.switch import end_by_guard, one_at_a_time, summary

        async with one_at_a_time():
            try:
                report = await end_by_guard(self._engine_client, name, figures, reason, rollout_id=rollout_id)
            finally:
                self._epoch.advance()
            logger.warning("vllm-custom-patches guard: %s", summary(report))
            try:
                await self._status.refresh()
            except Exception:
                logger.warning("vllm-custom-patches: refreshing the status after a change failed", exc_info=True)
        return report

    def _read_epoch(self) -> str:
        return self._epoch.read()  # the epoch of the address init_state was given, once it was

    async def _collect(self) -> "dict[str, Any]":
        from ._ops.fleet import collect
        from ._ops.metrics import publish
        from ._ops.switch import note_unsettled

        # What a failed undo left (several roles out of step) is the API server's to tell.
        report = note_unsettled(await collect(self._engine_client))
        publish(report, self._engine_client)  # this API server's index: who publishes engine counters
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
        "vllm-custom-patches: %s is set: POST %s/{name}/rollback, /apply and /promote change patches in every "
        "process of this server (or on chosen data-parallel ranks) for whoever holds that token",
        ENV_CONTROL_TOKEN,
        ROUTE,
    )
    return hashlib.sha256(token.encode()).digest()


CONTROL_ACTIONS = ("rollback", "apply", "promote")
_FIELDS = {
    "apply": ("reason", "dp_ranks", "guards", "window_s"),
    "rollback": ("reason", "dp_ranks"),
    "promote": ("reason",),
}
"""The body fields each control action takes."""


@dataclass
class _Body:
    """A control request's body, checked."""

    reason: str = ""
    dp_ranks: "list[int] | None" = None
    guards: "list[Any] | None" = None
    """As sent: ``_ops.guards.parse_guards`` checks them."""
    window_s: "float | None" = None


def _parse_body(raw: bytes, action: str = "apply") -> "tuple[_Body, str | None]":
    """The optional body of a control request, e.g. ``{"reason": "...", "dp_ranks": [1]}``; returns (body, problem)."""
    import json

    from ._ops.rollouts import check_dp_ranks, check_window

    if not raw.strip():
        return _Body(), None
    try:
        body = json.loads(raw)
    except ValueError as exc:
        return _Body(), f'the body is not JSON ({exc}); send none, or a JSON object such as {{"reason": "..."}}'
    if not isinstance(body, dict):
        return _Body(), f'the body must be a JSON object such as {{"reason": "..."}}, not {type(body).__name__}'
    fields = _FIELDS.get(action, ("reason",))
    unknown = sorted(set(body) - set(fields))
    if unknown:
        problem = (
            f"unknown field(s) {', '.join(map(repr, unknown))} in the body of {action}; "
            f"its fields are {', '.join(map(repr, fields))}"
        )
        if {"tp_ranks", "pp_ranks"} & set(unknown):
            problem += (
                "; a canary is chosen by data-parallel rank only: the tensor- and pipeline-parallel workers of "
                "one rank must run the same code"
            )
        return _Body(), problem
    reason = body.get("reason", "")
    if not isinstance(reason, str) or len(reason) > 500:
        return _Body(), "'reason' must be a string of at most 500 characters"
    parsed = _Body(reason=_printable(reason))
    try:
        if "dp_ranks" in body:
            parsed.dp_ranks = check_dp_ranks(body["dp_ranks"])
        if "window_s" in body:
            parsed.window_s = check_window(body["window_s"])
    except ValueError as exc:
        return _Body(), str(exc)
    if "guards" in body:
        if not isinstance(body["guards"], list):
            return _Body(), '\'guards\' must be a list of strings such as ["ttft_p99<=1.2x", "errors==0"]'
        parsed.guards = body["guards"]
    if parsed.guards and parsed.dp_ranks is None:
        return _Body(), "'guards' watch a canary: give 'dp_ranks' too (the ranks to apply the patch on)"
    if parsed.window_s is not None and not parsed.guards:
        return (
            _Body(),
            "'window_s' is how long a guard must be broken before it rolls the canary back: give 'guards' too",
        )
    return parsed, None


def _unknown_ranks(dp_ranks: "list[int] | None", ranks: "list[int]") -> "str | None":
    """Why ``dp_ranks`` cannot be used on a server whose engine cores have ``ranks``, or None."""
    if dp_ranks is None:
        return None
    missing = [rank for rank in dp_ranks if rank not in ranks]
    if not missing:
        return None
    have = f"this server's engine cores have dp ranks {ranks}" if ranks else "this server has no engine core to reach"
    return f"no engine core has dp rank(s) {missing}; {have}"


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
