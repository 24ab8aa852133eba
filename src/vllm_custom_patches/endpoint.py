"""The vLLM endpoint plugin: ``GET /custom_patches``, every process's patches, live.

Registered under ``vllm.endpoint_plugins`` with the name ``custom_patches``,
the same name as the general plugin, so ``VLLM_PLUGINS=custom_patches`` turns
on both (vLLM loads endpoint plugins only when ``VLLM_PLUGINS`` names them).

The route answers JSON with one entry per live process of the server: this
API server, every engine core of every data-parallel rank (on every node) and
every worker of every rank (see ``_fleet`` and ``_agent``), plus
``consistent``: false when a patch is applied in some processes of a role and
not in others, or a process could not answer.  It only reads.  When the
server has an API key (``--api-key`` or ``VLLM_API_KEY``) the route requires
it as ``Authorization: Bearer <key>``, like vLLM's ``/v1`` routes (vLLM's own
middleware guards only those).

The same facts go to vLLM's ``/metrics`` as ``vllm_custom_patches_applied``
(see ``_metrics``), refreshed every :data:`REFRESH_S` seconds and on each
request of the route.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the route's
# annotations at run time, and ``Request`` is imported where the route is made.
import asyncio
import hashlib
import hmac
import os
from argparse import Namespace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import FastAPI
    from starlette.datastructures import State

__all__ = ["ROUTE", "CustomPatchesEndpoint"]

ROUTE = "/custom_patches"
REFRESH_S = 15.0
"""How often the metric's view of the server is refreshed in the background."""


class CustomPatchesEndpoint:
    """vLLM's ``EndpointPlugin`` protocol (``vllm/plugins/endpoint_plugins/interface.py``)."""

    name = "custom_patches"
    required_tasks = None  # every server, generate or pooling; a render server has no engine

    def __init__(self) -> None:
        self._engine_client: Any = None
        self._api_key_hashes: list[bytes] = []
        self._refresher: "asyncio.Task[None] | None" = None

    def attach_router(self, app: "FastAPI") -> None:
        from fastapi import APIRouter, Request
        from fastapi.responses import JSONResponse

        router = APIRouter()

        @router.get(ROUTE, include_in_schema=True, summary="vllm-custom-patches: the patches of every process")
        async def custom_patches_status(request: Request) -> JSONResponse:
            if not self._authorized(request.headers.get("Authorization")):
                return JSONResponse({"error": "Unauthorized"}, status_code=401)
            return JSONResponse(await self._collect())

        app.include_router(router)

    async def init_state(self, engine_client: Any, state: "State", args: Namespace) -> None:
        self._engine_client = engine_client
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
        # Compare with every key, in constant time, as vLLM's middleware does.
        return any([hmac.compare_digest(digest, known) for known in self._api_key_hashes])

    async def _collect(self) -> "dict[str, Any]":
        from ._fleet import collect
        from ._metrics import publish

        report = await collect(self._engine_client)
        publish(report)
        return report

    async def _refresh_forever(self) -> None:
        from ._log import logger

        while True:
            try:
                await self._collect()
            except asyncio.CancelledError:
                raise
            except Exception:  # the metric goes stale; the server must not notice
                logger.warning("vllm-custom-patches: refreshing the patch status failed", exc_info=True)
            await asyncio.sleep(REFRESH_S)
