"""A daemon that cannot keep up: late calls open nothing, the log stays small,
connections are capped, and it answers again once the load is gone."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import resource
import signal
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from structlog.testing import capture_logs

from gated.book.config import ServerConfig
from gated.site.gatekeeper import RawCall
from gated.site.logs import LibraryRecords
from gated.site.sockets import FILES_RESERVED
from gated.site.store import read_entries

from .helpers import BARRIER, TOKEN, FakeActuator, FakeClock, write_config
from .process import DaemonProcess, free_port
from .test_systemd import unit_settings

CALL = f"/voipgrid?token={TOKEN}&code=471123&did=%2B{BARRIER[1:]}&callerid=0612345678"


def daemon_config(tmp_path: Path, server: str = "", **kwargs: Any) -> tuple[Path, int]:
    """A config on a free port, with ``server`` lines added to [server]."""
    port = free_port()
    config = write_config(tmp_path, **kwargs)
    config.write_text(config.read_text().replace("127.0.0.1:0", f"127.0.0.1:{port}")
                      .replace("[gates.barrier]", f"{server}\n\n[gates.barrier]", 1))
    return config, port


def call(port: int, timeout: float = 10.0) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{CALL}", timeout=timeout) as response:
        return str(response.read().decode())


def answers_again(port: int, within: float = 15.0) -> str:
    """The first answer the daemon gives, retrying while it still refuses or resets."""
    deadline = time.monotonic() + within
    while True:
        try:
            return call(port, timeout=5)
        except (OSError, urllib.error.URLError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


async def test_a_call_past_its_deadline_on_arrival_opens_nothing(start_daemon: Any) -> None:
    """A call that reached gated longer ago than the answer deadline is ERR `late`: not
    decided, not opened, no use spent, and recorded."""
    clock = FakeClock()
    barrier = FakeActuator("barrier")
    running = await start_daemon('\n[[codes]]\nname = "Once"\ncode = "111111"\n'
                                 'gates = ["barrier"]\nmax_uses = 1\n',
                                 actuators={"barrier": barrier}, clock=clock)
    gatekeeper = running.daemon.gatekeeper
    late = RawCall(code="111111", did=BARRIER, callerid="0612345678",
                   received=clock.mono - 3.2)
    answer = await gatekeeper.call(late)
    assert (answer.status, answer.reason) == ("ERR", "late")
    assert barrier.opened == []
    in_time = RawCall(code="111111", did=BARRIER, callerid="0612345678",
                      received=clock.mono - 2.5)
    assert (await gatekeeper.call(in_time)).status == "ACK"  # the one use was still there
    assert len(barrier.opened) == 1
    await gatekeeper.store.flush()
    first = read_entries(gatekeeper.store.path)[-1]
    assert (first.status, first.reason, first.gate, first.credential) == (
        "ERR", "late", "barrier", "")
    assert first.latency_ms >= 3200


def test_a_request_held_in_the_kernel_past_the_deadline_never_opens(tmp_path: Path) -> None:
    """The daemon stopped while a valid call waits in the kernel longer than the answer
    deadline: once it runs again the call is answered ERR `late` and the relay stays off."""
    config, port = daemon_config(tmp_path, deadline=1.0)
    daemon = DaemonProcess(config)
    try:
        daemon.wait_for("listening")
        daemon.signal(signal.SIGSTOP)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as pbx:
            # The kernel completes the handshake and takes the bytes for the stopped daemon.
            pbx.sendall(f"GET {CALL} HTTP/1.1\r\nHost: gate\r\nConnection: close\r\n\r\n"
                        .encode())
            time.sleep(1.5)  # past the 1 s deadline, the request still unread
            daemon.signal(signal.SIGCONT)
            answer = b""
            while chunk := pbx.recv(4096):
                answer += chunk
        entry = daemon.wait_for("entry")
    finally:
        daemon.stop()
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"\r\n\r\nstatus=ERR")
    assert (entry["status"], entry["reason"], entry["gate"]) == ("ERR", "late", "barrier")
    assert not [e for e in daemon.events if e["event"] == "relay on"]
    history = next(e for e in daemon.events
                   if e["event"] == "mock pin history" and e["gate"] == "barrier")
    assert history["states"] == [False]


@contextlib.contextmanager
def idle_connections(port: int, count: int) -> Iterator[list[socket.socket]]:
    held = []
    try:
        for _ in range(count):
            held.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        yield held
    finally:
        for sock in held:
            sock.close()


def test_an_accept_loop_out_of_file_handles_does_not_flood_the_log(tmp_path: Path) -> None:
    """With its file handles used up by idle connections the daemon logs the failing
    accept a bounded number of times, and answers again once they close."""
    config, port = daemon_config(tmp_path, "max_connections = 1000")

    def few_files() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))

    daemon = DaemonProcess(config, preexec_fn=few_files)
    try:
        daemon.wait_for("listening")
        seen = len(daemon.events)
        with idle_connections(port, 80):
            time.sleep(3)  # out of handles from the first connections on; let it log
            flood = daemon.drain(timeout=0.5)[seen:]
        assert answers_again(port) == "status=ACK&callername=Welcome&destination=201"
    finally:
        daemon.stop()
    print(f"{len(flood)} log lines in 3 s without file handles")
    failures = [e for e in flood if e["event"].startswith("socket.accept() out of system")]
    assert len(failures) == 1 and failures[0]["error"] == "OSError(EMFILE)"
    assert len(flood) < 20


class SlowRelay:
    """Opens after ``delay``; ``busy`` is set once ``count`` opens are under way."""

    def __init__(self, delay: float, count: int) -> None:
        self.delay, self.count = delay, count
        self.busy = asyncio.Event()

    async def open(self) -> str:
        self.count -= 1
        if self.count <= 0:
            self.busy.set()
        await asyncio.sleep(self.delay)
        return "faked"

    async def close(self) -> None:
        pass


async def test_connections_past_max_connections_are_closed_at_once(start_daemon: Any,
                                                                   tmp_path: Path) -> None:
    """Past max_connections, while every connection is being answered, a new one is told
    503 and closed before anything is read; once they are answered, calls are again."""
    slow = SlowRelay(delay=1.0, count=2)
    config = write_config(tmp_path, server="max_connections = 2")
    running = await start_daemon(config=config, actuators={"barrier": slow})
    host, port = running.daemon.listening[0]
    request = f"GET {CALL} HTTP/1.1\r\nHost: gate\r\nConnection: close\r\n\r\n".encode()

    async def everything(data: bytes) -> bytes:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(data)
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        return answer

    with capture_logs() as logs:
        calls = [asyncio.create_task(everything(request)) for _ in range(2)]
        await asyncio.wait_for(slow.busy.wait(), 10)  # both being answered
        busy = await everything(request)
        answers = await asyncio.gather(*calls)
        again = await everything(request)
    assert busy.startswith(b"HTTP/1.1 503 ")
    assert [a.endswith(b"\r\n\r\nstatus=ACK&callername=Welcome&destination=201")
            for a in [*answers, again]] == [True] * 3
    refused = [e for e in logs if e["event"] == "connections refused: max_connections reached"]
    assert [e["limit"] for e in refused] == [2]


def _closed(sock: socket.socket) -> bool:
    sock.settimeout(0.2)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


def test_silent_connections_at_the_cap_make_room_for_a_call(tmp_path: Path) -> None:
    """Connections that send nothing cannot keep the PBX out: at the cap, the one
    that has owed its request longest is closed at once, and the call is answered."""
    config, port = daemon_config(tmp_path, "max_connections = 4")
    daemon = DaemonProcess(config)
    try:
        daemon.wait_for("listening")
        with idle_connections(port, 4) as held:
            assert call(port) == "status=ACK&callername=Welcome&destination=201"
            assert [_closed(sock) for sock in held] == [True, False, False, False]
        daemon.wait_for("connection closed to make room")
    finally:
        daemon.stop()


def test_kept_alive_connections_at_the_cap_make_room_for_a_call(tmp_path: Path) -> None:
    """Connections kept alive between requests give way too: at the cap, the one idle
    longest is closed and the call is answered."""
    config, port = daemon_config(tmp_path, "max_connections = 4")
    daemon = DaemonProcess(config)
    try:
        daemon.wait_for("listening")
        with idle_connections(port, 4) as held:
            for sock in held:  # each one served and kept alive
                sock.sendall(b"GET /elsewhere HTTP/1.1\r\nHost: gate\r\n\r\n")
                assert sock.recv(4096).startswith(b"HTTP/1.1 404")
            assert call(port) == "status=ACK&callername=Welcome&destination=201"
            assert [_closed(sock) for sock in held] == [True, False, False, False]
    finally:
        daemon.stop()


def test_the_unit_leaves_file_handles_beyond_max_connections() -> None:
    """systemd's LimitNOFILE holds the default max_connections and the daemon's own files."""
    default = ServerConfig(tokens=["x" * 12]).max_connections
    assert int(unit_settings()["LimitNOFILE"][0]) >= default + FILES_RESERVED


def test_a_repeating_library_error_is_shown_once_per_window_with_a_count() -> None:
    """The same asyncio error over and over: the first is shown, then one per window
    saying how many were withheld; another error is shown at once."""
    clock = FakeClock()
    limiter = LibraryRecords(window=10.0, clock=clock.monotonic)

    def record(message: str) -> logging.LogRecord:
        exc = OSError(errno.EMFILE, "Too many open files")
        return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, message, None,
                                 (OSError, exc, None))

    accept = "socket.accept() out of system resource\nsocket: <TransportSocket fd=6>"
    shown = []
    for _ in range(50):  # 50 attempts a second for 25 s
        for _ in range(50):
            if limiter.filter(each := record(accept)):
                shown.append(each)
        clock.advance(0.5)
    assert len(shown) == 3
    assert [r.__dict__.get("repeated", 0) for r in shown] == [0, 999, 999]
    assert {(r.getMessage(), r.__dict__["error"]) for r in shown} == {
        ("socket.accept() out of system resource", "OSError(EMFILE)")}
    assert limiter.filter(record("Fatal error on transport"))
