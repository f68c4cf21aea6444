"""The forward outbox in the entry store: a queue per endpoint, oldest first.

Rows are written by the store's writer in the transaction of their entry
(``Router.rows``); a sender reads only the head of its queue. A delivered or
expired row leaves the table and is counted in ``forward_totals``; a rejected
one stays, with the status and why, until ``gated forward retry``.
"""

from __future__ import annotations

import asyncio
import secrets
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import structlog

from gated.core.errors import StoreError
from gated.site.store import Entry, connect

log = structlog.get_logger("gated.forward")

if TYPE_CHECKING:
    from gated.forward.endpoints import Endpoint

PENDING, REJECTED = "pending", "rejected"
# Alarms about an endpoint's own queue are not sent to that endpoint: a
# rejected alarm would raise another one about itself, forever.
OWN_ALARMS = frozenset({"forward_rejected", "forward_expired"})


@dataclass(frozen=True, slots=True)
class Row:
    id: int
    endpoint: str
    created: float
    kind: str
    body: bytes
    msg_id: str
    attempts: int


class Router:
    """Which endpoints take each entry and alarm; wakes their senders."""

    def __init__(self, endpoints: Sequence[Endpoint]) -> None:
        self.endpoints = tuple(endpoints)
        self.wakes = {e.name: asyncio.Event() for e in endpoints}
        self._loop: asyncio.AbstractEventLoop | None = None

    def rows(self, entries: Sequence[Entry],
             alarms: Sequence[dict[str, Any]]) -> list[tuple[Any, ...]]:
        """Runs on the store's writer thread: O(entries x endpoints), no I/O."""
        rows: list[tuple[Any, ...]] = []
        for entry in entries:
            encoded: bytes | None = None
            for endpoint in self.endpoints:
                if endpoint.takes(entry):
                    encoded = encoded or msgspec.json.encode(entry.as_dict())
                    rows.append((endpoint.name, entry.time, "entry", encoded, _msg_id()))
        for alarm in alarms:
            try:
                encoded = msgspec.json.encode(alarm)
            except (TypeError, msgspec.EncodeError) as exc:
                # The writer must go on: a failure here would stop every entry.
                log.error("alarm not forwarded: cannot encode it", alarm=alarm.get("alarm"),
                          error=type(exc).__name__)
                continue
            for endpoint in self.endpoints:
                if endpoint.alarms and not (alarm.get("alarm") in OWN_ALARMS
                                            and alarm.get("endpoint") == endpoint.name):
                    rows.append((endpoint.name, float(alarm.get("time", 0.0)), "alarm",
                                 encoded, _msg_id()))
        return rows

    def written(self, endpoints: set[str]) -> None:
        for name in endpoints:
            if name in self.wakes:
                self.wakes[name].set()


def _msg_id() -> str:
    # Stored with the row: the same webhook-id on every attempt and restart.
    return "msg_" + secrets.token_hex(12)


HEAD = ("SELECT id, endpoint, created, kind, body, msg_id, attempts FROM outbox "
        "WHERE endpoint = ? AND state = 'pending' ORDER BY id LIMIT 1")


def head(conn: sqlite3.Connection, endpoint: str) -> Row | None:
    found = conn.execute(HEAD, (endpoint,)).fetchone()
    if found is None:
        return None
    row_id, name, created, kind, body, msg_id, attempts = found
    return Row(row_id, name, created, kind, bytes(body), msg_id, attempts)


def _change(conn: sqlite3.Connection, *statements: tuple[str, tuple[Any, ...]],
            sync: bool = True) -> None:
    if not sync:
        # A delivery lost to a power cut is only sent again (at least once);
        # not worth an fsync per row. The store's next batch syncs it anyway.
        conn.execute("PRAGMA synchronous=NORMAL")
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            for sql, args in statements:
                conn.execute(sql, args)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    finally:
        if not sync:
            conn.execute("PRAGMA synchronous=FULL")


_TOTAL = ("INSERT INTO forward_totals (endpoint) VALUES (?) "
          "ON CONFLICT(endpoint) DO NOTHING")


def delivered(conn: sqlite3.Connection, row: Row, when: float) -> None:
    _change(conn, ("DELETE FROM outbox WHERE id = ?", (row.id,)),
            (_TOTAL, (row.endpoint,)),
            ("UPDATE forward_totals SET delivered = delivered + 1, last_delivered = ? "
             "WHERE endpoint = ?", (when, row.endpoint)), sync=False)


def expired(conn: sqlite3.Connection, row: Row) -> None:
    _change(conn, ("DELETE FROM outbox WHERE id = ?", (row.id,)),
            (_TOTAL, (row.endpoint,)),
            ("UPDATE forward_totals SET expired = expired + 1 WHERE endpoint = ?",
             (row.endpoint,)))


def rejected(conn: sqlite3.Connection, row: Row, status: int | None, why: str,
             attempts: int, *, keep_since: float) -> None:
    """Keep ``row`` as rejected; drop the endpoint's rejections made before ``keep_since``
    (older than give_up_after: a retry could no longer deliver them in time, and an
    endpoint refusing everything would otherwise fill the disk)."""
    _change(conn, ("UPDATE outbox SET state = 'rejected', status = ?, why = ?, attempts = ? "
                   "WHERE id = ?", (status, why, attempts, row.id)),
            ("DELETE FROM outbox WHERE endpoint = ? AND state = 'rejected' AND created < ? "
             "AND id != ?", (row.endpoint, keep_since, row.id)))


def attempted(conn: sqlite3.Connection, row: Row, attempts: int) -> None:
    conn.execute("UPDATE outbox SET attempts = ? WHERE id = ?", (attempts, row.id))


def retry(conn: sqlite3.Connection, endpoint: str) -> int:
    """Put an endpoint's rejected rows back in its queue, in their old place."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        count = conn.execute(
            "UPDATE outbox SET state = 'pending', status = NULL, why = '', attempts = 0 "
            "WHERE endpoint = ? AND state = 'rejected'", (endpoint,)).rowcount
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return count


@dataclass(frozen=True, slots=True)
class Summary:
    endpoint: str
    delivered: int = 0
    expired: int = 0
    pending: int = 0
    oldest_pending: float | None = None
    rejected: tuple[tuple[int | None, str, int], ...] = ()  # (status, why, rows)


def summaries(conn: sqlite3.Connection, names: Sequence[str] = ()) -> list[Summary]:
    """Per endpoint (the configured ones first, then any left in the store)."""
    found: dict[str, dict[str, Any]] = {name: {} for name in names}
    for name, done, gone in conn.execute(
            "SELECT endpoint, delivered, expired FROM forward_totals"):
        found.setdefault(name, {}).update(delivered=done, expired=gone)
    for name, count, oldest in conn.execute(
            "SELECT endpoint, count(*), min(created) FROM outbox WHERE state = 'pending' "
            "GROUP BY endpoint"):
        found.setdefault(name, {}).update(pending=count, oldest_pending=oldest)
    reasons: dict[str, list[tuple[int | None, str, int]]] = {}
    for name, status, why, count in conn.execute(
            "SELECT endpoint, status, why, count(*) FROM outbox WHERE state = 'rejected' "
            "GROUP BY endpoint, status, why ORDER BY endpoint, count(*) DESC"):
        reasons.setdefault(name, []).append((status, why, count))
        found.setdefault(name, {})
    return [Summary(name, rejected=tuple(reasons.get(name, ())), **values)
            for name, values in found.items()]


def pending_counts(conn: sqlite3.Connection) -> dict[str, tuple[int, float | None]]:
    """Per endpoint: rows pending and the oldest one's time, for the metrics."""
    return {name: (count, oldest) for name, count, oldest in conn.execute(
        "SELECT endpoint, count(*), min(created) FROM outbox WHERE state = 'pending' "
        "GROUP BY endpoint")}


def open_store(path: Path, *, readonly: bool) -> sqlite3.Connection:
    """For ``gated forward``: the daemon may be running; SQLite's locks share."""
    if not path.exists():
        raise StoreError(f"no entry store at {path} (has the daemon run yet?)")
    try:
        conn = connect(path, readonly=readonly)
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        tables = {name for (name,) in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read entry store {path}: {exc}") from exc
    if "outbox" not in tables:
        conn.close()
        raise StoreError(f"the entry store {path} has no forward outbox yet "
                         f"(schema {version}); start the daemon once to upgrade it")
    return conn
