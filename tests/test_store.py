from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest

from gated.core import lockout as lockout_mod
from gated.core.decide import Changes, Ledger, Request, nak
from gated.core.errors import StoreError
from gated.core.lockout import SITE, Policy, Strikes
from gated.site.store import MIGRATIONS, SCHEMA_VERSION, Entry, Store, read_entries


def entry(n: int, gate: str = "barrier") -> Entry:
    return Entry(time=1_790_000_000.0 + n, gate=gate, caller="+31612345678",
                 did="+31501234567", status="ACK", reason="granted_code", credential="Demo")


@pytest.fixture
async def store(tmp_path: Path) -> Store:
    return Store.open(tmp_path / "state" / "entries.sqlite3")


async def test_store_is_wal_full_sync_and_versioned(store: Store) -> None:
    """The store runs in WAL mode with synchronous=FULL and a schema version."""
    conn = sqlite3.connect(store.path)
    assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    assert store._conn.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL
    store.close()


async def test_concurrent_entries_share_batches(store: Store) -> None:
    """Entries submitted together are committed in fewer transactions than entries."""
    writer = asyncio.create_task(store.run())
    done = await asyncio.gather(*(store.submit(entry(n), None, None) for n in range(200)))
    assert all(done)
    assert 1 <= store.batches < 200
    assert len(read_entries(store.path, limit=1000)) == 200
    writer.cancel()
    store.close()


async def test_ledger_survives_a_restart(tmp_path: Path) -> None:
    """Uses, TOTP steps and lockout strikes are restored from the store."""
    path = tmp_path / "s.sqlite3"
    store = Store.open(path)
    writer = asyncio.create_task(store.run())
    policy = Policy(caller_failures=2, site_failures=100)
    ledger = Ledger.fresh(policy)
    keys1, locks = ledger.lockout.failure("+31600000001", 100.0)
    first = store.submit(entry(0), Changes(strikes=keys1), ledger)  # as each call does
    keys2, locks2 = ledger.lockout.failure("+31600000001", 101.0)
    assert locks2 and not locks
    ledger.uses["Demo"] = 3
    ledger.totp_last["Flat 12"] = 59_000_000
    changes = Changes(uses={"Demo": 3}, totp={"Flat 12": 59_000_000}, strikes=keys2)
    assert await store.submit(entry(1), changes, ledger)
    assert await first
    writer.cancel()
    store.close()

    again = Store.open(path).load_ledger(policy, now=102.0)
    assert again.uses == {"Demo": 3}
    assert again.totp_last == {"Flat 12": 59_000_000}
    assert again.lockout.caller_locked("+31600000001", 102.0)
    assert not again.lockout.caller_locked("+31600000001", 101.0 + 301)
    assert again.lockout.strikes(SITE) is not None
    assert list(again.lockout.recent) == [100.0, 101.0]


async def test_unwritable_store_buffers_and_flushes_later(tmp_path: Path) -> None:
    """When writes fail the entries wait in memory and land once the disk is back."""
    store = Store.open(tmp_path / "s.sqlite3")
    blocker = sqlite3.connect(store.path, isolation_level=None, timeout=0)
    store._conn.execute("PRAGMA busy_timeout=0")
    blocker.execute("BEGIN EXCLUSIVE")  # another writer holds the database
    writer = asyncio.create_task(store.run())
    pending = store.submit(entry(1), None, None)
    # Not durable, said at once: nobody waits for the disk to come back.
    assert not await asyncio.wait_for(pending, 5)
    assert store.buffered == 1 and not store.healthy
    blocker.execute("COMMIT")
    assert await store.flush(within=5)
    assert store.healthy and store.buffered == 0
    assert len(read_entries(store.path)) == 1
    writer.cancel()
    store.close()


def test_reading_a_missing_store_says_so(tmp_path: Path) -> None:
    """gated log on a site that never ran explains itself."""
    with pytest.raises(StoreError, match="has the daemon run yet"):
        read_entries(tmp_path / "nothing.sqlite3")


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    """A store written by a newer gated is not silently downgraded."""
    path = tmp_path / "s.sqlite3"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StoreError, match="newer"):
        Store.open(path)


async def test_a_full_buffer_drops_entries_never_code_changes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While the disk refuses, overflow drops the oldest entries; a managed code's
    withdrawal is kept, or a revoked code would return at the next start."""
    import gated.site.store as store_mod

    monkeypatch.setattr(store_mod, "BUFFER_LIMIT", 3)
    store = Store.open(tmp_path / "s.sqlite3")
    withdrawal = store.save_code("site", "v1", None)
    entries = [store.submit(entry(n), None, None) for n in range(5)]
    assert store.buffered == 3
    assert not withdrawal.done()
    assert [f.done() and f.result() for f in entries[:3]] == [False, False, False]
    assert store.dropped == 3
    writer = asyncio.create_task(store.run())
    assert await asyncio.wait_for(withdrawal, 5)
    assert all([await asyncio.wait_for(f, 5) for f in entries[3:]])
    writer.cancel()
    store.close()


async def test_stale_strikes_are_pruned_at_start_not_loaded(tmp_path: Path) -> None:
    """Strikes whose lock has ended and whose failures a quiet spell has forgotten are
    neither loaded nor kept: 200,000 of them cost a start nothing."""
    path = tmp_path / "s.sqlite3"
    Store.open(path).close()
    now = time.time()
    policy = Policy()
    long_ago = now - policy.max_lock_seconds - 3600
    conn = sqlite3.connect(path)
    conn.executemany(
        "INSERT INTO strikes (key, failures, locks, locked_until, last) VALUES (?, ?, ?, ?, ?)",
        ((f"+316{n:08d}", 2, 1, long_ago, long_ago - 300) for n in range(200_000)))
    conn.executemany(
        "INSERT INTO strikes (key, failures, locks, locked_until, last) VALUES (?, ?, ?, ?, ?)",
        [("+31699999991", 0, 1, now + 200, now - 100),  # locked now
         ("+31699999992", 3, 0, 0.0, now - 600),  # failures still counting
         ("+31699999993", 0, 0, 0.0, 0.0)])  # cleared by a success
    conn.commit()
    conn.close()

    store = Store.open(path)
    ledger = store.load_ledger(policy)
    store.close()
    assert sorted(ledger.lockout.callers) == ["+31699999991", "+31699999992"]
    assert ledger.lockout.caller_locked("+31699999991", now)
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT count(*) FROM strikes").fetchone() == (2,)
    conn.close()


async def test_a_site_failure_writes_a_bounded_amount_however_large_the_window(
        tmp_path: Path) -> None:
    """With a large site_failures each wrong code adds one failure time to the store,
    not the whole window re-encoded (which grew with every failure)."""
    path = tmp_path / "s.sqlite3"
    policy = Policy(caller_failures=1_000_000, site_failures=100_000)
    store = Store.open(path)
    writer = asyncio.create_task(store.run())
    written: list[int] = []
    store.connection.set_trace_callback(lambda sql: written.append(len(sql)))
    ledger = Ledger.fresh(policy)
    start = time.time()
    per_failure = []
    for n in range(500):
        request = Request("+31501234567", f"+316{n:08d}", code="000000")
        changes = ledger.apply(request, nak("unknown_code"), start + n)
        before = sum(written)
        assert await store.submit(entry(n), changes, ledger)
        per_failure.append(sum(written) - before)
    writer.cancel()
    store.close()
    # What one failure writes does not grow with the failures before it.
    assert max(per_failure[-50:]) <= 2 * max(per_failure[:50])
    assert sum(per_failure) < 500 * 2 * max(per_failure[:50])

    again = Store.open(path).load_ledger(policy)
    assert list(again.lockout.recent) == [start + n for n in range(500)]
    assert again.lockout.strikes(SITE) == Strikes(500, 0, 0.0, start + 499)


async def test_strikes_the_lockout_forgets_leave_the_store_too(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Callers the lockout stops tracking (past its cap, or cleared by a success) lose
    their row too, so the table never outgrows what the lockout holds."""
    monkeypatch.setattr(lockout_mod, "MAX_TRACKED", 10)
    store = Store.open(tmp_path / "s.sqlite3")
    writer = asyncio.create_task(store.run())
    ledger = Ledger.fresh(Policy(caller_failures=1000, site_failures=1_000_000))
    start = time.time()
    for n in range(100):
        request = Request("+31501234567", f"+316{n:08d}", code="000000")
        store.submit(entry(n), ledger.apply(request, nak("unknown_code"), start + n), ledger)
    store.submit(None, Changes(strikes=ledger.lockout.success("+31600000099")), ledger)
    assert await store.flush()
    writer.cancel()
    store.close()
    conn = sqlite3.connect(store.path)
    stored = {key for (key,) in conn.execute("SELECT key FROM strikes WHERE key != ?", (SITE,))}
    conn.close()
    assert stored == set(ledger.lockout.callers)
    assert len(stored) <= 10


async def test_a_site_window_stored_the_old_way_is_carried_over(tmp_path: Path) -> None:
    """A store whose site window is still one JSON list in strikes.recent keeps it."""
    path = tmp_path / "s.sqlite3"
    conn = sqlite3.connect(path, isolation_level=None)
    for number, script in enumerate(MIGRATIONS[:3], start=1):
        conn.executescript(f"BEGIN; {script} PRAGMA user_version = {number}; COMMIT;")
    conn.execute("INSERT INTO strikes VALUES (?, 2, 0, 0.0, 101.0, '[100.0, 101.0]')", (SITE,))
    conn.close()
    ledger = Store.open(path).load_ledger(Policy(), now=102.0)
    assert list(ledger.lockout.recent) == [100.0, 101.0]
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT recent FROM strikes").fetchall() == [(None,)]
    conn.close()
