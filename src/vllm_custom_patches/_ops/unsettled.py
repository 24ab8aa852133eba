"""What failed undos left, shared by the API servers of one server.

An inconsistent outcome of the kill switch (an undo that failed somewhere,
``switch``) leaves the server not consistent until a later operation on that
patch is done everywhere.  vLLM may start several API servers for one server
(``--api-server-count``; one per rank with ``--data-parallel-size N``), and a
status request may reach any of them: the one that made the change must not
be the only one to tell.  So the record is a small JSON file next to the
change epoch (``epoch.ChangeEpoch``, named after the server's address, in
vLLM's socket directory), rewritten whole (by rename, under an advisory lock)
by the API server that changes it and read by every status collection.  Where
the server's address is unknown (no epoch file), it is this process's memory.

Each entry names the API server that wrote it (pid and start time): an entry
whose writer is no longer running belongs to an earlier life of a server on
the same address (vLLM stops a whole server when one of its API servers
dies), and is ignored.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from .._core.forksafe import ForkSafeLock

__all__ = ["Unsettled"]

_MAX_BYTES = 1 << 20
"""A record larger than this is not read (it holds one short entry per patch)."""


def _start_time(pid: int) -> str | None:
    """When process ``pid`` started (Linux: ``/proc/PID/stat`` field 22), or None if it is not running."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    except OSError:  # no /proc here: alive or not, by signal 0
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return "?"
    return stat.rpartition(")")[2].split()[19]  # after the command's name, which may hold spaces


class Unsettled:
    """The server's record of patches whose last operation was inconsistent: patch -> what it left."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._lock = ForkSafeLock()  # a forked child must not find it held by a thread it lacks
        self._memory: dict[str, dict[str, Any]] = {}
        self._problem_logged = False

    @classmethod
    def beside(cls, epoch_path: Path | None) -> Unsettled:
        """The record of the server whose change epoch is ``epoch_path`` (None: this process's memory)."""
        return cls(None if epoch_path is None else epoch_path.with_name(epoch_path.name + ".unsettled.json"))

    def entries(self) -> list[dict[str, Any]]:
        """What is unsettled now, oldest patch name first (without the writer's identity)."""
        with self._lock:
            found = self._read() if self.path is not None else dict(self._memory)
        return [{k: v for k, v in entry.items() if k != "writer"} for _, entry in sorted(found.items())]

    def note(self, patch: str, entry: Mapping[str, Any]) -> None:
        """``patch``'s last operation was inconsistent: ``entry`` says what it left."""
        writer = f"{os.getpid()}:{_start_time(os.getpid())}"
        self._update(lambda found: found.__setitem__(patch, {**entry, "writer": writer}))

    def settle(self, patch: str) -> None:
        """An operation on ``patch`` was done everywhere: nothing of it is unsettled any more."""
        self._update(lambda found: found.pop(patch, None))

    def _update(self, change: Callable[[dict[str, dict[str, Any]]], object]) -> None:
        with self._lock:
            if self.path is None:
                change(self._memory)
                return
            try:
                with self._exclusive():
                    found = self._read()
                    change(found)
                    self._write(found)
                self._memory.clear()
            except OSError as exc:  # this API server at least still tells
                self._cannot(f"write {self.path} ({exc})")
                change(self._memory)

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        import fcntl

        assert self.path is not None
        fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # the API servers of one server: a moment each, at an inconsistent outcome
            yield
        finally:
            os.close(fd)  # releases the lock

    def _read(self) -> dict[str, dict[str, Any]]:
        """The file's live entries (and this process's own, kept while the file could not be written)."""
        assert self.path is not None
        found: dict[str, dict[str, Any]] = {}
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            with os.fdopen(fd, "rb") as source:
                raw = source.read(_MAX_BYTES + 1)
            if len(raw) > _MAX_BYTES:
                raise ValueError(f"larger than {_MAX_BYTES} bytes")
            data = json.loads(raw or b"{}")
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            for patch, entry in data.items():
                if isinstance(entry, dict) and self._live(entry.get("writer")):
                    found[str(patch)] = entry
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:
            self._cannot(f"read {self.path} ({exc})")
        return {**found, **self._memory}

    @staticmethod
    def _live(writer: object) -> bool:
        pid, _, started = str(writer).partition(":")
        return pid.isdigit() and _start_time(int(pid)) in (started, "?")

    def _write(self, found: Mapping[str, Any]) -> None:
        assert self.path is not None
        fd, temporary = tempfile.mkstemp(prefix=f"{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump(found, out)
            os.replace(temporary, self.path)  # a reader sees the old record or the new one, whole
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def _cannot(self, what: str) -> None:
        if self._problem_logged:
            return
        self._problem_logged = True
        from .._core.log import logger

        logger.warning(
            "vllm-custom-patches: cannot %s: an inconsistent kill-switch outcome is shown only by the API "
            "server that made it",
            what,
        )
