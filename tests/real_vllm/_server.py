"""HTTP helpers for the tests that talk to a running ``vllm serve``: the status, the kill switch, completions.

Shared by the modules that start one server each (``test_vllm_control``,
``test_vllm_control_hardening``); never imports vLLM.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any, Protocol

__all__ = ["HttpServer", "complete", "control", "request", "states", "status"]


class HttpServer(Protocol):
    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""

    @property
    def model(self) -> str:
        """The model name the server serves."""


def request(url: str, *, data: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """GET (or POST ``data``) ``url``: the status code and the JSON answer (the raw bytes if it is not JSON)."""
    req = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=120) as response:
            code, body = response.status, response.read()
    except urllib.error.HTTPError as exc:
        code, body = exc.code, exc.read()
    try:
        return code, json.loads(body)
    except ValueError:
        return code, body


def control(server: HttpServer, action: str, name: str, *, token: str | None, body: bytes = b"{}") -> tuple[int, Any]:
    """``POST /custom_patches/NAME/ACTION`` with ``token`` as the bearer token (no header if None)."""
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return request(f"{server.url}/custom_patches/{name}/{action}", data=body, headers=headers)


def status(server: HttpServer) -> dict[str, Any]:
    """``GET /custom_patches``, which must answer 200."""
    code, report = request(f"{server.url}/custom_patches")
    assert code == 200, report
    assert isinstance(report, dict)
    return report


def states(server: HttpServer, name: str) -> dict[tuple[str, int | None], str]:
    """(role, tp_rank) -> the patch's state there."""
    return {
        (p["role"], p["tp_rank"]): next((q["state"] for q in p["patches"] if q["name"] == name), "-")
        for p in status(server)["processes"]
    }


def complete(server: HttpServer, prompt: list[int], max_tokens: int) -> list[int]:
    """A greedy completion of ``prompt`` (token ids), which must answer 200; its output token ids."""
    body = json.dumps({"model": server.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "ignore_eos": True, "return_token_ids": True}).encode()  # fmt: skip
    code, answer = request(f"{server.url}/v1/completions", data=body, headers={"Content-Type": "application/json"})
    assert code == 200, answer
    return list(answer["choices"][0]["token_ids"])
