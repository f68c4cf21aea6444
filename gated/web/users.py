"""The staff page's users: a name, a role and an argon2id hash, in the state directory.

The file is replaced atomically (``gated.book.files``) and read again by the
daemon whenever it changes, so ``gated users`` works while the daemon runs.
Every change (the page's ``/users``, ``gated users``) is a read-change-write
under an flock on ``users.json.flock`` (``update``): two at once take turns,
and neither writes over the other's change with what it read before it.
A user's ``changed`` stamp is part of every session made for them: a new
password or a new role ends every session of that user.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import re
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeVar, cast

from gated.book import files
from gated.core.errors import GatedError

if TYPE_CHECKING:
    from argon2 import PasswordHasher

Role = Literal["admin", "staff", "viewer"]
ROLES: tuple[Role, ...] = ("viewer", "staff", "admin")
NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,31}")
MIN_PASSWORD = 10
MAX_PASSWORD = 1024
# argon2-cffi's defaults are RFC 9106's low-memory profile (argon2id, 64 MiB).
# Made at the first use, not at import: the command line imports this module for
# every command, and `gated run` on a site without a staff page neither loads
# argon2 nor makes a hash (~170 ms and 64 MiB at each start).
@functools.cache
def _hasher() -> PasswordHasher:
    from argon2 import PasswordHasher

    return PasswordHasher()


@functools.cache
def _dummy() -> str:
    """Checked when the name is unknown, so a failed login takes as long either way."""
    return _hasher().hash(secrets.token_hex(16))


class UserError(GatedError):
    """A user could not be added or changed."""


@dataclass(frozen=True, slots=True)
class User:
    name: str
    role: Role
    hash: str
    changed: float

    def may(self, role: Role) -> bool:
        """Whether this user holds ``role`` or a higher one."""
        return ROLES.index(self.role) >= ROLES.index(role)


def users_path(state_dir: Path) -> Path:
    return state_dir / "users.json"


def check_name(name: str) -> str:
    if not NAME.fullmatch(name):
        raise UserError(f"user names are 1-32 of a-z, 0-9, '.', '_' and '-': not {name!r}")
    return name


def check_password(password: str) -> str:
    if not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        raise UserError(f"a password has {MIN_PASSWORD} to {MAX_PASSWORD} characters")
    return password


def load(path: Path) -> dict[str, User]:
    """Every user in the file; none when there is no file yet."""
    files.refuse_link(path)
    try:
        raw = json.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from exc
    found: dict[str, User] = {}
    for name, item in raw.get("users", {}).items():
        if item.get("role") in ROLES and isinstance(item.get("hash"), str):
            found[name] = User(name, cast(Role, item["role"]), item["hash"],
                               float(item.get("changed", 0.0)))
    return found


def save(path: Path, users: dict[str, User]) -> None:
    body = {"users": {u.name: {"role": u.role, "hash": u.hash, "changed": u.changed}
                      for u in sorted(users.values(), key=lambda u: u.name)}}
    files.make_dir(path.parent)
    files.replace(path, (json.dumps(body, indent=1) + "\n").encode())


@contextlib.contextmanager
def one_at_a_time(path: Path) -> Iterator[None]:
    """Hold the users file's lock (blocking: in the daemon, only ever in a thread).

    The lock is ``files.open_flock``'s, beside the file.
    """
    try:
        fd = files.open_flock(path)
    except files.FileError as exc:
        raise UserError(str(exc)) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # and with it the lock


T = TypeVar("T")


def update(path: Path, change: Callable[[dict[str, User]], T]) -> T:
    """Read the users, ``change`` them and write them, all under the file's lock.

    ``change`` sees the file as it is now, whatever another writer did meanwhile,
    and raises to change nothing.
    """
    with one_at_a_time(path):
        users = load(path)
        result = change(users)
        save(path, users)
        return result


def make_stamp() -> float:
    # Stamped to the microsecond and never equal to the one it replaces.
    return time.time() + secrets.randbelow(1000) / 1e9


def make(name: str, role: Role, password: str) -> User:
    return User(check_name(name), role, _hasher().hash(check_password(password)), make_stamp())


def verify(user: User | None, password: str) -> bool:
    """Slow on purpose (argon2id), and as slow for a name that does not exist."""
    from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

    try:
        return _hasher().verify(user.hash if user else _dummy(), password[:MAX_PASSWORD]) and (
            user is not None)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


class UserFile:
    """The users file as the daemon sees it: read again whenever it changed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._users: dict[str, User] = {}

    def current(self) -> dict[str, User]:
        try:
            st = self.path.stat()
            stamp: tuple[int, int, int] | None = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            stamp = None
        if stamp != self._stamp:
            try:
                self._users = load(self.path) if stamp is not None else {}
            except (UserError, files.FileError):
                self._users = {}  # an unreadable file lets nobody in
            self._stamp = stamp
        return self._users

    def get(self, name: str) -> User | None:
        return self.current().get(name)
