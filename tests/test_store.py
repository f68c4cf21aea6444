from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from gated.decide import Changes, Ledger
from gated.errors import StoreError
from gated.lockout import SITE, Policy
from gated.store import SCHEMA_VERSION, Entry, Store, read_entries


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
    _, locks = ledger.lockout.failure("+31600000001", 100.0)
    keys2, locks2 = ledger.lockout.failure("+31600000001", 101.0)
    assert locks2 and not locks
    ledger.uses["Demo"] = 3
    ledger.totp_last["Flat 12"] = 59_000_000
    changes = Changes(uses={"Demo": 3}, totp={"Flat 12": 59_000_000}, strikes=keys2)
    assert await store.submit(entry(1), changes, ledger)
    writer.cancel()
    store.close()

    again = Store.open(path).load_ledger(policy)
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
    await asyncio.sleep(0.2)
    assert not pending.done() and store.buffered == 1 and not store.healthy
    blocker.execute("COMMIT")
    assert await asyncio.wait_for(pending, 5)
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
    import gated.store as store_mod

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
