"""What an inconsistent kill-switch outcome left is shown by every API server of the server (``_ops.unsettled``).

Two :class:`Unsettled` records on one path stand for two API servers of one
server (each process has its own); the writer of an entry is a real process
where its liveness matters.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from vllm_custom_patches._ops.unsettled import Unsettled

LEFT = {"patch": "p", "op_id": "op1", "action": "rollback", "processes": ["engine_core dp_rank=1 pid=7 on node"]}


@pytest.fixture
def epoch(tmp_path: Path) -> Path:
    return tmp_path / "vllm-custom-patches-0-abc.epoch"


def test_an_entry_one_api_server_notes_is_seen_by_another_and_settled_by_either(epoch: Path) -> None:
    first, second = Unsettled.beside(epoch), Unsettled.beside(epoch)
    assert first.entries() == second.entries() == []
    first.note("p", LEFT)
    assert second.entries() == [LEFT]
    second.note("q", {**LEFT, "patch": "q"})
    assert [entry["patch"] for entry in first.entries()] == ["p", "q"]
    second.settle("p")  # an operation on p done everywhere, through the other API server
    assert [entry["patch"] for entry in first.entries()] == ["q"]
    first.settle("q")
    assert second.entries() == []


def test_without_a_server_address_it_is_this_processs_memory(tmp_path: Path) -> None:
    record = Unsettled.beside(None)
    record.note("p", LEFT)
    assert record.entries() == [LEFT] and Unsettled.beside(None).entries() == []
    record.settle("p")
    assert record.entries() == []
    assert list(tmp_path.iterdir()) == []


def test_an_entry_whose_writer_is_gone_belongs_to_an_earlier_server_and_is_ignored(epoch: Path) -> None:
    # A real API-server-like process notes an entry and waits; while it runs, the entry stands.
    writer = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys
            from pathlib import Path
            from vllm_custom_patches._ops.unsettled import Unsettled
            Unsettled.beside(Path({str(epoch)!r})).note("p", {LEFT!r})
            print("noted", flush=True)
            sys.stdin.readline()
        """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "noted"
        assert Unsettled.beside(epoch).entries() == [LEFT]
    finally:
        writer.communicate("\n", timeout=60)
    assert writer.returncode == 0
    # The server on this address stopped (and a new one may start): its record is not this server's.
    assert Unsettled.beside(epoch).entries() == []


def test_a_record_that_cannot_be_read_is_logged_once_and_counts_as_empty(
    epoch: Path, caplog: pytest.LogCaptureFixture
) -> None:
    record = Unsettled.beside(epoch)
    assert record.path is not None
    record.path.write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="vllm.custom_patches"):
        assert record.entries() == [] and record.entries() == []
    assert [r.getMessage() for r in caplog.records].count(caplog.records[0].getMessage()) == 1
    assert "cannot read" in caplog.records[0].getMessage() and str(record.path) in caplog.records[0].getMessage()
    record.note("p", LEFT)  # a new record replaces the unreadable one
    assert Unsettled.beside(epoch).entries() == [LEFT]
    assert json.loads(record.path.read_text())["p"]["op_id"] == "op1"


def test_a_record_that_cannot_be_written_is_kept_in_this_processs_memory(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    record = Unsettled.beside(tmp_path / "no-such-directory" / "x.epoch")
    with caplog.at_level(logging.WARNING, logger="vllm.custom_patches"):
        record.note("p", LEFT)
    assert record.entries() == [LEFT]  # this API server still tells
    assert "cannot write" in caplog.text
    record.settle("p")
    assert record.entries() == []


def test_the_status_route_of_another_api_server_shows_an_inconsistent_change(
    epoch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the endpoint: the change's report lands in the shared record; a second API server's status
    collection (``note_unsettled`` over its own record on the same path) is not consistent."""
    from vllm_custom_patches._ops import switch

    monkeypatch.setattr(switch, "_record", Unsettled())
    switch.share_unsettled(epoch)  # what init_state does with the server's change epoch
    report: dict[str, Any] = {
        "outcome": "inconsistent", "patch": "p", "op_id": "op1", "action": "rollback",
        "undo_failed": [{"description": "engine_core dp_rank=1 pid=7 on node"}],
    }  # fmt: skip
    switch._remember(report)
    monkeypatch.setattr(switch, "_record", Unsettled.beside(epoch))  # the other API server's own record
    status = switch.note_unsettled({"processes": [], "consistent": True})
    assert status["consistent"] is False and status["unsettled"] == [LEFT]
    switch._remember({**report, "outcome": "done"})
    assert switch.note_unsettled({"processes": [], "consistent": True})["consistent"] is True
