"""Files a site depends on (config, site key, state): replaced whole, made private.

A file is replaced the way git replaces its index: ``<file>.lock`` is created
with O_EXCL, and that one file is both the lock (a second writer waits a
little, then refuses) and the new content. It is written, fsynced, renamed
over the file and the folder fsynced, so a reader sees the old file or the new
one, never half of either; any failure leaves the old file as it was.

Files and folders gated makes are private (0600, 0700) whatever the umask.
Run as root in a folder that belongs to someone else (``sudo gated codes
issue`` in ``/var/lib/gated``), it gives what it makes to that owner, so the
daemon's user can still write its store and read its key.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

from gated.errors import GatedError

# Long enough to queue behind another staff command; short enough that a
# lock left by a killed one is reported instead of hanging the terminal.
LOCK_WAIT = 10.0
_POLL = 0.02
FILE_MODE = 0o600
DIR_MODE = 0o700


class FileError(GatedError):
    """A file could not be replaced or made; the old one, if any, is unchanged."""


def lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


def owner_for(directory: Path) -> tuple[int, int] | None:
    """Who new files in ``directory`` should belong to, when that is not us.

    Only root can give a file away, and only root needs to: a file root makes
    in the daemon's folder would be one the daemon cannot open.
    """
    if os.geteuid() != 0:
        return None
    try:
        info = directory.stat()
    except OSError:
        return None
    return None if info.st_uid == 0 else (info.st_uid, info.st_gid)


def make_dir(directory: Path) -> None:
    """Create ``directory`` (and missing parents) 0700, owned like its parent."""
    missing = []
    for folder in (directory, *directory.parents):
        if folder.exists():
            break
        missing.append(folder)
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=DIR_MODE)
        except FileExistsError:
            continue
        os.chmod(folder, DIR_MODE)  # the umask may have taken bits the mode asked for
        owner = owner_for(folder.parent)
        if owner is not None:
            os.chown(folder, *owner)
        # Else a power cut could lose the folder, and with it a new site key.
        with contextlib.suppress(OSError):
            fsync_dir(folder.parent)


def create_private(path: Path) -> bool:
    """Create ``path`` empty, 0600 and owned like its folder; False if it exists."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    except FileExistsError:
        return False
    try:
        os.fchmod(fd, FILE_MODE)
        owner = owner_for(path.parent)
        if owner is not None:
            os.fchown(fd, *owner)
    finally:
        os.close(fd)
    return True


class Replacement:
    """The held lock on one file; ``commit`` puts new content in its place."""

    def __init__(self, path: Path, lock: Path, fd: int) -> None:
        self.path = path
        self.lock = lock
        self._fd = fd
        self.committed = False

    def commit(self, data: bytes | bytearray) -> None:
        """Write ``data`` as the file's new content, atomically and durably."""
        try:
            self._keep_owner_and_mode()
            view = memoryview(data)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            os.fsync(self._fd)
            os.rename(self.lock, self.path)
        except OSError as exc:
            raise FileError(f"{self.path} not changed: {_reason(exc)}") from exc
        self.committed = True
        with contextlib.suppress(OSError):  # renamed: a failure here loses nothing
            fsync_dir(self.path.parent)

    def _keep_owner_and_mode(self) -> None:
        try:
            old = self.path.stat()
        except FileNotFoundError:
            os.fchmod(self._fd, FILE_MODE)
            owner = owner_for(self.path.parent)
            if owner is not None:
                os.fchown(self._fd, *owner)
            return
        os.fchmod(self._fd, stat.S_IMODE(old.st_mode))
        uid = old.st_uid if old.st_uid != os.geteuid() else -1
        gid = old.st_gid if old.st_gid != os.getegid() else -1
        if uid != -1 or gid != -1:
            try:
                os.fchown(self._fd, uid, gid)
            except PermissionError as exc:
                # The file would change hands, and its readers (the daemon's
                # group) might lose it: refuse rather than replace.
                raise FileError(f"{self.path} not changed: it belongs to uid {old.st_uid} "
                                f"gid {old.st_gid}, which this user cannot give a file to; "
                                "run it as root or as that user") from exc


@contextlib.contextmanager
def replacing(path: Path, *, wait: float | None = None) -> Iterator[Replacement]:
    """Hold ``path``'s lock for a read-change-commit; uncommitted, nothing changes.

    Read the file inside the block: what another command wrote while this one
    waited for the lock is then part of what this one changes.
    """
    # Through a symlink to the file it names: renaming over the link would
    # replace the link with a copy.
    path = Path(os.path.realpath(path))
    lock = lock_path(path)
    deadline = time.monotonic() + (LOCK_WAIT if wait is None else wait)
    while True:
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
            break
        except FileExistsError:
            if time.monotonic() >= deadline:
                raise FileError(f"{path} not changed: another command holds {lock}; try again, "
                                "or delete that file if no gated command is running") from None
            time.sleep(_POLL)
        except OSError as exc:
            raise FileError(f"{path} not changed: cannot create {lock}: "
                            f"{_reason(exc)}") from exc
    replacement = Replacement(path, lock, fd)
    try:
        yield replacement
    finally:
        os.close(fd)
        if not replacement.committed:
            with contextlib.suppress(OSError):
                lock.unlink()


def replace(path: Path, data: bytes | bytearray) -> None:
    """Replace (or create) ``path`` with ``data`` under its lock."""
    with replacing(path) as replacement:
        replacement.commit(data)


def chown_fix(path: Path, target: str = "") -> str:
    """How to give ``path`` (or ``target``, a shell pattern) to the user running this."""
    try:
        owner = user_name(path.stat().st_uid)
    except OSError:
        owner = "someone else"
    me = user_name(os.geteuid())
    return f"it belongs to {owner}; as root: chown {me}: {target or path}"


def user_name(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _reason(exc: OSError) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "the disk is full"
    if exc.errno == errno.EFBIG:
        return "the file would exceed the size this process may write"
    return exc.strerror or str(exc)
