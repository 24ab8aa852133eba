"""The change epoch that the API servers of one vLLM server share, so that none serves a view from before a change.

vLLM can start several API server processes for one server, all answering
on its one address (``--api-server-count``; by default one per
data-parallel rank with ``--data-parallel-size N``).  Each keeps its own
status view (``fleet.SharedCollection``), and a kill-switch change goes
through one of them, which collects afresh; without this epoch the others
would go on serving, for up to a second, a view collected before the change.

The epoch is a small file named after the server's address, next to vLLM's
own sockets (``VLLM_RPC_BASE_PATH``): the API server that made a change
rewrites it before it answers, and every API server reads it before it
reuses a view or joins a collection in flight (``SharedCollection``'s
``epoch``).  Its content is only compared, never trusted.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any

__all__ = ["ChangeEpoch"]


class ChangeEpoch:
    """One server's change epoch: :meth:`read` answers something new after every :meth:`advance`, in any API server."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        """The file; None where the server's address is unknown (only this process then knows of its changes)."""
        self._unreadable_logged = False

    @classmethod
    def for_server(cls, args: Any) -> ChangeEpoch:
        """The epoch of the server ``args`` (vLLM's parsed ``vllm serve`` arguments) describes.

        Every API server of one server has the same address, and no other
        server on this host has it while this one runs.
        """
        uds, host, port = (getattr(args, key, None) for key in ("uds", "host", "port"))
        if uds is None and port is None:
            return cls(None)
        address = f"unix:{uds}" if uds else f"{host or ''}:{port}"
        digest = hashlib.sha256(address.encode()).hexdigest()[:16]
        base = Path(os.environ.get("VLLM_RPC_BASE_PATH") or tempfile.gettempdir())
        return cls(base / f"vllm-custom-patches-{os.getuid()}-{digest}.epoch")

    def read(self) -> str:
        """The epoch now: the last mark any API server wrote ("" before the first change)."""
        if self.path is None:
            return ""
        try:
            # Not following a link, not waiting on a FIFO: whatever stands there, the answer comes at once.
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            try:
                return os.read(fd, 64).decode("ascii", errors="replace")
            finally:
                os.close(fd)
        except FileNotFoundError:
            return ""
        except OSError as exc:
            if not self._unreadable_logged:
                self._unreadable_logged = True
                from .._core.log import logger

                logger.warning(
                    "vllm-custom-patches: cannot read the status epoch %s (%s); every status request collects anew",
                    self.path,
                    exc,
                )
            return uuid.uuid4().hex  # never equal to an earlier reading: no view is reused

    def advance(self) -> None:
        """Mark a change: every API server's next :meth:`read` differs from its readings before this call."""
        if self.path is None:
            return
        try:
            # A new file of its own (O_EXCL, a random name), then renamed over the epoch: a reader in
            # another process sees the old mark or the new one, whole.
            fd, temporary = tempfile.mkstemp(prefix=f"{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        except OSError as exc:
            self._cannot_write(exc)
            return
        try:
            with os.fdopen(fd, "w", encoding="ascii") as out:
                out.write(uuid.uuid4().hex)
            os.replace(temporary, self.path)
        except OSError as exc:
            self._cannot_write(exc)
            Path(temporary).unlink(missing_ok=True)

    def _cannot_write(self, exc: OSError) -> None:
        from .._core.log import logger
        from .fleet import MAX_AGE_S

        logger.warning(
            "vllm-custom-patches: cannot write the status epoch %s (%s); the server's other API servers may "
            "answer GET /custom_patches with the state from before this change for up to %.0f s",
            self.path,
            exc,
            MAX_AGE_S,
        )
