"""Store and site key: private whatever the umask, and usable by the daemon's user
even when a staff command ran as root first."""

from __future__ import annotations

import codecs
import contextlib
import os
import shutil
import sqlite3
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# Loaded before any fork: the child that is nobody may not read this checkout
# (nor, here, the interpreter's own library).
from gated.book import sitekey
from gated.cli import main
from gated.commands import doctor
from gated.site import statelock
from gated.site.store import Store, connect, migrate

from .helpers import config_text

NOBODY = 65534
codecs.lookup("ascii")  # the site key's encoding, cached before any fork


@pytest.fixture
def site() -> Iterator[Path]:
    """A config beside a state directory that belongs to ``nobody``, as the daemon's user.

    Outside pytest's own temporary folder, which only root may enter.
    """
    top = Path(tempfile.mkdtemp(prefix="gated-state-"))
    try:
        top.chmod(0o755)
        state = top / "state"
        state.mkdir(mode=0o700)
        os.chown(state, NOBODY, NOBODY)
        (top / "gated.toml").write_text(config_text(top))
        (top / "gated.toml").chmod(0o644)
        yield top
    finally:
        shutil.rmtree(top)


def as_nobody(action: Callable[[], str], timeout: float = 20.0) -> str:
    """Run ``action`` in a forked child that is ``nobody``; what it returned or raised.

    A fork, not a new interpreter: the child runs code this process has already
    imported, so the test also passes in a checkout only root can read.
    """
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        status = 1
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            try:
                said = action()
                status = 0
            except BaseException as exc:
                said = f"{type(exc).__name__}: {exc}"
            os.write(write, said.encode())
        finally:
            os._exit(status)
    os.close(write)
    deadline = time.monotonic() + timeout
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            os.close(read)
            raise AssertionError(f"still running after {timeout:g}s as nobody")
        time.sleep(0.05)
    with os.fdopen(read, "rb") as pipe:
        return pipe.read().decode()


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def test_a_root_staff_command_leaves_the_store_and_key_to_the_daemons_user(
        site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``sudo gated codes issue`` before the daemon's first start makes a store and key
    that are the state directory owner's and private (0600), even with umask 0."""
    with umask(0):
        assert main(["-c", str(site / "gated.toml"), "codes", "issue", "--name", "Visitor",
                     "--gates", "barrier"]) == 0
    capsys.readouterr()
    state = site / "state"
    made = sorted(p.name for p in state.iterdir())
    assert "entries.sqlite3" in made and "site.key" in made
    # Open again as root: SQLite's -wal and -shm files follow the store's owner and mode.
    with umask(0):
        conn = connect(state / "entries.sqlite3")
    try:
        conn.execute("INSERT INTO uses VALUES ('y', 1)")
        made = sorted(p.name for p in state.iterdir())
        assert "entries.sqlite3-wal" in made and "entries.sqlite3-shm" in made
        for name in made:
            info = (state / name).stat()
            assert (info.st_uid, info.st_gid) == (NOBODY, NOBODY), name
            assert stat.S_IMODE(info.st_mode) == 0o600, name
    finally:
        conn.close()

    def daemon_start() -> str:
        key = sitekey.read_key(state / "site.key")
        store = Store.open(state / "entries.sqlite3")
        try:
            store.connection.execute("INSERT INTO uses VALUES ('x', 1)")
        finally:
            store.close()
        return f"key {len(key or b'')} bytes, store written"

    assert as_nobody(daemon_start) == "key 32 bytes, store written"


def test_a_fresh_state_directory_is_private(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """The state directory gated makes is 0700, whatever the umask."""
    config = tmp_path / "gated.toml"
    config.write_text(config_text(tmp_path))
    with umask(0):
        assert main(["-c", str(config), "codes", "issue", "--name", "Visitor",
                     "--gates", "barrier"]) == 0
    capsys.readouterr()
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700


async def test_the_daemons_own_first_start_makes_private_state(start_daemon: Any) -> None:
    """The daemon's first start makes its state directory 0700 and its store, key and
    state lock 0600, whatever the umask."""
    with umask(0):
        running = await start_daemon()
    state = running.daemon.loaded.store_path.parent
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    for name in ("entries.sqlite3", "entries.sqlite3.lock", "site.key"):
        assert stat.S_IMODE((state / name).stat().st_mode) == 0o600, name


def test_a_state_lock_root_takes_first_stays_the_daemons(tmp_path: Path) -> None:
    """`sudo gated pulse` or a daemon run once as root, in the daemon's own state
    directory: the lock file it leaves is the directory owner's, so the daemon can
    still open it, and no one else can read it."""
    state = tmp_path / "state"
    state.mkdir()
    os.chown(state, 65534, 65534)
    statelock.hold(state / "entries.sqlite3").release()
    info = statelock.lock_path(state / "entries.sqlite3").stat()
    assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (65534, 65534, 0o600)


def root_made_store(state: Path) -> Path:
    """A store as root made them before: root's, by the umask (0644)."""
    store = state / "entries.sqlite3"
    with umask(0o022):
        conn = sqlite3.connect(store)
        conn.execute("PRAGMA journal_mode=WAL")
        migrate(conn)
        conn.close()
    return store


def test_the_daemon_refuses_a_store_it_cannot_write_in_one_line(site: Path) -> None:
    """Started as the daemon's user on a root-owned store, gated stops at once with
    one line naming the chown that fixes it, instead of running with every write failing."""
    store = root_made_store(site / "state")
    assert store.stat().st_uid == 0

    def run() -> str:
        import io
        import sys

        err = io.StringIO()
        sys.stderr = err
        code = main(["-c", str(site / "gated.toml"), "run"])
        return f"{code} {err.getvalue()}"

    said = as_nobody(run)
    code, _, err = said.partition(" ")
    assert code == "2", said
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert f"chown nobody: {store}" in err


def test_doctor_names_a_state_file_with_the_wrong_owner(site: Path) -> None:
    """gated doctor reports a store the state directory's owner cannot use, with the fix."""
    store = root_made_store(site / "state")
    findings = doctor.diagnose(str(site / "gated.toml"))
    (finding,) = [f for f in findings if f.topic == "state" and str(store) in f.message
                  and f.level == "problem"]
    assert "belongs to root" in finding.message
    assert finding.fix == f"chown nobody: {store}*"


def test_doctor_names_a_store_others_can_read(site: Path) -> None:
    """A store readable by others (callers' numbers) is a problem with a chmod fix."""
    store = root_made_store(site / "state")
    os.chown(store, NOBODY, NOBODY)
    findings = doctor.diagnose(str(site / "gated.toml"))
    assert any(f.level == "problem" and f.fix == f"chmod 600 {store}*" for f in findings)



def _link_into_state(site: Path, name: str, target_content: bytes | None) -> tuple[Path, Path]:
    """``state/<name>`` made a symbolic link to a file outside the state directory (made
    with ``target_content``, or left missing), as the daemon's user could make one."""
    elsewhere = site / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    target = elsewhere / name
    if target_content is not None:
        target.write_bytes(target_content)
    link = site / "state" / name
    link.symlink_to(target)
    return link, target


def _issue(site: Path) -> tuple[int, str]:
    """``sudo gated codes issue`` (this test runs as root): exit code and what it said."""
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["-c", str(site / "gated.toml"), "codes", "issue", "--name", "Visitor",
                     "--gates", "barrier", "--local"])
    return code, err.getvalue()


def _compile(site: Path) -> tuple[int, str]:
    """What the daemon's compiling child does (run by a daemon that runs as root)."""
    import contextlib
    import io

    from gated.book import compiler

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = compiler.main([str(site / "gated.toml")])
    return code, out.getvalue()


@pytest.mark.parametrize(("name", "content", "command"), [
    ("site.key", None, _issue),                   # a key made where the link points
    ("entries.sqlite3", b"", _issue),             # the store SQLite would open through it
    ("entries.sqlite3-wal", None, _issue),        # its write-ahead log, beside it
    ("entries.sqlite3.book", b"precious\n", _compile),  # the compiled book, replaced
])
def test_a_symlink_in_the_state_dir_is_never_written_through(
        site: Path, name: str, content: bytes | None,
        command: Callable[[Path], tuple[int, str]]) -> None:
    """A link the daemon's user put in its state directory, and a command run as root
    that writes that state file: it refuses, saying the file is a symbolic link, and
    the file the link names is as it was (or still missing)."""
    if name == "entries.sqlite3":  # relative: resolving it must not follow the link
        toml = site / "gated.toml"
        toml.write_text(toml.read_text().replace(str(site / "state"), "state"))
    link, target = _link_into_state(site, name, content)
    code, said = command(site)
    assert code != 0, said
    assert f"{link} is a symbolic link" in said, said
    assert target.read_bytes() == content if content is not None else not target.exists()
    assert sorted(p.name for p in target.parent.iterdir()) == ([name] if content is not None
                                                                else [])
    assert link.is_symlink()


def test_state_files_are_private_whatever_the_old_ones_were(site: Path) -> None:
    """A state file replaced as root (the compiled book) comes out 0600 and the state
    directory owner's, even where the old one was another's and readable by all."""
    from gated.book import compiler

    book = site / "state" / "entries.sqlite3.book"
    book.write_bytes(b"old")
    book.chmod(0o644)
    assert compiler.compile_to_file(site / "gated.toml") == book
    info = book.stat()
    assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (NOBODY, NOBODY, 0o600)


def test_doctor_names_a_symlink_in_the_state_dir(site: Path) -> None:
    """gated doctor reports a state file that is a symbolic link, with the fix."""
    link, _ = _link_into_state(site, "entries.sqlite3-wal", b"")
    findings = doctor.diagnose(str(site / "gated.toml"))
    (finding,) = [f for f in findings if f.topic == "state" and f.level == "problem"]
    assert f"{link} is a symbolic link" in finding.message
    assert finding.fix == f"rm {link}"


def test_a_lock_a_root_command_made_is_still_the_folders_owners(tmp_path: Path) -> None:
    """A staff command's lock on a code set, made under sudo, belongs to the folder's
    owner: made root's, the next command as that owner could not open it and refused
    to run."""
    import asyncio
    import dataclasses

    from gated.commands.sets import SetKeys

    folder = tmp_path / "keys"
    folder.mkdir()
    os.chown(folder, NOBODY, NOBODY)
    memory = folder / "fleet-signing.key.serial"
    keys = SetKeys.__new__(SetKeys)  # only its memory is used by the lock
    object.__setattr__(keys, "memory", memory)
    assert "memory" in {f.name for f in dataclasses.fields(SetKeys)}

    async def hold() -> None:
        async with keys.one_at_a_time():
            pass

    asyncio.run(hold())
    made = (folder / "fleet-signing.key.serial.flock").stat()
    assert (made.st_uid, made.st_gid, stat.S_IMODE(made.st_mode)) == (NOBODY, NOBODY, 0o600)
