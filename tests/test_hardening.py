"""Hostile input, faults and crashes: the gate answers, opens nothing it should not,
and loses no entry."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import signal
import sqlite3
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gpiozero.pins.mock import MockFactory
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from gated import daemon as daemon_mod
from gated.book import compiler, sitekey
from gated.cli import main
from gated.core.clock import SystemClock
from gated.core.decide import Status
from gated.core.errors import ConfigError
from gated.daemon import Daemon
from gated.pbx.voipgrid import WebhookSettings
from gated.site.gatekeeper import Gatekeeper, RawCall
from gated.site.store import BUFFER_LIMIT, Store, read_entries

from .helpers import (
    BARRIER,
    RESIDENT,
    SINGLE_USE,
    TOKEN,
    FakeActuator,
    config_text,
    write_config,
)
from .process import DaemonProcess, free_port

# -- fuzzing the webhook on a real socket ----------------------------------------


class ThreadedDaemon:
    """The real daemon in a thread with its own loop, for sync hypothesis tests."""

    def __init__(self, path: Path) -> None:
        self.factory = MockFactory()
        self.loop = asyncio.new_event_loop()
        self.daemon = Daemon(compiler.load(path, create_key=True), mock_factory=self.factory,
                             install_signals=False)
        self.thread = threading.Thread(target=self.loop.run_until_complete,
                                       args=(self.daemon.run(),), daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.daemon.listening and time.monotonic() < deadline:
            time.sleep(0.01)
        assert self.daemon.listening

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.daemon.stop.set)
        self.thread.join(10)
        self.loop.close()
        self.factory.reset()


FUZZ = """
[lockout]
caller_failures = 1000000
site_failures = 1000000
"""


@pytest.fixture(scope="module")
def fuzz_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedDaemon]:
    path = write_config(tmp_path_factory.mktemp("fuzz"), FUZZ)
    running = ThreadedDaemon(path)
    yield running
    running.stop()


VALID = {"471123", "5555", "9000"}
text = st.text(alphabet=st.characters(codec="utf-8"), max_size=60)
params = st.dictionaries(
    st.sampled_from(["token", "code", "did", "callerid", "callername", "x", "Code"]),
    st.one_of(text, st.from_regex(r"[0-9+ ]{0,20}", fullmatch=True), st.just(TOKEN),
              st.sampled_from(["471123", "5555", BARRIER, "0612345678", "%ff", "\x00"])),
    max_size=6)


def request(url: str, method: str, fields: dict[str, str], raw: bytes | None) -> tuple[int, str]:
    query = urllib.parse.urlencode(fields)
    data = raw if raw is not None else (query.encode() if method == "POST" else None)
    target = url if method == "POST" else f"{url}?{query}"
    req = urllib.request.Request(target, data=data, method=method)  # noqa: S310 (loopback)
    if method == "POST":
        req.add_header("Content-Type", "application/x-www-form-urlencoded")
    try:
        with urllib.request.urlopen(req, timeout=10) as response:  # noqa: S310 (loopback)
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        exc.close()
        return exc.code, ""


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(params, st.sampled_from(["GET", "POST", "PUT", "DELETE"]),
       st.one_of(st.none(), st.binary(max_size=300)))
def test_fuzzed_requests_never_5xx_and_never_open_without_a_credential(
        fuzz_daemon: ThreadedDaemon, fields: dict[str, str], method: str,
        raw: bytes | None) -> None:
    """Random parameters, encodings, bodies and methods: a 2xx/4xx, and ACK only for a
    valid token with a valid code (or a listed caller)."""
    status, body = request(fuzz_daemon.daemon.url, method, fields, raw)
    assert status < 500
    if body.startswith("status=ACK"):
        assert method in ("GET", "POST")
        carried = fields if raw is None or method == "GET" else dict(
            urllib.parse.parse_qsl(raw.decode("utf-8", "replace")))
        assert carried.get("token") == TOKEN
        code = (carried.get("code") or "").strip().removesuffix("#")
        assert code in VALID or (not code and carried.get("callerid"))


# -- request hardening ------------------------------------------------------------


async def test_oversized_body_is_413_and_headers_are_bounded(start_daemon: Any) -> None:
    """A body over max_body is 413; a flood of headers is refused before any handler."""
    running = await start_daemon()
    async with running.session.post(running.url, data={"token": TOKEN, "pad": "x" * 9000}) as r:
        assert r.status == 413
    headers = {f"X-Junk-{n}": "y" for n in range(100)}
    async with running.session.get(running.url, headers=headers) as r:
        assert r.status == 400
    async with running.session.get(running.url + "?" + "a" * 5000) as r:
        assert r.status in (400, 414)
    await running.daemon.gatekeeper.store.flush()
    assert read_entries(running.daemon.gatekeeper.store.path) == []


class _Request:
    def __init__(self, remote: str, forwarded: list[str]) -> None:
        self.remote = remote
        self.headers = _Headers(forwarded)


class _Headers:
    def __init__(self, values: list[str]) -> None:
        self.values = values

    def getall(self, name: str, default: list[str]) -> list[str]:
        return self.values or default


def test_forwarded_for_is_believed_only_from_trusted_proxies() -> None:
    """X-Forwarded-For counts only when a trusted proxy sent it, and only its own hop."""
    settings_ = WebhookSettings.build([TOKEN], ["203.0.113.0/24"], "NAK", 3.0, ["127.0.0.1/32"])
    via_proxy = _Request("127.0.0.1", ["198.51.100.7, 203.0.113.9"])
    assert settings_.client(via_proxy) == "203.0.113.9"  # type: ignore[arg-type]
    spoofed = _Request("198.51.100.7", ["203.0.113.9"])  # not from our proxy: ignored
    assert settings_.client(spoofed) == "198.51.100.7"  # type: ignore[arg-type]
    assert not settings_.client_ok(settings_.client(spoofed))  # type: ignore[arg-type]
    only_proxies = _Request("127.0.0.1", ["127.0.0.1"])
    assert settings_.client(only_proxies) == "127.0.0.1"  # type: ignore[arg-type]


# -- codes at rest ------------------------------------------------------------------


async def test_code_hash_in_the_config_opens_like_the_digits(start_daemon: Any, tmp_path: Path,
                                                             capsys: Any) -> None:
    """`gated codes hash` makes a code_hash that the daemon matches; the file has no digits."""
    config = write_config(tmp_path)
    assert main(["-c", str(config), "codes", "hash", "--code", "80808080"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith('code_hash = "hmac-sha256:') and "80808080" not in line
    key_file = tmp_path / "state" / "site.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    running = await start_daemon(f'\n[[codes]]\nname = "Hashed"\n{line}\ngates = ["barrier"]\n')
    assert "80808080" not in (tmp_path / "gated.toml").read_text()
    assert await running.get(code="80808080", did=BARRIER) == (200, "status=ACK")
    assert await running.get(code="80808081", did=BARRIER) == (200, "status=NAK")


def test_code_hash_without_the_key_is_a_config_error(tmp_path: Path) -> None:
    """A code_hash with no site key cannot be checked, and the config says so."""
    line = 'code_hash = "' + sitekey.code_hash(b"k" * 32, "123456") + '"'
    path = tmp_path / "gated.toml"
    path.write_text(config_text(tmp_path, f'[[codes]]\nname = "H"\n{line}\ngates = ["door"]\n'))
    with pytest.raises(ConfigError, match=r"codes\[3\]\.code_hash: code_hash needs the site key"):
        compiler.load(path)


def test_site_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    """A site key with loose permissions is refused rather than trusted."""
    key = tmp_path / "site.key"
    sitekey.ensure_key(key)
    key.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        sitekey.read_key(key)


# -- faults --------------------------------------------------------------------------


async def test_locked_store_still_answers_and_flushes_later(start_daemon: Any) -> None:
    """With the database unwritable the gate still answers; entries land afterwards."""
    running = await start_daemon()
    store = running.daemon.gatekeeper.store
    blocker = sqlite3.connect(store.path, isolation_level=None, timeout=0)
    blocker.execute("BEGIN EXCLUSIVE")
    started = time.monotonic()
    first = await running.get(code="471123", did=BARRIER)
    answers = [await running.get(code="5555", did=BARRIER) for _ in range(3)]
    elapsed = time.monotonic() - started
    assert first[1].startswith("status=ACK")
    assert answers == [(200, "status=ACK")] * 3
    assert elapsed < 3.0 * 2  # within the deadline, not stuck behind the disk
    assert not store.healthy and store.buffered >= 1
    blocker.execute("COMMIT")
    blocker.close()
    assert await store.flush(within=10)
    assert len(read_entries(store.path)) == 4


async def test_failing_actuator_refunds_the_use(start_daemon: Any) -> None:
    """A single-use code whose open failed is not spent: the caller can try again."""
    running = await start_daemon('\n[[codes]]\nname = "Once"\ncode = "111111"\n'
                                 'gates = ["barrier"]\nmax_uses = 1\n',
                                 actuators={"barrier": FakeActuator("barrier", fail=True)})
    assert await running.get(code="111111", did=BARRIER) == (200, "status=ERR")
    running.daemon.gatekeeper.actuators["barrier"] = FakeActuator("barrier")
    assert await running.get(code="111111", did=BARRIER) == (200, "status=ACK")
    assert await running.get(code="111111", did=BARRIER) == (200, "status=NAK")





async def wait_failing(store: Any) -> None:
    for _ in range(500):
        if not store.healthy:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the store never noticed it was failing")


@pytest.mark.parametrize("noticed", [True, False],
                         ids=["store_known_failing", "first_failing_write"])
async def test_single_use_code_while_the_store_fails_is_err_and_opens_nothing(
        start_daemon: Any, noticed: bool) -> None:
    """While the store cannot make a use durable, a single-use code answers ERR
    store_failing and the relay never moves; once the store is back it opens once.

    Also when the code's own spend is the first write to find the disk failing:
    the use must be on disk before the relay moves.
    """
    running = await start_daemon(SINGLE_USE, deadline=1.0)
    pin = running.pin(17)
    store = running.daemon.gatekeeper.store
    blocker = sqlite3.connect(store.path, isolation_level=None, timeout=0)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        if noticed:
            # A wrong code: its entry is the write that finds the disk failing.
            assert await running.get(code="000000", did=BARRIER) == (200, "status=NAK")
            await wait_failing(store)
        else:
            assert store.healthy  # nothing written yet, so nothing has failed
        assert await running.get(code="111111", did=BARRIER) == (200, "status=ERR")
        assert [s.state for s in pin.states] == [False]
    finally:
        blocker.execute("COMMIT")
        blocker.close()
    assert await store.flush(within=10)
    assert store.healthy
    assert await running.get(code="111111", did=BARRIER) == (200, "status=ACK")
    assert await running.get(code="111111", did=BARRIER) == (200, "status=NAK")
    await running.stop()  # relays off: the one pulse has ended
    assert [s.state for s in pin.states] == [False, True, False]
    reasons = [(e.status, e.reason) for e in reversed(read_entries(store.path))]
    assert reasons == [("NAK", "unknown_code")] * noticed + [
        ("ERR", "store_failing"), ("ACK", "granted_code"), ("NAK", "used_up")]


async def test_a_full_buffer_never_drops_a_use_or_a_lock(tmp_path: Path) -> None:
    """More entries than the buffer holds while the disk refuses: the oldest entries go,
    but a spent single-use code stays spent and a locked caller stays locked, after
    recovery and across a restart."""
    config = write_config(tmp_path, SINGLE_USE + "[lockout]\nsite_failures = 1000\n")
    loaded = compiler.load(config, create_key=True)
    policy = daemon_mod.policy(loaded)
    guesser = "+31687654321"

    def gatekeeper(store: Store) -> Gatekeeper:
        return Gatekeeper(loaded.book, store.load_ledger(policy),
                          {"barrier": FakeActuator("barrier"), "door": FakeActuator("door")},
                          store, SystemClock(), deadline=0.5)

    store = Store.open(loaded.store_path)
    gate = gatekeeper(store)
    writer = asyncio.create_task(store.run())
    store.connection.execute("PRAGMA busy_timeout=0")
    # A use spent just before the disk fails; its entry may still be in flight.
    once = await gate.call(RawCall(code="111111", did=BARRIER, callerid=RESIDENT))
    assert once.status is Status.ACK
    blocker = sqlite3.connect(store.path, isolation_level=None, timeout=0)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        with capture_logs():
            for n in range(5):
                await gate.call(RawCall(code=f"00000{n}", did=BARRIER, callerid=guesser))
            assert not store.healthy
            used = await gate.call(RawCall(code="111111", did=BARRIER, callerid=RESIDENT))
            assert used.reason == "used_up"
            for _ in range(BUFFER_LIMIT + 1):
                answer = await gate.call(RawCall(code="471123", did=BARRIER, callerid=guesser))
                assert answer.reason == "locked_out"
        assert store.dropped > 6
    finally:
        blocker.execute("COMMIT")
        blocker.close()
    assert await store.flush(within=10)
    assert store.healthy
    writer.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await writer
    store.close()

    store = Store.open(loaded.store_path)
    gate = gatekeeper(store)
    writer = asyncio.create_task(store.run())
    try:
        again = await gate.call(RawCall(code="111111", did=BARRIER, callerid=RESIDENT))
        locked = await gate.call(RawCall(code="471123", did=BARRIER, callerid=guesser))
        assert (again.status, again.reason) == (Status.NAK, "used_up")
        assert (locked.status, locked.reason) == (Status.NAK, "locked_out")
    finally:
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer
        store.close()


# -- crashes -----------------------------------------------------------------------------


def test_kill_9_during_a_burst_loses_no_answered_entry(tmp_path: Path) -> None:
    """kill -9 mid-burst: every call that got an answer is in the store, which is intact;
    a restart comes up with the relay off."""
    port = free_port()
    config = write_config(tmp_path, FUZZ, pulse=0.05)
    config.write_text(config.read_text().replace("127.0.0.1:0", f"127.0.0.1:{port}"))
    daemon = DaemonProcess(config)
    answered: list[str] = []
    lock = threading.Lock()
    try:
        daemon.wait_for("listening")

        def one(n: int) -> None:
            url = (f"http://127.0.0.1:{port}/voipgrid?token={TOKEN}&code=471123"
                   f"&did=%2B{BARRIER[1:]}&callername=c{n}")
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.read().startswith(b"status=ACK"):
                        with lock:
                            answered.append(f"c{n}")
            except (OSError, urllib.error.URLError):
                pass  # the daemon died under this call: no answer, no promise

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(one, n) for n in range(3000)]
            deadline = time.monotonic() + 30
            while len(answered) < 300 and time.monotonic() < deadline:
                time.sleep(0.01)
            daemon.signal(signal.SIGKILL)
            concurrent.futures.wait(futures, timeout=60)
    finally:
        daemon.stop()
    assert len(answered) >= 300
    store = tmp_path / "state" / "entries.sqlite3"
    conn = sqlite3.connect(store)
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    stored = {row[0] for row in conn.execute("SELECT callername FROM entries")}
    conn.close()
    missing = set(answered) - stored
    assert not missing, f"{len(missing)} answered entries lost"
    print(f"answered before kill -9: {len(answered)}; stored: {len(stored)}; lost: 0")

    again = DaemonProcess(config)
    try:
        ready = again.wait_for("relay ready", gate="barrier")
        again.wait_for("listening")
        assert ready
    finally:
        assert again.stop() == 0
    history = next(e for e in again.events if e["event"] == "mock pin history"
                   and e["gate"] == "barrier")
    assert history["states"] == [False]


def test_kill_9_while_the_store_fails_opens_no_single_use_code_twice(tmp_path: Path) -> None:
    """kill -9 while the store refuses writes, then a restart: a single-use code has
    opened at most once over both runs."""
    port = free_port()
    config = write_config(tmp_path, SINGLE_USE, pulse=0.05, deadline=1.0)
    config.write_text(config.read_text().replace("127.0.0.1:0", f"127.0.0.1:{port}"))
    store = tmp_path / "state" / "entries.sqlite3"

    def get(code: str) -> str:
        url = (f"http://127.0.0.1:{port}/voipgrid?token={TOKEN}&code={code}"
               f"&did=%2B{BARRIER[1:]}")
        with urllib.request.urlopen(url, timeout=10) as response:
            return str(response.read().decode())

    answers: list[str] = []
    daemon = DaemonProcess(config)
    try:
        daemon.wait_for("listening")
        blocker = sqlite3.connect(store, isolation_level=None, timeout=5)
        blocker.execute("BEGIN EXCLUSIVE")
        try:
            assert get("000000") == "status=NAK"
            daemon.wait_for("entry store failing; holding entries in memory")
            answers.append(get("111111"))
            daemon.signal(signal.SIGKILL)
            daemon.proc.wait(10)
        finally:
            blocker.execute("COMMIT")
            blocker.close()
    finally:
        daemon.stop()

    again = DaemonProcess(config)
    try:
        again.wait_for("listening")
        answers += [get("111111"), get("111111")]
    finally:
        assert again.stop() == 0
    assert answers.count("status=ACK") == 1, answers
    assert answers == ["status=ERR", "status=ACK", "status=NAK"]
