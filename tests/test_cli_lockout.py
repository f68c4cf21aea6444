"""`gated lockout ls` and `gated lockout clear` against the real daemon and its store."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

from gated.cli import main
from gated.core.lockout import Lockout
from gated.site.store import read_entries

from .helpers import BARRIER

GUESSER = "+31687654321"
# A correct code from the guesser's number: refused while a lock holds.
RIGHT = "5555"

CALLER_LOCKS = """
[lockout]
caller_failures = 2
site_failures = 1000
"""
SITE_LOCKS = """
[lockout]
caller_failures = 1000
site_failures = 3
"""


async def _wait_unlocked(lockout: Lockout, key: str | None) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        now = time.time()
        if not (lockout.site_locked(now) if key is None else lockout.caller_locked(key, now)):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{key or 'the site'} still locked in the running daemon")


def _lockout(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


async def test_a_locked_out_caller_is_let_back_in_by_hand_while_the_daemon_runs(
        start_daemon: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`lockout ls` shows the locked caller and `lockout clear` lifts the running daemon's
    lock within seconds, recorded as an entry."""
    running = await start_daemon(CALLER_LOCKS)
    config = str(tmp_path / "gated.toml")
    for _ in range(2):
        await running.get(code="000000", did=BARRIER, callerid=GUESSER)
    assert await running.get(code=RIGHT, did=BARRIER, callerid=GUESSER) == (200, "status=NAK")

    code, out, _ = await asyncio.to_thread(
        _lockout, ["-c", config, "lockout", "ls", "--json"], capsys)
    locks = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert code == 0
    assert [(lock["locked"], lock["caller"]) for lock in locks] == [("caller", GUESSER)]
    assert locks[0]["seconds_left"] > 0 and "T" in locks[0]["until"]

    # The number as people write it locally: the command normalises it as calls are.
    code, out, _ = await asyncio.to_thread(
        _lockout, ["-c", config, "lockout", "clear", "0687654321"], capsys)
    assert code == 0, out
    await _wait_unlocked(running.daemon.gatekeeper.ledger.lockout, GUESSER)
    assert await running.get(code=RIGHT, did=BARRIER, callerid=GUESSER) == (200, "status=ACK")

    entries = read_entries(tmp_path / "state" / "entries.sqlite3")
    cleared = [e for e in entries if e.reason == "lockout_cleared"]
    assert [(e.caller, e.source, e.status) for e in cleared] == [(GUESSER, "cli", "STAFF")]
    code, out, _ = await asyncio.to_thread(_lockout, ["-c", config, "lockout", "ls"], capsys)
    assert (code, out.strip()) == (0, "nothing is locked")


async def test_a_site_wide_lock_is_lifted_by_hand_in_the_running_daemon_and_stays_lifted(
        start_daemon: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`lockout clear --site` ends a site-wide lock in the running daemon, and a restart
    does not bring it back."""
    running = await start_daemon(SITE_LOCKS)
    config = str(tmp_path / "gated.toml")
    for n in range(3):
        await running.get(code="000000", did=BARRIER, callerid=f"+3168765430{n}")
    assert await running.get(code=RIGHT, did=BARRIER, callerid=GUESSER) == (200, "status=NAK")
    code, out, _ = await asyncio.to_thread(
        _lockout, ["-c", config, "lockout", "ls", "--json"], capsys)
    locks = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [lock["locked"] for lock in locks][:1] == ["site"]

    code, out, _ = await asyncio.to_thread(
        _lockout, ["-c", config, "lockout", "clear", "--site"], capsys)
    assert code == 0, out
    await _wait_unlocked(running.daemon.gatekeeper.ledger.lockout, None)
    assert await running.get(code=RIGHT, did=BARRIER, callerid=GUESSER) == (200, "status=ACK")

    await running.stop()
    again = await start_daemon(SITE_LOCKS)
    assert await again.get(code=RIGHT, did=BARRIER, callerid=GUESSER) == (200, "status=ACK")


async def test_a_lock_cleared_while_the_daemon_is_stopped_is_gone_at_its_next_start(
        start_daemon: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A clear with no daemon running takes effect from the store at the next start."""
    running = await start_daemon(CALLER_LOCKS)
    config = str(tmp_path / "gated.toml")
    for _ in range(2):
        await running.get(code="000000", did=BARRIER, callerid=GUESSER)
    await running.stop()
    code, out, _ = await asyncio.to_thread(
        _lockout, ["-c", config, "lockout", "clear", GUESSER], capsys)
    assert code == 0, out
    again = await start_daemon(CALLER_LOCKS)
    assert await again.get(code=RIGHT, did=BARRIER, callerid=GUESSER) == (200, "status=ACK")


async def test_clearing_a_lock_that_is_not_there_says_so_and_records_nothing(
        start_daemon: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Clearing a caller who is not locked exits non-zero, says so and adds no entry;
    naming neither a caller nor --site is refused."""
    await start_daemon(CALLER_LOCKS)
    config = str(tmp_path / "gated.toml")
    code, _, err = await asyncio.to_thread(
        _lockout, ["-c", config, "lockout", "clear", GUESSER], capsys)
    assert code == 1 and "not locked" in err
    assert not [e for e in read_entries(tmp_path / "state" / "entries.sqlite3")
                if e.reason == "lockout_cleared"]
    code, _, err = await asyncio.to_thread(_lockout, ["-c", config, "lockout", "clear"], capsys)
    assert code == 2 and "--site" in err
