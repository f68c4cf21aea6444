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

State files (the store, the site and fleet keys, the compiled book, sets,
locks) are never opened or replaced through a symbolic link: the daemon's
user can make links in its own folder, and a staff command run as root
would otherwise write (or read) whatever file a link names. Only the config,
which staff own and may well keep as a link into a release folder, is
written through its link.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

from gated.core.errors import GatedError

# Long enough to queue behind another staff command; short enough that a
# lock left by a killed one is reported instead of hanging the terminal.
LOCK_WAIT = 10.0
_POLL = 0.02
FILE_MODE = 0o600
DIR_MODE = 0o700


class FileError(GatedError):
    """A file could not be replaced or made; the old one, if any, is unchanged."""


def _linked(path: Path) -> str:
    return (f"{path} is a symbolic link; state files are never opened through one "
            f"(someone made it: find out who, then remove it: rm {path})")


def refuse_link(path: Path) -> None:
    """Raise FileError when ``path`` is a symbolic link (it may be missing)."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISLNK(os.lstat(path).st_mode):
            raise FileError(_linked(path))


def open_state(path: Path) -> int:
    """Open a state file to read, never through a symbolic link, and only a plain
    file (a FIFO put in its place would hang the reader): FileError says why."""
    try:
        # O_NONBLOCK: opening a FIFO returns at once instead of waiting for a writer.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise FileError(_linked(path)) from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise FileError(f"{path} is not a plain file")
    return fd


def lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


def open_flock(path: Path) -> int:
    """The descriptor of ``<path>.flock`` (made 0600 and owned like its folder), for
    an ``fcntl.flock`` that puts changes to ``path`` one after another.

    Not ``<path>.lock``: that name is the replacement's own (``replacing``). Made
    by a root command, it is still the folder owner's, so the daemon and staff's
    own commands can open it after. The kernel drops an flock with its holder, so a
    killed command leaves none behind. FileError says why it cannot be opened.
    """
    lock = path.with_name(path.name + ".flock")
    try:
        make_dir(path.parent)
        create_private(lock)
        return os.open(lock, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise FileError(_linked(lock)) from None
        raise FileError(f"cannot open {lock}: {_reason(exc)}") from None


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
    """Create ``path`` empty, 0600 and owned like its folder; False if it exists.

    FileError if it is a symbolic link: what uses the file next must not open it.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     FILE_MODE)
    except FileExistsError:
        refuse_link(path)
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

    def __init__(self, path: Path, lock: Path, fd: int, *, private: bool = True) -> None:
        self.path = path
        self.lock = lock
        self._fd = fd
        self.private = private  # a state file: 0600 and its folder's owner's, always
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
        if self.private:
            # A link put there while the lock was being taken is refused; an old
            # file of another owner or mode gets a right one in its place.
            try:
                refuse_link(self.path)
            except FileError as exc:
                raise FileError(f"{self.path} not changed: {exc}") from None
            self._make_private()
            return
        try:
            old = self.path.stat()
        except FileNotFoundError:
            self._make_private()
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

    def _make_private(self) -> None:
        os.fchmod(self._fd, FILE_MODE)
        owner = owner_for(self.path.parent)
        if owner is not None:
            os.fchown(self._fd, *owner)


@contextlib.contextmanager
def replacing(path: Path, *, wait: float | None = None,
              through_link: bool = False) -> Iterator[Replacement]:
    """Hold ``path``'s lock for a read-change-commit; uncommitted, nothing changes.

    Read the file inside the block: what another command wrote while this one
    waited for the lock is then part of what this one changes.

    A state file (the default) that is a symbolic link, or whose lock is, is
    refused (FileError), and its new content is 0600 and its folder owner's.
    ``through_link`` (the config alone) replaces the file a link names, with
    the old file's owner and mode.
    """
    if through_link:
        # Renaming over the link would replace the link with a copy.
        path = Path(os.path.realpath(path))
    else:
        try:
            refuse_link(path)
        except FileError as exc:
            raise FileError(f"{path} not changed: {exc}") from None
    lock = lock_path(path)
    deadline = time.monotonic() + (LOCK_WAIT if wait is None else wait)
    while True:
        try:
            # O_EXCL never follows a link; O_NOFOLLOW says so once more.
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, FILE_MODE)
            break
        except FileExistsError:
            try:
                refuse_link(lock)
            except FileError as exc:
                raise FileError(f"{path} not changed: {exc}") from None
            if time.monotonic() >= deadline:
                raise FileError(f"{path} not changed: another command holds {lock}; try again, "
                                "or delete that file if no gated command is running") from None
            time.sleep(_POLL)
        except OSError as exc:
            raise FileError(f"{path} not changed: cannot create {lock}: "
                            f"{_reason(exc)}") from exc
    replacement = Replacement(path, lock, fd, private=not through_link)
    try:
        yield replacement
    finally:
        os.close(fd)
        if not replacement.committed:
            with contextlib.suppress(OSError):
                lock.unlink()


def replace(path: Path, data: bytes | bytearray) -> None:
    """Replace (or create) the state file ``path`` with ``data`` under its lock."""
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
