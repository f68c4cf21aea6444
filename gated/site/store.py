"""The durable entry log and ledger state: SQLite in WAL mode, group commit.

Every answered call is written before (or as) its answer goes out. Entries
that arrive while a batch is being written form the next batch: one
transaction and one fsync serve many concurrent calls, and each caller waits
only for its own batch. If the disk fails, entries are held in a bounded
buffer, the gate keeps answering, and the buffer is flushed when writes work
again. Ledger state (uses, TOTP steps, strikes, the site's failure window) is
never dropped: it is held as the latest value per key, so it is bounded by the
number of keys, not of calls, and written with the next batch that succeeds.

The store's thread shares the interpreter lock with the event loop, and
SQLite lets go of it for every statement it steps: a batch is written in a
few multi-row statements rather than a statement per row, so the thread asks
the loop for the lock a few times a batch instead of a few times an entry. It
writes the batch's entry lines too, in one write, as the batch commits. WAL
checkpoints (copying the log into the database, with an fsync of its own) run
on a connection and thread of their own, never inside a commit that answers
wait for.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import operator
import os
import queue
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import structlog

from gated.book import files
from gated.core.decide import KEEP_CALLS, MAX_CALLS, Call, Changes, Ledger
from gated.core.errors import StoreError
from gated.core.lockout import MAX_TRACKED, SITE, Policy, Strikes
from gated.site import alarms, logs

log = structlog.get_logger("gated.store")

SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY,
    time REAL NOT NULL,
    gate TEXT,
    caller TEXT,
    did TEXT,
    callername TEXT NOT NULL DEFAULT '',
    credential TEXT NOT NULL DEFAULT '',
    credential_id TEXT NOT NULL DEFAULT '',
    kind TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL,
    reason TEXT NOT NULL,
    actuator TEXT NOT NULL DEFAULT '',
    latency_ms REAL NOT NULL DEFAULT 0,
    source TEXT NOT NULL DEFAULT 'pbx'
);
CREATE INDEX IF NOT EXISTS entries_time ON entries(time);
CREATE TABLE IF NOT EXISTS uses (
    credential_id TEXT PRIMARY KEY,
    count INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS totp_steps (
    credential_id TEXT PRIMARY KEY,
    timecode INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS strikes (
    key TEXT PRIMARY KEY,
    failures INTEGER NOT NULL,
    locks INTEGER NOT NULL,
    locked_until REAL NOT NULL,
    last REAL NOT NULL,
    recent TEXT
);
"""
SCHEMA_V2 = """
CREATE TABLE IF NOT EXISTS visitors (
    id TEXT PRIMARY KEY,
    digest BLOB NOT NULL UNIQUE,
    name TEXT NOT NULL,
    gates TEXT NOT NULL,
    valid_from REAL,
    valid_until REAL NOT NULL,
    max_uses INTEGER,
    callers TEXT NOT NULL DEFAULT '[]',
    callername TEXT NOT NULL DEFAULT '',
    destination TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL
);
"""
# The local copy of codes managed over MQTT.
SCHEMA_V3 = """
CREATE TABLE IF NOT EXISTS managed_codes (
    scope TEXT NOT NULL,
    id TEXT NOT NULL,
    body BLOB NOT NULL,
    updated REAL NOT NULL,
    PRIMARY KEY (scope, id)
);
"""
# The site's failure window, one row per failure: a failure is one INSERT, not
# the whole window re-encoded into strikes.recent (no longer written). '*site*'
# is lockout.SITE.
SCHEMA_V4 = """
CREATE TABLE IF NOT EXISTS site_window (time REAL NOT NULL);
CREATE INDEX IF NOT EXISTS site_window_time ON site_window(time);
INSERT INTO site_window (time)
    SELECT json_each.value FROM strikes, json_each(strikes.recent)
    WHERE strikes.key = '*site*' AND strikes.recent IS NOT NULL;
UPDATE strikes SET recent = NULL WHERE recent IS NOT NULL;
"""
# The platform's id of the call (a TwiML CallSid), to find it in its logs.
SCHEMA_V5 = """
ALTER TABLE entries ADD COLUMN call_id TEXT NOT NULL DEFAULT '';
"""
# The local copy of routes managed over MQTT, as managed_codes is of codes.
SCHEMA_V6 = """
CREATE TABLE IF NOT EXISTS managed_routes (
    scope TEXT NOT NULL,
    id TEXT NOT NULL,
    body BLOB NOT NULL,
    updated REAL NOT NULL,
    PRIMARY KEY (scope, id)
);
"""
# The forward outbox (gated/forward): one row per entry or alarm and endpoint,
# written with its entry; delivered rows leave it and are counted in totals.
SCHEMA_V7 = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY,
    endpoint TEXT NOT NULL,
    created REAL NOT NULL,
    kind TEXT NOT NULL,
    body BLOB NOT NULL,
    msg_id TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    status INTEGER,
    why TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS outbox_queue ON outbox(endpoint, state, id);
CREATE TABLE IF NOT EXISTS forward_totals (
    endpoint TEXT PRIMARY KEY,
    delivered INTEGER NOT NULL DEFAULT 0,
    expired INTEGER NOT NULL DEFAULT 0,
    last_delivered REAL
);
"""
# Calls held to their attempts (a TwiML CallSid): what each has decided, so a
# replayed request opens nothing after a restart either. Kept as long as
# decide.KEEP_CALLS says, and at most decide.MAX_CALLS rows.
SCHEMA_V8 = """
CREATE TABLE IF NOT EXISTS calls (
    id TEXT PRIMARY KEY,
    began REAL NOT NULL,
    decisions INTEGER NOT NULL,
    opened INTEGER NOT NULL
);
"""
# Locks cleared by hand (`gated lockout clear`): the command clears the stored
# strikes itself and leaves a row here, so a running daemon clears its own
# copy too when it next sees the store change.
SCHEMA_V9 = """
CREATE TABLE IF NOT EXISTS lockout_clears (
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL,
    time REAL NOT NULL
);
"""
# Each step takes the store from version N to N + 1; never edit a shipped one.
MIGRATIONS = (SCHEMA_V1, SCHEMA_V2, SCHEMA_V3, SCHEMA_V4, SCHEMA_V5, SCHEMA_V6,
              SCHEMA_V7, SCHEMA_V8, SCHEMA_V9)
SCHEMA_VERSION = len(MIGRATIONS)
# Entries held in memory while the disk refuses writes; beyond this the
# oldest are dropped (and counted), since a gate that stops answering is worse.
# Ledger state is not an entry and never dropped (see _LedgerState).
BUFFER_LIMIT = 10_000
RETRY_SECONDS = 1.0
BUSY_TIMEOUT_MS = 1000
# Commits between two WAL checkpoints (SQLite's own default is every 1,000
# pages, some 300 commits of a few pages each).
CHECKPOINT_COMMITS = 300
# Rows one statement inserts at most: 64 entries of 15 values stay under the
# 999 bound values older SQLite builds allow a statement.
ROWS_PER_STATEMENT = 64


@dataclass(frozen=True, slots=True)
class Entry:
    time: float
    gate: str | None
    caller: str | None
    did: str | None
    status: str
    reason: str
    callername: str = ""
    credential: str = ""
    credential_id: str = ""
    kind: str = ""
    actuator: str = ""
    latency_ms: float = 0.0
    source: str = "pbx"
    call_id: str = ""

    def as_dict(self) -> dict[str, Any]:
        # Every field is a str, float or None: dataclasses.asdict's recursive
        # deep copy bought nothing and cost ~9 us on each call's log line.
        return {name: getattr(self, name) for name in ENTRY_COLUMNS}


ENTRY_COLUMNS = tuple(f.name for f in fields(Entry))
_entry_row = operator.attrgetter(*ENTRY_COLUMNS)  # Entry -> its row, in C
# An entry's fields on its log line, the time aside (the line has its own).
_LOGGED = tuple(name for name in ENTRY_COLUMNS if name != "time")
_logged = operator.attrgetter(*_LOGGED)


def entry_fields(entry: Entry, durable: bool) -> dict[str, Any]:
    """What an entry's log line says: its fields but empty ones, and whether it was
    durable when its call was answered."""
    # Empty fields say nothing; leaving them out keeps a console line short.
    line = {k: v for k, v in zip(_LOGGED, _logged(entry), strict=True)
            if v != "" and v is not None}
    line["durable"] = durable
    return line


class EntryLine:
    """An entry's one log line: written by the store's thread as the entry commits,
    or by its call if the call stops waiting first, never by both."""

    __slots__ = ("_unwritten",)

    def __init__(self) -> None:
        self._unwritten = [True]

    def claim(self) -> bool:
        """True for the one side that is to write the line."""
        try:
            # One C call, so two threads never both take it.
            return self._unwritten.pop()
        except IndexError:
            return False


@functools.lru_cache(maxsize=256)
def _values(head: str, width: int, rows: int, tail: str = "") -> str:
    """``head VALUES (?, ...), ... tail`` for ``rows`` rows of ``width`` values."""
    one = f"({', '.join('?' * width)})"
    return f"{head} VALUES {', '.join([one] * rows)}{tail}"


def _insert(conn: sqlite3.Connection, head: str, rows: Sequence[Sequence[Any]],
            tail: str = "") -> None:
    """Insert ``rows`` with as few statements as SQLite allows.

    ``executemany`` steps the statement once a row, and lets go of the
    interpreter lock and takes it back each time; with the event loop busy,
    each take is a wait. A statement of many rows is bound in C and stepped once.
    """
    if not rows:
        return
    width = len(rows[0])
    flat = itertools.chain.from_iterable
    for start in range(0, len(rows), ROWS_PER_STATEMENT):
        chunk = rows[start:start + ROWS_PER_STATEMENT]
        conn.execute(_values(head, width, len(chunk), tail), list(flat(chunk)))


# The column names are constants; values are always bound.
ENTRIES_HEAD = f"INSERT INTO entries ({', '.join(ENTRY_COLUMNS)})"
INSERT_ENTRY = _values(ENTRIES_HEAD, len(ENTRY_COLUMNS), 1)


@dataclass(slots=True)
class _LedgerState:
    """Ledger state changed since the last write: the latest value per key."""

    uses: dict[str, int] = field(default_factory=dict)
    totp: dict[str, int] = field(default_factory=dict)
    # None: the lockout forgot the key (a success, or too many tracked).
    strikes: dict[str, Strikes | None] = field(default_factory=dict)
    # Site failure times to add, after emptying the stored window if ``reset``
    # (a site lock empties it); stored times before ``floor`` have left it.
    window: deque[float] = field(default_factory=deque)
    reset: bool = False
    floor: float | None = None
    calls: dict[str, Call | None] = field(default_factory=dict)  # None: forgotten

    def __bool__(self) -> bool:
        return bool(self.uses or self.totp or self.strikes or self.window or self.reset
                    or self.calls)

    def note(self, changes: Changes, ledger: Ledger | None) -> None:
        self.uses.update(changes.uses)
        self.totp.update(changes.totp)
        self.calls.update(changes.calls)  # frozen: nothing for the writer to copy
        if ledger is None:
            return
        lockout = ledger.lockout
        for key in changes.strikes:
            current = lockout.strikes(key)
            # Copy: the writer thread must not read state the loop mutates.
            self.strikes[key] = None if current is None else Strikes(
                current.failures, current.locks, current.locked_until, current.last)
            if key == SITE:
                self._site_failure(lockout.recent)

    def _site_failure(self, recent: deque[float]) -> None:
        # SITE changes only on a failure, which either added its time to the
        # window or, locking the site, emptied it: O(1), whatever the window.
        if not recent:
            self.window.clear()
            self.reset, self.floor = True, None
            return
        self.window.append(recent[-1])
        self.floor = recent[0]
        while self.window and self.window[0] < self.floor:
            self.window.popleft()

    def after(self, older: _LedgerState) -> None:
        """Take back ``older`` (a write that failed) under this newer state."""
        for mine, theirs in ((self.uses, older.uses), (self.totp, older.totp)):
            for key, value in theirs.items():
                mine.setdefault(key, value)
        for key, strikes in older.strikes.items():
            self.strikes.setdefault(key, strikes)
        for key, call in older.calls.items():
            self.calls.setdefault(key, call)
        if not self.reset:
            self.window = deque((*older.window, *self.window))
            self.reset = older.reset
        if self.floor is None:
            self.floor = older.floor


@dataclass(slots=True)
class _Pending:
    entry: Entry | None
    done: asyncio.Future[bool] | None
    # A managed code to keep (scope, id, body) or forget (body None).
    code: tuple[str, str, bytes | None] | None = None
    ledger: _LedgerState | None = None
    route: tuple[str, str, bytes | None] | None = None  # a managed route, as ``code``
    alarm: dict[str, Any] | None = None  # for the forward outbox only
    line: EntryLine | None = None  # the entry's log line, written as it commits


class Outbox(Protocol):
    """Which forward rows a batch makes (gated/forward/outbox.py)."""

    def rows(self, entries: Sequence[Entry],
             alarms: Sequence[dict[str, Any]]) -> list[tuple[Any, ...]]: ...

    def written(self, endpoints: set[str]) -> None: ...


INSERT_OUTBOX = "INSERT INTO outbox (endpoint, created, kind, body, msg_id)"


def _keep_copy(conn: sqlite3.Connection, table: str, scope: str, item_id: str,
               body: bytes | None) -> None:
    """Keep (or, with ``body`` None, forget) the local copy of one managed code or route."""
    # ``table`` is one of two constants; values are always bound.
    if body is None:
        conn.execute(f"DELETE FROM {table} WHERE scope = ? AND id = ?",  # noqa: S608
                     (scope, item_id))
    else:
        conn.execute(f"INSERT OR REPLACE INTO {table} (scope, id, body, updated) "  # noqa: S608
                     "VALUES (?, ?, ?, ?)", (scope, item_id, body, time.time()))


def connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    # SQLite opens the store and its -wal and -shm files by name: through a
    # link, a staff command run as root would write whatever file it names.
    for part in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        try:
            files.refuse_link(part)
        except files.FileError as exc:
            raise StoreError(f"cannot open the entry store: {exc}") from None
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
    else:
        _prepare(path)
        conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: a committed entry survives a power cut, not just a crash.
        conn.execute("PRAGMA synchronous=FULL")
    # Short: while the disk refuses, calls must still be answered in time.
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    return conn


def _prepare(path: Path) -> None:
    """A private store this user can write, before SQLite opens it.

    SQLite makes a new file by the umask, owned by whoever ran first, and
    opens a file it may not write read-only without a word: the daemon would
    start "ready" and fail every write. Made here, the file is 0600 (SQLite
    gives its -wal and -shm files the same mode and, as root, owner) and
    belongs to the state directory's owner.
    """
    try:
        files.make_dir(path.parent)
        files.create_private(path)
    except OSError as exc:
        raise StoreError(f"cannot create the entry store {path}: {exc.strerror}") from exc
    for part in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        if part.exists() and not os.access(part, os.R_OK | os.W_OK):
            raise StoreError(f"cannot write the entry store {part}: "
                             f"{files.chown_fix(part, f'{path}*')}")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise StoreError(f"cannot write in the state directory {path.parent}: "
                         f"{files.chown_fix(path.parent)}")


def migrate(conn: sqlite3.Connection) -> None:
    (version,) = conn.execute("PRAGMA user_version").fetchone()
    if version > SCHEMA_VERSION:
        raise StoreError(f"store schema {version} is newer than this gated ({SCHEMA_VERSION})")
    for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
        conn.executescript(f"BEGIN; {script} PRAGMA user_version = {number}; COMMIT;")


class _Worker:
    """One thread that runs jobs in order and hands each result to its loop.

    Lighter than ``run_in_executor`` (a concurrent future chained to an asyncio
    one, a lock and a semaphore a job): one queue put to start a job, one
    ``call_soon_threadsafe`` to end it.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._jobs: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        # Jobs queued or running: while there are, the thread may be using
        # what they were given, whatever became of their waiters.
        self.running = 0
        self.quiet = asyncio.Event()

    def run(self, function: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Any] = loop.create_future()
        self.running += 1
        self.quiet.clear()
        if self._thread is None:
            # A daemon thread: a store nobody closed must not hold the process
            # at exit; an interrupted commit is rolled back, as after kill -9.
            self._thread = threading.Thread(target=self._serve, name=self.name, daemon=True)
            self._thread.start()
        self._jobs.put((loop, done, function, args))
        return done

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            loop, done, function, args = job
            try:
                result, error = function(*args), None
            except BaseException as exc:  # handed to the waiter, as an executor does
                result, error = None, exc
            # RuntimeError: the loop has closed, nobody waits any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._settle, done, result, error)

    def _settle(self, done: asyncio.Future[Any], result: Any,
                error: BaseException | None) -> None:
        self.running -= 1
        if not self.running:
            self.quiet.set()
        if done.done():
            return  # its waiter gave up (a deadline); the job was done all the same
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)

    def stop(self) -> None:
        """Finish the jobs queued, then end the thread."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None


class _Checkpointer:
    """WAL checkpoints on a connection and a thread of their own.

    SQLite checkpoints in the connection whose commit crosses its threshold,
    inside that commit: the database file written and fsynced while every
    answer of the batch waits (264 ms once, here). The writer's connection never
    checkpoints; every CHECKPOINT_COMMITS commits it asks this thread, which
    copies what it can without holding up the writer (PASSIVE) and goes again
    while commits came in meanwhile, so that the log starts afresh at a quiet
    moment.
    """

    CATCH_UP = 4  # rounds at most per request

    def __init__(self, path: Path) -> None:
        self.path = path
        self._wake: queue.SimpleQueue[bool] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.checkpoints = 0

    def request(self) -> None:
        """From any thread: checkpoint soon."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="gated-checkpoint",
                                            daemon=True)
            self._thread.start()
        self._wake.put(True)

    def _serve(self) -> None:
        conn: sqlite3.Connection | None = None
        try:
            while self._wake.get():
                try:
                    if conn is None:
                        conn = sqlite3.connect(self.path, check_same_thread=False,
                                               isolation_level=None)
                        # A checkpoint syncs the log before it copies it, and the
                        # database before the log may start afresh.
                        conn.execute("PRAGMA synchronous=FULL")
                    self._checkpoint(conn)
                except sqlite3.Error as exc:
                    # The log just grows meanwhile; the next request tries again.
                    log.debug("WAL checkpoint failed", path=str(self.path), error=str(exc))
        finally:
            if conn is not None:
                conn.close()

    def _checkpoint(self, conn: sqlite3.Connection) -> None:
        for _ in range(self.CATCH_UP):
            busy, frames, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            self.checkpoints += 1
            if busy or copied >= frames:
                return

    def stop(self) -> None:
        if self._thread is not None:
            self._wake.put(False)
            self._thread.join()
            self._thread = None


class Store:
    """Owns the SQLite connection; all its use runs on the store's one thread."""

    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        self.path = path
        self._conn = conn
        self._worker = _Worker("gated-store")
        self._checkpointer = _Checkpointer(path)
        self._commits = 0
        # The forward endpoints of the batch the loop has staged for the thread
        # to commit; None: the thread writes the batch whole (see _commit).
        self._staged: set[str] | None = None
        self._pending: deque[_Pending] = deque()
        self._ledger = _LedgerState()
        self._wake = asyncio.Event()
        self._failing = False
        self.dropped = 0
        self.batches = 0
        # Set when [[forward]] is configured: its rows go in with the entries.
        self.outbox: Outbox | None = None

    @classmethod
    def open(cls, path: Path) -> Store:
        try:
            conn = connect(path)
            migrate(conn)
            # Checkpoints run on a thread of their own (_Checkpointer), never
            # inside a commit that answers wait for.
            conn.execute("PRAGMA wal_autocheckpoint=0")
            # The loop never waits for another connection's lock: see _commit.
            conn.execute("PRAGMA busy_timeout=0")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open entry store {path}: {exc}") from exc
        except OSError as exc:
            raise StoreError(f"cannot open entry store {path}: {exc.strerror}") from exc
        return cls(path, conn)

    @property
    def connection(self) -> sqlite3.Connection:
        """For start-up reads only; after that, use ``call`` (the store's thread)."""
        return self._conn

    @property
    def buffered(self) -> int:
        return len(self._pending)

    @property
    def healthy(self) -> bool:
        return not self._failing

    def load_ledger(self, policy: Policy, now: float | None = None) -> Ledger:
        """The ledger as the last run left it: uses, TOTP steps, lockout strikes, and
        what recent calls held to their attempts have decided."""
        now = time.time() if now is None else now
        try:
            return self._load_ledger(policy, now)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read the entry store {self.path}: {exc}") from exc

    def _load_ledger(self, policy: Policy, now: float) -> Ledger:
        ledger = Ledger.fresh(policy)
        conn = self._conn
        ledger.uses.update(conn.execute("SELECT credential_id, count FROM uses"))
        ledger.totp_last.update(conn.execute("SELECT credential_id, timecode FROM totp_steps"))
        # Stale: quiet for longer than Lockout._decay remembers, so the next
        # failure would start afresh anyway. The site's row is always kept.
        stale = now - policy.max_lock_seconds
        try:
            conn.execute(f"DELETE FROM strikes WHERE key != ? AND ({STALE})",  # noqa: S608
                         (SITE, stale))
        except sqlite3.Error as exc:
            # A full disk must not stop the gate starting: the query skips them.
            log.warning("stale strikes not pruned", path=str(self.path), error=str(exc))
        rows = conn.execute(
            "SELECT key, failures, locks, locked_until, last FROM strikes "  # noqa: S608
            f"WHERE key = ? OR NOT ({STALE}) "
            "ORDER BY key = ? DESC, locked_until > ? DESC, last DESC LIMIT ?",
            (SITE, stale, SITE, now, MAX_TRACKED + 1))
        for key, failures, locks, locked_until, last in rows:
            window = None
            if key == SITE:
                window = [t for (t,) in conn.execute(
                    "SELECT time FROM site_window WHERE time >= ? ORDER BY time",
                    (now - policy.site_window,))]
            ledger.lockout.restore(key, Strikes(failures, locks, locked_until, last), window)
        since = now - KEEP_CALLS
        try:
            conn.execute("DELETE FROM calls WHERE began < ?", (since,))
        except sqlite3.Error as exc:
            log.warning("old calls not pruned", path=str(self.path), error=str(exc))
        calls = conn.execute("SELECT id, began, decisions, opened FROM calls WHERE began >= ? "
                             "ORDER BY began DESC LIMIT ?", (since, MAX_CALLS)).fetchall()
        for call_id, began, decisions, opened in reversed(calls):
            ledger.calls[call_id] = Call(began, decisions, bool(opened))
        return ledger

    def submit(self, entry: Entry | None, changes: Changes | None,
               ledger: Ledger | None, *, line: EntryLine | None = None) -> asyncio.Future[bool]:
        """Queue an entry and the ledger changes behind it; the future says durable.

        ``line``: the entry's log line, written by the store's thread as the
        entry commits (and before the future says so), unless its call claims it
        first.
        """
        if changes is not None:
            self._ledger.note(changes, ledger)
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        if len(self._pending) >= BUFFER_LIMIT:
            # The oldest entry goes; a managed code's change never does (losing
            # a withdrawal would bring a revoked code back at the next start),
            # nor does the ledger state behind an entry: that is not held here.
            lost = next((item for item in self._pending
                         if item.code is None and item.route is None), None)
            if lost is not None:
                self._pending.remove(lost)
                self.dropped += 1
                if lost.done is not None and not lost.done.done():
                    lost.done.set_result(False)
        self._pending.append(_Pending(entry, done, line=line))
        self._wake.set()
        return done

    def submit_alarm(self, alarm: dict[str, Any]) -> None:
        """Queue an alarm for the forward outbox (nothing else stores alarms)."""
        if len(self._pending) >= BUFFER_LIMIT:
            self.dropped += 1  # the disk is failing: the buffer is for entries first
            return
        self._pending.append(_Pending(None, None, alarm=alarm))
        self._wake.set()

    def save_code(self, scope: str, code_id: str, body: bytes | None) -> asyncio.Future[bool]:
        """Keep (or, with ``body`` None, forget) the local copy of one managed code."""
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(None, done, (scope, code_id, body)))
        self._wake.set()
        return done

    def save_route(self, scope: str, route_id: str, body: bytes | None) -> asyncio.Future[bool]:
        """Keep (or, with ``body`` None, forget) the local copy of one managed route."""
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(None, done, route=(scope, route_id, body)))
        self._wake.set()
        return done

    def load_routes(self) -> list[tuple[str, str, bytes]]:
        """The local copy of managed routes: (scope, id, body), oldest first."""
        rows = self._conn.execute("SELECT scope, id, body FROM managed_routes ORDER BY updated")
        return [(scope, route_id, bytes(body)) for scope, route_id, body in rows]

    def load_codes(self) -> list[tuple[str, str, bytes]]:
        """The local copy of managed codes: (scope, id, body), oldest first."""
        rows = self._conn.execute("SELECT scope, id, body FROM managed_codes ORDER BY updated")
        return [(scope, code_id, bytes(body)) for scope, code_id, body in rows]

    async def run(self) -> None:
        """The writer: drain what is pending in one transaction, repeat."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending or self._ledger:
                batch = list(self._pending)
                # Taken with the entries: an entry reported durable has its
                # ledger changes written in the same transaction.
                ledger, self._ledger = self._ledger, _LedgerState()
                try:
                    forwarded = await self._commit([*batch, _Pending(None, None, ledger=ledger)])
                except (sqlite3.Error, OSError) as exc:
                    self._ledger.after(ledger)
                    # Not durable now, and nobody should wait for the disk to
                    # come back: the items stay pending and are written then.
                    for item in batch:
                        if item.done is not None and not item.done.done():
                            item.done.set_result(False)
                    if not self._failing:
                        self._failing = True
                        alarms.alarm(log, "store_failing",
                                     "entry store failing; holding entries in memory",
                                     level="error", path=str(self.path), error=str(exc))
                    await asyncio.sleep(RETRY_SECONDS)
                    continue
                if self._failing:
                    self._failing = False
                    alarms.alarm(log, "store_recovered", "entry store writable again",
                                 path=str(self.path), flushed=len(batch))
                # Not popleft per item: the buffer limit may have dropped
                # some of this batch's oldest items meanwhile.
                written = {id(item) for item in batch}
                self._pending = deque(i for i in self._pending if id(i) not in written)
                self.batches += 1
                # Before the answers go (they wait for the futures): each line is
                # out before its call's answer, as when the call wrote it, and
                # the batch's lines in one write.
                lines = [entry_fields(item.entry, True) for item in batch
                         if item.entry is not None and item.line is not None
                         and item.line.claim()]
                if lines:
                    logs.entries(lines)
                for item in batch:
                    if item.done is not None and not item.done.done():
                        item.done.set_result(True)
                if forwarded and self.outbox is not None:
                    self.outbox.written(forwarded)

    async def _commit(self, batch: Sequence[_Pending]) -> set[str]:
        """Write ``batch`` in one transaction; the forward endpoints it queued rows for.

        The statements run here, on the loop: a batch's inserts are work in
        memory (its pages are written at the commit) and cost the loop less
        than handing the interpreter lock to and fro with a thread for each.
        The commit, whose fsync may take as long as the disk likes, runs on
        the store's thread, and the loop answers other calls meanwhile.
        """
        if self._worker.running:
            await self._worker.quiet.wait()  # the thread still has the connection
        conn = self._conn
        try:
            # Never wait for another connection's lock here, on the loop: the
            # thread waits for it instead (busy_timeout) and writes it all.
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY:
                raise
            self._staged = None
        else:
            try:
                self._staged = self._statements(batch)
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        forwarded: set[str] = await self._worker.run(self._write, batch)
        return forwarded

    def _statements(self, batch: Sequence[_Pending]) -> set[str]:
        """The batch's statements, in the transaction begun; the forward endpoints.

        A statement per table for the whole batch: whichever thread runs them,
        SQLite lets go of the interpreter lock for each statement it steps
        (see _insert). The ledger state holds one (the latest) value per key.
        """
        entries = [item.entry for item in batch if item.entry is not None]
        forwards: list[tuple[Any, ...]] = []
        if self.outbox is not None:
            # In the same transaction: an answered call's forward is as
            # durable as its entry, and never sent for an entry not kept.
            forwards = self.outbox.rows(
                entries, [item.alarm for item in batch if item.alarm is not None])
        conn = self._conn
        _insert(conn, ENTRIES_HEAD, list(map(_entry_row, entries)))
        _insert(conn, INSERT_OUTBOX, forwards)
        for item in batch:
            if item.ledger is not None:
                _write_ledger(conn, item.ledger)
        for item in batch:
            for table, copy in (("managed_codes", item.code), ("managed_routes", item.route)):
                if copy is not None:
                    _keep_copy(conn, table, *copy)
        return {row[0] for row in forwards}

    def _write(self, batch: Sequence[_Pending]) -> set[str]:
        """On the store's thread: commit the batch the loop staged, or, when another
        connection held the lock, wait for it and write the batch whole."""
        conn = self._conn
        forwarded = self._staged
        try:
            if forwarded is None:
                conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
                try:
                    conn.execute("BEGIN IMMEDIATE")
                finally:
                    conn.execute("PRAGMA busy_timeout=0")
                forwarded = self._statements(batch)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        finally:
            self._staged = None
        self._commits += 1
        if self._commits >= CHECKPOINT_COMMITS:
            self._commits = 0
            self._checkpointer.request()
        return forwarded

    async def flush(self, within: float = 5.0) -> bool:
        """Wait until everything pending is written (or ``within`` seconds pass)."""
        deadline = time.monotonic() + within
        while (self._pending or self._ledger) and time.monotonic() < deadline:
            self._wake.set()
            await asyncio.sleep(0.01)
        return not (self._pending or self._ledger)

    async def call(self, function: Any, *args: Any) -> Any:
        """Run ``function(connection, *args)`` on the store's own thread."""
        return await self._worker.run(self._waiting, function, *args)

    def _waiting(self, function: Any, *args: Any) -> Any:
        # Off the loop, waiting for another connection's lock costs no answer.
        conn = self._conn
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        try:
            return function(conn, *args)
        finally:
            conn.execute("PRAGMA busy_timeout=0")

    def close(self) -> None:
        self._checkpointer.stop()
        self._worker.stop()
        self._conn.close()


# A strikes row the lockout has forgotten or would start afresh (Lockout._decay):
# quiet since before ? (now - max_lock_seconds), or cleared by a success.
STALE = "max(last, locked_until) < ? OR (failures = 0 AND locks = 0)"


def _delete(conn: sqlite3.Connection, table: str, column: str, keys: Sequence[str]) -> None:
    """Delete the rows whose ``column`` is one of ``keys``, a statement per chunk (see _insert)."""
    for start in range(0, len(keys), ROWS_PER_STATEMENT):
        chunk = keys[start:start + ROWS_PER_STATEMENT]
        # ``table`` and ``column`` are constants; the keys are bound.
        conn.execute(f"DELETE FROM {table} WHERE {column} IN "  # noqa: S608
                     f"({', '.join('?' * len(chunk))})", chunk)


def _write_ledger(conn: sqlite3.Connection, state: _LedgerState) -> None:
    _insert(conn, "INSERT INTO uses (credential_id, count)", list(state.uses.items()),
            " ON CONFLICT(credential_id) DO UPDATE SET count = excluded.count")
    _insert(conn, "INSERT INTO totp_steps (credential_id, timecode)", list(state.totp.items()),
            " ON CONFLICT(credential_id) DO UPDATE SET timecode = excluded.timecode")
    if state.strikes:
        _insert(conn, "INSERT OR REPLACE INTO strikes (key, failures, locks, locked_until, last)",
                [(k, s.failures, s.locks, s.locked_until, s.last)
                 for k, s in state.strikes.items() if s is not None])
        _delete(conn, "strikes", "key", [k for k, s in state.strikes.items() if s is None])
    if state.calls:
        _insert(conn, "INSERT OR REPLACE INTO calls (id, began, decisions, opened)",
                [(k, c.began, c.decisions, int(c.opened)) for k, c in state.calls.items()
                 if c is not None])
        _delete(conn, "calls", "id", [k for k, c in state.calls.items() if c is None])
    if state.reset:
        conn.execute("DELETE FROM site_window")
    _insert(conn, "INSERT INTO site_window (time)", [(t,) for t in state.window])
    if state.floor is not None and (state.window or state.reset):
        conn.execute("DELETE FROM site_window WHERE time < ?", (state.floor,))


@dataclass(frozen=True, slots=True)
class Lock:
    """One stored lock: a caller number (or lockout.SITE) locked until ``until``."""

    key: str
    until: float
    locks: int
    failures: int


def read_locks(conn: sqlite3.Connection, now: float) -> list[Lock]:
    """The locks in force at ``now``, the site's first, then the longest."""
    rows = conn.execute(
        "SELECT key, locked_until, locks, failures FROM strikes WHERE locked_until > ? "
        "ORDER BY key = ? DESC, locked_until DESC", (now, SITE))
    return [Lock(*row) for row in rows]


def clear_lock(conn: sqlite3.Connection, key: str, entry: Entry) -> bool:
    """Clear one lock by hand, record ``entry``, and ask a running daemon to follow.

    The stored strikes go at once (a daemon started later starts clear); the
    request row is what a running daemon reads. False when nothing was locked.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        locked = conn.execute("SELECT 1 FROM strikes WHERE key = ? AND locked_until > ?",
                              (key, entry.time)).fetchone() is not None
        if locked:
            conn.execute("DELETE FROM strikes WHERE key = ?", (key,))
            if key == SITE:
                conn.execute("DELETE FROM site_window")
            conn.execute("INSERT INTO lockout_clears (key, time) VALUES (?, ?)",
                         (key, entry.time))
            conn.execute(INSERT_ENTRY, _entry_row(entry))
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return locked


def last_clear(conn: sqlite3.Connection) -> int:
    """The newest lock-clearing request's id (0: none yet)."""
    return int(conn.execute("SELECT coalesce(max(id), 0) FROM lockout_clears").fetchone()[0])


def clears_after(conn: sqlite3.Connection, after: int) -> list[tuple[int, str]]:
    """Lock-clearing requests newer than ``after``: (id, key), oldest first."""
    return list(conn.execute("SELECT id, key FROM lockout_clears WHERE id > ? ORDER BY id",
                             (after,)))


def data_version(conn: sqlite3.Connection) -> int:
    """Changes whenever another connection (a `gated codes` command) commits."""
    return int(conn.execute("PRAGMA data_version").fetchone()[0])


def prune_visitors(conn: sqlite3.Connection, before: float) -> int:
    return conn.execute("DELETE FROM visitors WHERE valid_until < ?", (before,)).rowcount


VISITOR_COLUMNS = ("id", "digest", "name", "gates", "valid_from", "valid_until", "max_uses",
                   "callers", "callername", "destination", "created")


@dataclass(frozen=True, slots=True)
class VisitorRow:
    """A visitor code as stored: the keyed digest, never the digits."""

    id: str
    digest: bytes
    name: str
    gates: tuple[str, ...]
    valid_from: float | None
    valid_until: float
    max_uses: int | None
    callers: tuple[str, ...] = ()
    callername: str = ""
    destination: str = ""
    created: float = 0.0

    def values(self) -> tuple[Any, ...]:
        return (self.id, self.digest, self.name, json.dumps(list(self.gates)), self.valid_from,
                self.valid_until, self.max_uses, json.dumps(list(self.callers)),
                self.callername, self.destination, self.created)

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> VisitorRow:
        (id_, digest, name, gates, valid_from, valid_until, max_uses, callers, callername,
         destination, created) = row
        return cls(id_, bytes(digest), name, tuple(json.loads(gates)), valid_from, valid_until,
                   max_uses, tuple(json.loads(callers)), callername, destination, created)


def add_visitor(conn: sqlite3.Connection, row: VisitorRow) -> bool:
    """Store a visitor code; False when its digits are already a visitor code."""
    try:
        conn.execute(
            f"INSERT INTO visitors ({', '.join(VISITOR_COLUMNS)}) "  # noqa: S608 (constant columns)
            f"VALUES ({', '.join('?' * len(VISITOR_COLUMNS))})", row.values())
    except sqlite3.IntegrityError:
        return False
    return True


def load_visitors(conn: sqlite3.Connection) -> list[VisitorRow]:
    rows = conn.execute(f"SELECT {', '.join(VISITOR_COLUMNS)} FROM visitors")  # noqa: S608
    return [VisitorRow.from_row(row) for row in rows]


def query_entries(conn: sqlite3.Connection, *, since: float | None = None,
                  gate: str | None = None, status: str | None = None,
                  before: int | None = None, limit: int = 50) -> list[tuple[int, Entry]]:
    """Newest entries first, with their row ids (``before``: only older rows than that
    id), for `gated log` and the staff page's log."""
    # A store the daemon has not migrated yet (read-only here) lacks the newer
    # columns: they read as empty.
    present = {row[1] for row in conn.execute("PRAGMA table_info(entries)")}
    columns = ", ".join(c if c in present else "''" for c in ENTRY_COLUMNS)
    sql = f"SELECT id, {columns} FROM entries WHERE 1=1"  # noqa: S608 (constant columns)
    args: list[Any] = []
    for clause, value in (("gate = ?", gate), ("status = ?", status), ("id < ?", before),
                          ("time >= ?", since)):
        if value is not None:
            sql += f" AND {clause}"
            args.append(value)
    # By time when bounded by it, so SQLite walks the time index, not every row.
    sql += f" ORDER BY {'time' if since is not None else 'id'} DESC LIMIT ?"
    args.append(limit)
    return [(row[0], Entry(*row[1:])) for row in conn.execute(sql, args)]


def read_entries(path: Path, *, since: float | None = None, gate: str | None = None,
                 limit: int = 50) -> list[Entry]:
    """Newest entries first, for ``gated log``; opens the store read-only."""
    if not path.exists():
        raise StoreError(f"no entry store at {path} (has the daemon run yet?)")
    try:
        conn = connect(path, readonly=True)
        try:
            return [entry for _, entry in query_entries(conn, since=since, gate=gate,
                                                        limit=limit)]
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read entry store {path}: {exc}") from exc


