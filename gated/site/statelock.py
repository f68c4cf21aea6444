"""One daemon per state: an exclusive flock on a lock file beside the entry store.

Two daemons on one store both admitted a single-use code, and sharing the
site's MQTT client id they knocked each other off the broker without end.
The lock is taken before anything touches a pin, the store or the broker,
and held for the daemon's life; ``gated pulse`` takes it too, so it never
fights a running daemon for a relay. The kernel drops it when its holder
exits, however that happens: a crash leaves nothing stale behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from gated.book import files
from gated.core.errors import StoreError


def lock_path(store: Path) -> Path:
    return files.lock_path(store)


class Held(StoreError):
    """Another process holds the lock."""


class StateLock:
    """Held until ``release`` (or the process ends)."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None


def hold(store: Path) -> StateLock:
    """Take the lock of the state ``store`` belongs to, or raise StoreError in one line."""
    path = lock_path(store)
    try:
        # Private and, made by root, the state directory owner's: as the store.
        files.make_dir(path.parent)
        files.create_private(path)
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except files.FileError as exc:
        raise StoreError(f"cannot open the state lock: {exc}") from None
    except OSError as exc:
        raise StoreError(f"cannot open the state lock {path}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = b""
        with contextlib.suppress(OSError):
            holder = os.read(fd, 32).strip()
        os.close(fd)
        pid = f" (pid {holder.decode()})" if holder.isdigit() else ""
        raise Held(f"another gated process{pid} holds {path} (one gated per state "
                   "directory): stop it first") from None
    except OSError as exc:
        os.close(fd)
        raise StoreError(f"cannot lock {path}: {exc.strerror}") from None
    # The holder's pid, for the message a second one gives; only a hint; the
    # flock is the lock.
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return StateLock(path, fd)
