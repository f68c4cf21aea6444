"""The compiled code book: every code found as written, kept in the state
directory, used only when it was made from exactly the sources at hand."""

from __future__ import annotations

import asyncio
import errno
import gc
import json
import os
import random
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
from gpiozero.pins.mock import MockFactory

from gated.book import bookfile, compiler, sitekey
from gated.book import config as config_mod
from gated.core.decide import Ledger, Request, decide
from gated.core.lockout import Policy
from gated.daemon import Daemon
from tests.helpers import BARRIER, FakeClock, config_text, write_config
from tests.test_book_check import rebuilt, sections_of, set_record

TOTP_USER = """
[[totp]]
name = "Flat 1"
secret = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
gates = ["barrier"]
"""


def random_codes(count: int, seed: int = 5) -> tuple[str, list[str]]:
    """``count`` [[codes]] entries mixing every field, and their digits."""
    rng = random.Random(seed)
    digits = [str(n) for n in rng.sample(range(10_000, 10**8), count)]
    entries = []
    for i, code in enumerate(digits):
        lines = ["[[codes]]", f'name = "Person {i} {"é" * (i % 3)}"', f'code = "{code}"',
                 rng.choice(['gates = ["barrier"]', 'gates = ["barrier", "door"]',
                             'gates = ["door"]'])]
        if i % 4 == 0:
            lines.append(f'id = "person-{i}"')
        if i % 3 == 0:
            lines += ["valid_from = 2020-01-01T00:00:00",
                      f"valid_until = 20{30 + i % 60}-12-31T00:00:00"]
        if i % 5 == 0:
            lines.append('schedule = ["mon-fri 07:00-19:00"]')
        if i % 7 == 0:
            lines.append(f"max_uses = {1 + i % 3}")
        if i % 11 == 0:
            lines.append('callers = ["+31612345678", "0201234567"]')
        if i % 2 == 0:
            lines.append(f'callername = "Guest {i % 13}"')
        entries.append("\n".join(lines))
    return "\n\n".join(entries) + "\n", digits


def test_every_code_is_found_as_it_was_written(tmp_path: Path) -> None:
    """Each of 600 codes mixing every field is found by its digits with exactly the
    credential the file describes; ids are known; nothing else is found."""
    extra, digits = random_codes(600)
    text = config_text(tmp_path, extra + TOTP_USER)
    config, book = compiler.parse(text, source=str(tmp_path / "gated.toml"))
    tz = config.tz
    number = compiler.number_parser(config.site.region, compiler._plain_error)
    file_codes = config.codes[3:]  # after the three every test config has
    assert book.code_count == len(config.codes)
    for code, typed in zip(file_codes, digits, strict=True):
        expected = compiler.compile_code(code, (), config, tz, number, compiler._plain_error)
        assert book.code(book.digest(typed)) == expected
        assert book.has_id(expected.id)
    rng = random.Random(9)
    taken = set(digits)
    for _ in range(2000):
        guess = str(rng.randrange(10_000, 10**8))
        if guess not in taken:
            assert book.code(book.digest(guess)) is None
    assert not book.has_id("nobody") and book.has_id("Flat 1")
    listed = {c.id: c for c in book.credentials()}
    assert len(listed) == book.credential_count == len(config.codes) + 1


def _compile_first(tmp_path: Path, extra: str = "") -> Path:
    path = write_config(tmp_path, extra)
    loaded = compiler.load_for_daemon(path)
    assert loaded.book.code(loaded.book.digest("5555")) is not None
    return path


def _book_file(tmp_path: Path) -> Path:
    return bookfile.book_path(tmp_path / "state" / "entries.sqlite3")


# The restart, in a process whose TOML parser refuses to run: whatever it
# answers, it answered from the compiled book.
NO_TOML = """
import json, sys
from gated.book import compiler, config
class Refuse:
    TOMLDecodeError = ValueError
    def loads(self, text):
        raise AssertionError("the TOML file was parsed")
config.toml = Refuse()
loaded = compiler.cached(sys.argv[1])
book = loaded.book if loaded is not None else None
print(json.dumps(None if book is None else {
    "codes": book.code_count, "totp": book.totp_count,
    "5555": getattr(book.code(book.digest("5555")), "name", None),
    "gate": sorted(book.gates), "site": loaded.config.site.id}))
"""


def _restart(path: Path) -> Any:
    done = subprocess.run([sys.executable, "-c", NO_TOML, str(path)], capture_output=True,
                          text=True, timeout=60, check=True)
    return json.loads(done.stdout)


def test_a_restart_answers_from_the_compiled_book_without_parsing_the_file(
        tmp_path: Path) -> None:
    """After the first start compiled it, a restart maps the book: no TOML parsed,
    the same codes, TOTP users, gates and settings."""
    path = _compile_first(tmp_path, TOTP_USER)
    book_file = _book_file(tmp_path)
    assert book_file.stat().st_mode & 0o777 == 0o600  # TOTP secrets and code digests
    assert _restart(path) == {"codes": 3, "totp": 1, "5555": "Barrier only",
                              "gate": ["barrier", "door"], "site": "test"}


def test_an_edited_config_is_compiled_again(tmp_path: Path) -> None:
    """A changed file is never served from the old book: the new code opens, the old one not."""
    path = _compile_first(tmp_path)
    path.write_text(path.read_text().replace('code = "5555"', 'code = "7777"'))
    assert _restart(path) is None
    book = compiler.load_for_daemon(path).book
    assert book.code(book.digest("5555")) is None
    found = book.code(book.digest("7777"))
    assert found is not None and found.name == "Barrier only"
    assert _restart(path) is not None  # and that compile was kept


@pytest.mark.parametrize("damage", ["flipped_bit", "cut_short", "empty"])
def test_a_damaged_book_is_never_used(tmp_path: Path, damage: str) -> None:
    """A book damaged on disk (an SD card's flipped bit, a cut write) is compiled
    again, never read."""
    path = _compile_first(tmp_path)
    book_file = _book_file(tmp_path)
    data = bytearray(book_file.read_bytes())
    if damage == "flipped_bit":
        data[len(data) // 3] ^= 0x10
    elif damage == "cut_short":
        del data[len(data) - 40:]
    else:
        data.clear()
    book_file.write_bytes(bytes(data))
    assert _restart(path) is None
    book = compiler.load_for_daemon(path).book
    assert book.code(book.digest("5555")) is not None
    assert _restart(path) is not None


def test_a_kept_book_whose_insides_lie_is_compiled_again_not_read(tmp_path: Path) -> None:
    """A book in the state directory whose checksum is good but whose insides lie (every
    code's policy index past the table, as a hand-made file could say): a restart
    compiles it again instead of answering from it, and codes open as written."""
    path = _compile_first(tmp_path)
    book_file = _book_file(tmp_path)
    header, sections = sections_of(book_file.read_bytes())
    for at in range(header.codes):
        set_record(sections, at, policy=200)
    book_file.write_bytes(rebuilt(header, sections))
    assert _restart(path) is None
    book = compiler.load_for_daemon(path).book
    found = book.code(book.digest("5555"))
    assert found is not None and found.name == "Barrier only"
    assert _restart(path) is not None


def test_a_new_site_key_compiles_again(tmp_path: Path) -> None:
    """Digests are made with the site key: a replaced key means a new book, and codes
    still open."""
    path = _compile_first(tmp_path)
    key_file = tmp_path / "state" / "site.key"
    key_file.write_text(os.urandom(sitekey.KEY_BYTES).hex() + "\n")
    assert _restart(path) is None
    book = compiler.load_for_daemon(path).book
    assert book.key == sitekey.read_key(key_file)
    assert book.code(book.digest("5555")) is not None


def test_the_same_file_elsewhere_never_uses_anothers_book(tmp_path: Path) -> None:
    """Relative paths follow the file: a copy of a config in another folder is
    compiled for its own folder, not served the first one's book."""
    (tmp_path / "a").mkdir()
    first = _compile_first(tmp_path / "a")
    second = tmp_path / "b" / "gated.toml"
    second.parent.mkdir()
    second.write_text(first.read_text().replace(str(tmp_path / "a" / "state"), "state"))
    assert _restart(second) is None
    loaded = compiler.load_for_daemon(second)
    assert loaded.store_path == tmp_path / "b" / "state" / "entries.sqlite3"
    assert _book_file(tmp_path / "b").exists()


def test_a_book_that_cannot_be_kept_still_starts_the_site(tmp_path: Path) -> None:
    """Where the book cannot be written (here a folder is in its place; a full disk
    is the same), the daemon compiles in its own process and answers."""
    path = write_config(tmp_path)
    _book_file(tmp_path).mkdir(parents=True)
    loaded = compiler.load_for_daemon(path)
    decision = decide(Request(BARRIER, None, code="5555"), loaded.book,
                      Ledger.fresh(Policy()), 0.0)
    assert decision.reason == "granted_code"
    assert "Is a directory" in loaded.unkept


def test_the_real_daemon_says_in_its_log_why_the_book_was_not_kept(tmp_path: Path) -> None:
    """The warning is a line of the configured log (JSON under systemd), not text
    printed before the log was set up; the daemon answers anyway."""
    from tests.process import DaemonProcess, free_port
    from tests.test_process import call

    port = free_port()
    path = write_config(tmp_path)
    path.write_text(path.read_text().replace("127.0.0.1:0", f"127.0.0.1:{port}"))
    _book_file(tmp_path).mkdir(parents=True)
    daemon = DaemonProcess(path)
    try:
        warning = daemon.wait_for("code book not kept in the state directory; compiled in "
                                  "the daemon's own process (a restart will compile it again)")
        assert warning["level"] == "warning" and "Is a directory" in warning["reason"]
        assert daemon.wait_for("listening")["book"] == "parsed"
        assert call(port, "5555") == "status=ACK"
    finally:
        assert daemon.stop() == 0
    assert not [e for e in daemon.events if e.get("event") == "non-json"]


def test_a_bad_file_is_refused_with_its_key_and_line_from_the_child(tmp_path: Path) -> None:
    """The child's refusal reaches the daemon as the same one line: key path and line."""
    path = write_config(tmp_path, '\n[[codes]]\nname = "Bad"\ncode = "12"\ngates = ["barrier"]\n')
    with pytest.raises(config_mod.ConfigError) as refused:
        compiler.load_for_daemon(path)
    line = path.read_text().splitlines().index('code = "12"') + 1
    assert str(refused.value) == f"{path}:{line}: codes[3].code: a code is 4 to 16 digits"


class RefusingParser:
    """A TOML parser that fails the test if this process parses anything."""

    TOMLDecodeError = ValueError

    def loads(self, text: str) -> Any:
        raise AssertionError("the daemon's own process parsed the TOML file")


async def test_a_reload_parses_the_file_in_another_process(
        start_daemon: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reload's parse and compile run in a child process: the daemon only maps the
    result, and calls see the new book at once."""
    running = await start_daemon()
    monkeypatch.setattr(config_mod, "toml", RefusingParser())
    path = tmp_path / "gated.toml"
    path.write_text(path.read_text().replace('code = "5555"', 'code = "7777"'))
    assert await running.daemon.reload("test")
    assert await running.get(code="7777", did=BARRIER) == (200, "status=ACK")
    assert await running.get(code="5555", did=BARRIER) == (200, "status=NAK")
    assert _book_file(tmp_path).exists()
    # A file the child refuses keeps the old book serving.
    path.write_text(path.read_text().replace('code = "7777"', 'code = "77"'))
    assert not await running.daemon.reload("test")
    assert await running.get(code="7777", did=BARRIER) == (200, "status=ACK")


@pytest.mark.parametrize("written", [
    '[log]\npath = "{store}"\n',
    '[log]\nformat = "json" # a comment\npath = \'{store}\'\n',
    'log = {{ format = "json", path = "{store}" }}\n',
    'log.path = "{store}"\n',
])
def test_the_book_is_found_however_the_store_path_is_written(
        tmp_path: Path, written: str) -> None:
    """A restart finds the book beside the store for each way TOML can say where it is."""
    store = tmp_path / "state" / "entries.sqlite3"
    text = config_text(tmp_path).replace(f'\n[log]\npath = "{store}"\n', "\n")
    setting = written.format(store=store)
    # Keys before the first table belong to the top level; a [log] table goes last.
    text = setting + text if setting.startswith("log") else text + setting
    path = tmp_path / "gated.toml"
    path.write_text(text)
    assert compiler.load(path).store_path == store
    compiler.load_for_daemon(path)
    assert _restart(path) is not None


def test_every_totp_user_is_found_by_pyotps_code(tmp_path: Path) -> None:
    """TOTP users of several periods and lengths, held compactly: each is found by the
    code pyotp makes for them now, with their own name, id and gates; ids are known."""
    import base64

    import pyotp

    rng = random.Random(3)
    users = []
    for i in range(60):
        secret = base64.b32encode(rng.randbytes(20 + i % 3 * 6)).decode()
        digits, period = (6, 8)[i % 2], (30, 60, 45)[i % 3]
        users.append((f"User {i}", f"user-{i}" if i % 5 == 0 else f"User {i}", secret,
                      digits, period, '["door"]' if i % 4 == 0 else '["barrier"]'))
    extra = "".join(
        f'\n[[totp]]\nname = "{name}"\n' + (f'id = "{uid}"\n' if uid != name else "")
        + f'secret = "{secret}"\ndigits = {digits}\nperiod = {period}\ngates = {gates}\n'
        for name, uid, secret, digits, period, gates in users)
    _, book = compiler.parse(config_text(tmp_path, extra))
    assert book.totp_count == len(users)
    now = 1_800_000_000.0
    for name, uid, secret, digits, period, gates in users:
        typed = pyotp.TOTP(secret, digits=digits, interval=period).at(now)
        found = {(c.name, c.id, tuple(sorted(c.gates))) for c, _ in book.match(typed, now)
                 if c.kind == "totp"}
        assert (name, uid, tuple(json.loads(gates))) in found
        assert book.has_id(uid)


def test_a_restarted_daemon_answers_from_the_mapped_book(tmp_path: Path) -> None:
    """The real daemon: its first start compiles the book, a restart maps it, and both
    answer the same codes; an edit between them is compiled, not mapped."""
    from tests.process import DaemonProcess, free_port
    from tests.test_process import call

    port = free_port()
    path = write_config(tmp_path, TOTP_USER)
    path.write_text(path.read_text().replace("127.0.0.1:0", f"127.0.0.1:{port}"))
    origins = []
    for edit in (None, None, ('code = "5555"', 'code = "5556"')):
        if edit is not None:
            path.write_text(path.read_text().replace(*edit))
        daemon = DaemonProcess(path)
        try:
            origins.append(daemon.wait_for("listening")["book"])
            assert call(port, "471123") == "status=ACK&callername=Welcome&destination=201"
        finally:
            assert daemon.stop() == 0
    assert origins == ["compiled", "mapped", "compiled"]


async def test_a_reloaded_book_has_its_totp_tables_before_any_call(
        start_daemon: Any, tmp_path: Path) -> None:
    """The swap brings TOTP tables already built for now: the first code typed after a
    reload does not build them (thousands of HMACs) while callers wait. (A clock that
    stands still: with the real one, a step boundary passed during a slow reload.)"""
    running = await start_daemon(TOTP_USER, clock=FakeClock())
    gatekeeper = running.daemon.gatekeeper
    now = running.daemon.clock.now()
    (old,) = gatekeeper.book.totp.values()
    old.lookup("123456", now)  # the current steps, built
    built = dict(old.steps)
    path = tmp_path / "gated.toml"
    path.write_text(path.read_text().replace('name = "Flat 1"', 'name = "Flat 2"'))
    assert await running.daemon.reload("test")
    (table,) = gatekeeper.book.totp.values()
    assert table.users[0].credential.name == "Flat 2"
    assert table.missing(now) == []
    # Renamed, same secret: the steps are taken over, not built again.
    assert all(table.steps[step] is built[step] for step in built)
    path.write_text(path.read_text().replace("JBSWY3DPEHPK3PXP", "KRSXG5DSNFXGOIDB", 1))
    assert await running.daemon.reload("test")
    (changed,) = gatekeeper.book.totp.values()
    assert changed.missing(now) == []
    assert not any(changed.steps[step] is built[step] for step in built)


@pytest.mark.parametrize("broken", [
    '\n[[codes]]\nname = "A"\ncode = "12345"\ngates = ["barrier"]\ncolour = "red"\n',
    '\n[[codes]]\ncode = "12345"\ngates = ["barrier"]\n',
    '\n[[codes]]\nname = "A"\ncode = "12345"\ngates = ["garage"]\n',
    '\n[[codes]]\nname = "A"\ncode = "5555"\ngates = ["barrier"]\n',
    '\n[[codes]]\nname = "A"\ncode = 12345\ngates = ["barrier"]\n',
    '\n[[codes]]\nname = "Demo"\ncode = "12345"\ngates = ["barrier"]\n',
    '\n[[codes]]\nname = "A"\ncode = "12345"\nvalid_from = 2030-01-01T00:00:00\n'
    'valid_until = 2020-01-01T00:00:00\ngates = ["barrier"]\n',
])
def test_the_child_refuses_a_file_as_check_config_does(tmp_path: Path, broken: str) -> None:
    """The daemon's child checks codes one at a time (to keep its memory down); a bad
    code is refused in the same one line, key and line, as `gated check-config` says."""
    path = write_config(tmp_path, broken)
    with pytest.raises(config_mod.ConfigError) as in_process:
        compiler.load(path)
    with pytest.raises(config_mod.ConfigError) as from_child:
        compiler.load_for_daemon(path)
    assert str(from_child.value) == str(in_process.value)
    assert in_process.value.line is not None


async def test_a_compile_that_hangs_is_killed_and_the_reload_refused(tmp_path: Path) -> None:
    """A child that never finishes does not hold the reloads behind it for ever."""
    # A config whose path is a FIFO: the child blocks reading it, as a stuck compile would.
    fifo = tmp_path / "stuck.toml"
    os.mkfifo(fifo)
    with pytest.raises(config_mod.ConfigError, match="took over 1 s; killed"):
        await compiler.load_in_child(fifo, within=1.0)


def _compilers() -> list[int]:
    """This process's children that are compiling children (``_compile``)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            parent = (proc / "stat").read_text().rsplit(")", 1)[1].split()[1]
            command = (proc / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError):
            continue
        if parent == str(os.getpid()) and compiler.CHILD_COMMAND.encode() in command:
            found.append(int(proc.name))
    return found


def _writer(fifo: Path) -> int | None:
    """The FIFO opened for writing, or None while nothing has it open for reading."""
    try:
        return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno != errno.ENXIO:
            raise
        return None


def test_a_daemon_stopped_mid_reload_leaves_no_compiler_behind(
        tmp_path: Path, mock_factory: MockFactory) -> None:
    """The daemon stopped while its reload's child compiles, its event loop closed right
    after (as a test's is): the child is killed and reaped and its pipe closed, so
    nothing of it is left for the garbage collector to warn about in a later test."""
    path = write_config(tmp_path)
    loaded = compiler.load(path, create_key=True)
    writers: list[int] = []

    async def stop_mid_reload() -> None:
        daemon = Daemon(loaded, mock_factory=mock_factory, install_signals=False)
        task = asyncio.create_task(daemon.run())
        await asyncio.wait_for(daemon.ready.wait(), 10)
        # The config becomes a FIFO: the daemon's file watcher starts a reload, whose
        # child blocks reading it, compiling for as long as the test likes.
        path.unlink()
        os.mkfifo(path)
        async with asyncio.timeout(30):
            while (writer := _writer(path)) is None:  # noqa: ASYNC110 (no event says a reader came)
                await asyncio.sleep(0.05)
        writers.append(writer)
        daemon.stop.set()
        await asyncio.wait_for(task, 10)

    try:
        asyncio.run(stop_mid_reload())
    finally:
        for fd in writers:
            os.close(fd)
    assert _compilers() == []
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        gc.collect()
    assert [str(w.message) for w in warned] == []


def test_a_second_daemon_stops_before_its_compiler_touches_the_running_ones_book(
        tmp_path: Path) -> None:
    """Another config on the same state (a copy being tried out): the second daemon
    refuses on the state lock before compiling, so the running daemon's book is the
    same file, unchanged, and a restart of the first still maps it."""
    from tests.process import DaemonProcess, free_port

    port = free_port()
    path = write_config(tmp_path)
    path.write_text(path.read_text().replace("127.0.0.1:0", f"127.0.0.1:{port}"))
    other = tmp_path / "other.toml"
    other.write_text(path.read_text().replace('code = "5555"', 'code = "5556"')
                     .replace(f"127.0.0.1:{port}", f"127.0.0.1:{free_port()}"))
    first = DaemonProcess(path)
    try:
        first.wait_for("listening")
        book = _book_file(tmp_path)
        before = (book.stat().st_ino, book.stat().st_mtime_ns, book.read_bytes())
        second = DaemonProcess(other)
        assert second.proc.wait(30) == 2
        second.stop()
        (said,) = [e["line"] for e in second.events if e.get("event") == "non-json"]
        assert "another gated process" in said and f"pid {first.proc.pid}" in said
        assert (book.stat().st_ino, book.stat().st_mtime_ns, book.read_bytes()) == before
    finally:
        assert first.stop() == 0
    assert _restart(path) is not None
