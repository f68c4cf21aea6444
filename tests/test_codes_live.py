"""Codes through the running daemon: races, restarts, visitor codes, reloads."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import pyotp
import pytest
from structlog.testing import capture_logs

from gated.cli import main
from gated.site.store import read_entries

from .helpers import BARRIER, SINGLE_USE, TOKEN, config_text

ONCE = SINGLE_USE + """
[[totp]]
name = "Flat 12"
secret = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
gates = ["barrier"]
"""

# The wrong codes in a burst would otherwise lock the site, as they should.
NO_LOCKOUT = """
[lockout]
caller_failures = 100000
site_failures = 100000
"""


async def test_single_use_code_admits_exactly_one_of_50_concurrent_calls(
        start_daemon: Any) -> None:
    """50 simultaneous calls with a single-use code: exactly one ACK, one pulse."""
    running = await start_daemon(ONCE, pulse=0.1)
    answers = await asyncio.gather(*(
        running.get(code="111111", did=BARRIER, callerid=f"+3161234{n:04d}") for n in range(50)))
    bodies = [body for _, body in answers]
    assert bodies.count("status=ACK") == 1
    assert bodies.count("status=NAK") == 49
    await asyncio.sleep(0.3)
    assert [s.state for s in running.pin(17).states] == [False, True, False]


async def test_use_counts_and_totp_steps_survive_a_restart(start_daemon: Any) -> None:
    """After a restart a used-up code stays used up and a spent TOTP code stays spent."""
    otp = pyotp.TOTP("JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP")
    running = await start_daemon(ONCE)
    code = otp.now()
    assert await running.get(code="111111", did=BARRIER) == (200, "status=ACK")
    assert await running.get(code=code, did=BARRIER) == (200, "status=ACK")
    await running.stop()
    again = await start_daemon(ONCE)
    assert await again.get(code="111111", did=BARRIER) == (200, "status=NAK")
    assert await again.get(code=code, did=BARRIER) == (200, "status=NAK")
    reasons = [e.reason for e in reversed(read_entries(again.daemon.gatekeeper.store.path))]
    assert reasons[-2:] == ["used_up", "replayed"]


async def test_visitor_code_issued_by_the_cli_opens_then_is_used_up(
        start_daemon: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`gated codes issue` prints a code the running daemon accepts once, within seconds."""
    running = await start_daemon()
    config = str(tmp_path / "gated.toml")
    capsys.readouterr()
    assert await asyncio.to_thread(main, ["-c", config, "codes", "issue", "--name", "Loodgieter",
                                          "--gates", "barrier", "--valid", "4h",
                                          "--uses", "1"]) == 0
    captured = capsys.readouterr()
    code = captured.out.strip()
    assert code.isdigit() and len(code) == 6
    assert "Loodgieter" in captured.err
    # Guessing until it works would trip the lockout: watch the book instead.
    book = running.daemon.gatekeeper.book
    deadline = time.monotonic() + 5
    while not book.visitors and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    assert await running.get(code=code, did=BARRIER) == (200, "status=ACK")
    assert await running.get(code=code, did=BARRIER) == (200, "status=NAK")
    store = (tmp_path / "state" / "entries.sqlite3").read_bytes()
    assert code.encode() not in store  # only the keyed digest is stored


async def test_reload_swaps_codes_and_a_bad_file_keeps_the_old(start_daemon: Any,
                                                               tmp_path: Path) -> None:
    """A valid edit takes effect on reload; an invalid one is refused, old codes keep working."""
    running = await start_daemon()
    path = tmp_path / "gated.toml"
    good = path.read_text()
    path.write_text(good.replace('code = "5555"', 'code = "6666"'))
    assert await running.daemon.reload("test")
    assert await running.get(code="6666", did=BARRIER) == (200, "status=ACK")
    assert await running.get(code="5555", did=BARRIER) == (200, "status=NAK")
    path.write_text(good.replace('code = "5555"', 'code = "66x6"'))
    assert not await running.daemon.reload("test")
    assert await running.get(code="6666", did=BARRIER) == (200, "status=ACK")


async def test_a_reload_from_a_folder_holding_a_gated_clone_compiles_with_gated_itself(
        start_daemon: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A daemon whose working directory holds a folder named gated (a clone, whose
    config/ would pass for gated.config): the reload's compiling child imports
    nothing from there, and the reload applies."""
    running = await start_daemon()
    clone = tmp_path / "work" / "gated" / "config"
    clone.mkdir(parents=True)
    (clone / "__init__.py").write_text('raise RuntimeError("imported from the working '
                                       'directory")\n')
    monkeypatch.chdir(tmp_path / "work")
    path = tmp_path / "gated.toml"
    path.write_text(path.read_text().replace('code = "5555"', 'code = "6666"'))
    with capture_logs() as logs:
        assert await running.daemon.reload("test"), [e.get("error") for e in logs]
    assert await running.get(code="6666", did=BARRIER) == (200, "status=ACK")


async def test_file_change_is_picked_up_without_a_signal(start_daemon: Any,
                                                         tmp_path: Path) -> None:
    """Editing the file is enough: the daemon notices and reloads."""
    running = await start_daemon()
    path = tmp_path / "gated.toml"
    path.write_text(path.read_text().replace('code = "5555"', 'code = "7777"'))
    deadline = time.monotonic() + 8
    gatekeeper = running.daemon.gatekeeper
    # Polling with calls would count as guesses: watch the book instead.
    while (gatekeeper.book.code(gatekeeper.book.digest("7777")) is None  # noqa: ASYNC110
           and time.monotonic() < deadline):
        await asyncio.sleep(0.1)
    assert await running.get(code="7777", did=BARRIER) == (200, "status=ACK")


def _linked_configs(tmp_path: Path) -> tuple[Path, Path]:
    """gated.toml -> releases/a.toml (code 5555 opens); releases/b.toml revokes 5555."""
    releases = tmp_path / "releases"
    releases.mkdir()
    text = config_text(tmp_path)
    (releases / "a.toml").write_text(text)
    (releases / "b.toml").write_text(text.replace('code = "5555"', 'code = "5556"'))
    link = tmp_path / "gated.toml"
    link.symlink_to(releases / "a.toml")
    return link, releases / "b.toml"


def _retarget(link: Path, target: Path) -> None:
    """What `ln -sfn target link` does: a new link renamed over the old one."""
    fresh = link.with_name(link.name + ".new")
    fresh.symlink_to(target)
    os.replace(fresh, link)


async def test_reload_reads_the_file_a_retargeted_symlink_names_now(
        start_daemon: Any, tmp_path: Path) -> None:
    """`ln -sfn` to a file without a code, then SIGHUP: the revoked code is refused."""
    link, revoked = _linked_configs(tmp_path)
    running = await start_daemon(config=link)
    assert await running.get(code="5555", did=BARRIER) == (200, "status=ACK")
    _retarget(link, revoked)
    assert await running.daemon.reload("SIGHUP")
    assert await running.get(code="5555", did=BARRIER) == (200, "status=NAK")
    assert await running.get(code="5556", did=BARRIER) == (200, "status=ACK")


async def test_file_watch_notices_a_retargeted_symlink(start_daemon: Any,
                                                       tmp_path: Path) -> None:
    """Pointing the config's symlink at another file is a change the watcher reloads."""
    link, revoked = _linked_configs(tmp_path)
    running = await start_daemon(config=link)
    _retarget(link, revoked)
    book = running.daemon.gatekeeper.book
    deadline = time.monotonic() + 8
    # Polling with calls would count as guesses: watch the book instead.
    while (running.daemon.gatekeeper.book is book  # noqa: ASYNC110
           and time.monotonic() < deadline):
        await asyncio.sleep(0.1)
    assert await running.get(code="5555", did=BARRIER) == (200, "status=NAK")


async def test_symlink_into_another_folder_needs_a_restart_for_relative_paths(
        start_daemon: Any, tmp_path: Path) -> None:
    """Relative paths follow the file a link names: a reload that would move the store and
    site key elsewhere is refused, naming them, and the old codes keep serving."""
    text = config_text(tmp_path).replace(str(tmp_path / "state" / "entries.sqlite3"),
                                         "state/entries.sqlite3")
    for release in ("a", "b"):
        (tmp_path / release).mkdir()
        (tmp_path / release / "gated.toml").write_text(text)
    link = tmp_path / "gated.toml"
    link.symlink_to(tmp_path / "a" / "gated.toml")
    running = await start_daemon(config=link)
    assert running.daemon.gatekeeper.store.path == tmp_path / "a" / "state" / "entries.sqlite3"
    _retarget(link, tmp_path / "b" / "gated.toml")
    with capture_logs() as logs:
        assert not await running.daemon.reload("SIGHUP")
    (refusal,) = [e for e in logs if e["event"].startswith("config reload refused")]
    assert refusal["changed"] == ["log.path (now names another file)",
                                  "site.key_file (now names another file)"]
    assert await running.get(code="5555", did=BARRIER) == (200, "status=ACK")


async def test_reload_during_a_burst_fails_no_answer(start_daemon: Any, tmp_path: Path) -> None:
    """Reloading five times during 300 calls: every call gets its right answer."""
    running = await start_daemon(NO_LOCKOUT, pulse=0.05)
    path = tmp_path / "gated.toml"
    text = path.read_text()

    async def reloads() -> None:
        for n in range(5):
            path.write_text(text.replace('name = "Barrier only"', f'name = "Barrier only {n}"'))
            assert await running.daemon.reload("test")
            await asyncio.sleep(0.02)

    calls = [running.get(code="471123" if n % 2 else "000000", did=BARRIER) for n in range(300)]
    *answers, _ = await asyncio.gather(*calls, reloads())
    assert [body for _, body in answers] == [
        "status=ACK&callername=Welcome&destination=201" if n % 2 else "status=NAK"
        for n in range(300)]
    book = running.daemon.gatekeeper.book
    found = book.code(book.digest("5555"))
    assert found is not None and found.name == "Barrier only 4"


async def test_token_is_never_in_logs(start_daemon: Any) -> None:
    """Neither the token nor the code shows up in what gated logs about a call."""
    from structlog.testing import capture_logs

    running = await start_daemon()
    with capture_logs() as logs:
        await running.get(code="471123", did=BARRIER)
        await running.get(token="wrong-token-xyz", code="471123", did=BARRIER)
    assert TOKEN not in repr(logs)
    assert "wrong-token-xyz" not in repr(logs)
