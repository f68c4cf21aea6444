"""Sessions of the staff page, in SQLite in the state directory.

The cookie holds a random token; the table holds only its SHA-256, so a copy
of the file opens no session. Each session carries its own CSRF token and
the user's ``changed`` stamp when it began: a new password ends it.
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from gated.book import files


@dataclass(frozen=True, slots=True)
class Session:
    user: str
    csrf: str
    stamp: float
    expires: float


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


class Sessions:
    def __init__(self, path: Path) -> None:
        files.make_dir(path.parent)
        files.refuse_link(path)
        files.create_private(path)
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute(
            "CREATE TABLE IF NOT EXISTS sessions (digest BLOB PRIMARY KEY, user TEXT NOT NULL,"
            " csrf TEXT NOT NULL, stamp REAL NOT NULL, expires REAL NOT NULL)")

    def start(self, user: str, stamp: float, now: float, hours: float) -> tuple[str, Session]:
        """A new session's cookie token and the session."""
        token = secrets.token_urlsafe(32)
        session = Session(user, secrets.token_urlsafe(32), stamp, now + hours * 3600)
        self.conn.execute("DELETE FROM sessions WHERE expires < ?", (now,))
        self.conn.execute("INSERT INTO sessions VALUES (?, ?, ?, ?, ?)",
                          (_digest(token), user, session.csrf, stamp, session.expires))
        return token, session

    def find(self, token: str, now: float) -> Session | None:
        row = self.conn.execute("SELECT user, csrf, stamp, expires FROM sessions "
                                "WHERE digest = ?", (_digest(token),)).fetchone()
        if row is None or row[3] <= now:
            return None
        return Session(*row)

    def end(self, token: str) -> None:
        self.conn.execute("DELETE FROM sessions WHERE digest = ?", (_digest(token),))

    def end_all(self, user: str) -> int:
        return self.conn.execute("DELETE FROM sessions WHERE user = ?", (user,)).rowcount

    def close(self) -> None:
        self.conn.close()


def sessions_path(state_dir: Path) -> Path:
    return state_dir / "web-sessions.db"
