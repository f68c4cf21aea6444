"""What a call costs the machine, where it shows in the path's shape, not its timing.

Each cost here was measured under load (docs/benchmark.md); these tests pin the
shape that removed it, so it does not come back unnoticed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from gated.book import compiler, sitekey
from gated.core.clock import SystemClock
from gated.core.decide import Changes, Ledger
from gated.core.lockout import Policy
from gated.site import store as store_mod
from gated.site.gatekeeper import Gatekeeper, RawCall
from gated.site.store import Entry, Store, read_entries

from .helpers import BARRIER, RESIDENT, FakeActuator, TimerCountingLoop, write_config


def entry(n: int) -> Entry:
    return Entry(time=1_790_000_000.0 + n, gate="barrier", caller="+31612345678",
                 did="+31501234567", status="ACK", reason="granted_code", credential="Demo")


async def stop(writer: asyncio.Task[None], store: Store) -> None:
    writer.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await writer
    store.close()


async def test_a_batch_is_written_in_a_few_statements_whatever_its_size(tmp_path: Path) -> None:
    """200 entries (and the uses they spend) that arrive together are written with a
    few statements, not one or more an entry: SQLite lets go of the interpreter lock
    for every statement it steps, and each time the event loop waits to get it back."""
    store = Store.open(tmp_path / "s.sqlite3")
    statements: list[str] = []
    store.connection.set_trace_callback(statements.append)
    writer = asyncio.create_task(store.run())
    try:
        done = await asyncio.gather(*(
            store.submit(entry(n), Changes(uses={f"code-{n}": 1}), None) for n in range(200)))
    finally:
        await stop(writer, store)
    assert all(done)
    assert len(read_entries(store.path, limit=1000)) == 200
    inserts = [s for s in statements if s.lstrip().upper().startswith("INSERT")]
    # 200 rows of each table, at most 64 a statement: 4 statements a table.
    assert len(inserts) <= 8, f"{len(inserts)} INSERT statements for 200 entries and uses"


def main_file_entries(path: Path, scratch: Path) -> int:
    """Entries in the database file itself, the WAL left out: what checkpoints copied."""
    copy = scratch / "main-file-only.sqlite3"
    shutil.copyfile(path, copy)
    conn = sqlite3.connect(copy)
    try:
        return int(conn.execute("SELECT count(*) FROM entries").fetchone()[0])
    finally:
        conn.close()


async def test_checkpoints_never_run_inside_a_commit_that_answers_wait_for(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer's connection never checkpoints the WAL (SQLite does it inside the
    commit that crosses its threshold: the database written and fsynced while that
    batch's answers wait); the store checkpoints on a thread of its own, so the log
    still reaches the database file."""
    monkeypatch.setattr(store_mod, "CHECKPOINT_COMMITS", 5, raising=False)
    path = tmp_path / "s.sqlite3"
    store = Store.open(path)
    writer = asyncio.create_task(store.run())
    try:
        assert store.connection.execute("PRAGMA wal_autocheckpoint").fetchone() == (0,)
        for n in range(12):  # one commit each
            assert await store.submit(entry(n), None, None)
        scratch = tmp_path / "scratch"
        scratch.mkdir()
        for _ in range(500):  # a bounded wait for the checkpoint thread, 10 s at most
            if main_file_entries(path, scratch) >= 10:
                break
            await asyncio.sleep(0.02)
        assert main_file_entries(path, scratch) >= 10
    finally:
        await stop(writer, store)


# The entry lines of concurrent calls, counted by the writes that carry them.
LINES_SCRIPT = """
import asyncio, json, sys
from gated.book import compiler
from gated.site import logs
from gated.core.clock import SystemClock
from gated.core.decide import Ledger
from gated.site.gatekeeper import Gatekeeper, RawCall
from gated.core.lockout import Policy
from gated.site.store import Store
sys.path.insert(0, {root!r})
from tests.helpers import FakeActuator

class Counting:
    def __init__(self):
        self.writes = []
    def write(self, text):
        self.writes.append(text)
    def flush(self):
        pass

out, sys.stdout = sys.stdout, Counting()
logs.configure("json", "info")

async def main():
    loaded = compiler.load({config!r})
    store = Store.open(loaded.store_path)
    gatekeeper = Gatekeeper(loaded.book, Ledger.fresh(Policy()),
                            {{"barrier": FakeActuator("barrier")}}, store, SystemClock(),
                            deadline=3.0)
    writer = asyncio.create_task(store.run())
    calls = [RawCall(code="471123", did={did!r}, callerid="0612345678") for _ in range(50)]
    answers = await asyncio.gather(*(gatekeeper.call(call) for call in calls))
    writer.cancel()
    store.close()
    carrying = [w for w in sys.stdout.writes if '"event":"entry"' in w]
    print(json.dumps({{"answers": [a.status.value for a in answers],
                      "writes": len(carrying),
                      "lines": sum(w.count('"event":"entry"') for w in carrying)}}), file=out)

asyncio.run(main())
"""


def test_concurrent_calls_log_their_entries_in_a_write_a_batch(tmp_path: Path) -> None:
    """50 calls answered together write their 50 entry lines in fewer writes than lines:
    a write a batch, not a write (and a wait for the interpreter lock after it) a call."""
    script = LINES_SCRIPT.format(root=str(Path(__file__).parent.parent),
                                 config=str(write_config(tmp_path)), did=BARRIER)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["answers"] == ["ACK"] * 50
    assert result["lines"] == 50
    assert result["writes"] < 50, f"{result['writes']} writes for 50 entry lines"


def test_a_calls_code_digest_keeps_the_interpreter_lock(monkeypatch: pytest.MonkeyPatch) -> None:
    """The typed code's keyed digest is HMAC-SHA256 (RFC 4231's vector) made without
    OpenSSL's one-shot HMAC, which lets go of the interpreter lock on every call and
    leaves the event loop waiting to get it back from another thread."""
    def one_shot(*_args: object) -> bytes:
        raise AssertionError("hmac.digest: the one-shot HMAC lets go of the interpreter lock")

    monkeypatch.setattr(hmac, "digest", one_shot)
    # RFC 4231, test case 2: key "Jefe", data "what do ya want for nothing?".
    assert sitekey.digest(b"Jefe", "what do ya want for nothing?").hex() == (
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")


def test_calls_answered_together_share_their_deadline_timer(tmp_path: Path) -> None:
    """100 calls that arrive together put a few timers on the loop for their answer
    deadlines, not one each: under load a timer a call meant thousands on the loop's
    heap, each armed, cancelled and left there until its time."""
    loaded = compiler.load(write_config(tmp_path))

    async def calls() -> tuple[list[str], int]:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, TimerCountingLoop)
        store = Store.open(loaded.store_path)
        gatekeeper = Gatekeeper(loaded.book, Ledger.fresh(Policy()),
                                {"barrier": FakeActuator("barrier")}, store, SystemClock(),
                                deadline=3.0)
        writer = asyncio.create_task(store.run())
        try:
            before = loop.timers
            answers = await asyncio.gather(*(gatekeeper.call(
                RawCall(code="471123", did=BARRIER, callerid=RESIDENT)) for _ in range(100)))
            return [a.status.value for a in answers], loop.timers - before
        finally:
            await stop(writer, store)

    with asyncio.Runner(loop_factory=TimerCountingLoop) as runner:
        answers, timers = runner.run(calls())
    assert answers == ["ACK"] * 100
    assert timers <= 5, f"{timers} timers for 100 calls"
