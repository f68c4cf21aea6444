"""The webhook's sockets against clients that never finish: slow heads and bodies,
one address taking every connection, addresses outside allow_from, and what a
refused request is told."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from .helpers import BARRIER, TOKEN, write_config
from .process import DaemonProcess, free_port
from .trickle import Trickle

CALL = f"/voipgrid?token={TOKEN}&code=471123&did=%2B{BARRIER[1:]}&callerid=0612345678"
ACK = b"status=ACK&callername=Welcome&destination=201"


def port_of(running: Any) -> int:
    return int(running.daemon.listening[0][1])


class Client:
    """One raw HTTP/1.1 connection from a chosen loopback address."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int, source: str = "127.0.0.1") -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", port,
                                                       local_addr=(source, 0))
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def answer(self) -> tuple[bytes, bytes]:
        """The next answer's head and body (read by its Content-Length)."""
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 10)
        length = re.search(rb"(?im)^content-length: *(\d+)", head)
        body = await self.reader.readexactly(int(length[1])) if length else b""
        return head, body

    async def call(self) -> bytes:
        await self.send(f"GET {CALL} HTTP/1.1\r\nHost: gate\r\n\r\n".encode())
        return (await self.answer())[1]

    async def closed(self, within: float = 0.3) -> bool:
        """Whether the server has closed this connection (an answer then EOF counts)."""
        try:
            while await asyncio.wait_for(self.reader.read(4096), within):
                pass
        except TimeoutError:
            return False
        except OSError:
            return True
        return True

    async def everything(self, within: float = 10) -> bytes:
        """All the server sends until it closes."""
        data = b""
        with contextlib.suppress(OSError):
            while chunk := await asyncio.wait_for(self.reader.read(4096), within):
                data += chunk
        return data

    def close(self) -> None:
        self.writer.close()


def call(port: int) -> bytes:
    """One call as the PBX makes it: a fresh connection from 127.0.0.1."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{CALL}", timeout=10) as response:
            return bytes(response.read())
    except urllib.error.HTTPError as exc:
        exc.close()
        return f"HTTP {exc.code}".encode()
    except OSError as exc:  # reset or refused: no answer at all
        return f"{type(exc).__name__}".encode()


@pytest.mark.parametrize("body", [False, True], ids=["heads", "bodies"])
def test_trickling_sockets_never_hold_the_pbx_out(tmp_path: Path, body: bool) -> None:
    """40 sockets from 40 addresses, each sending a header line (or a byte of a body)
    every quarter of the deadline and reconnecting at once when closed, against
    max_connections = 32: every call the PBX makes meanwhile is answered, none is
    told 503."""
    port = free_port()
    config = write_config(tmp_path, server="max_connections = 32", deadline=1.0)
    config.write_text(config.read_text().replace("127.0.0.1:0", f"127.0.0.1:{port}"))
    daemon = DaemonProcess(config)
    answers: list[bytes] = []
    try:
        daemon.wait_for("listening")
        sources = [f"127.0.0.{n}" for n in range(2, 42)]
        with Trickle(port, count=40, every=0.25, sources=sources, body=body) as trickle:
            # The cap is full once the sockets past it have been turned away or
            # have made others give way.
            deadline = time.monotonic() + 15
            while trickle.tally.refused + trickle.tally.closed < 8:
                assert time.monotonic() < deadline, trickle.tally
                time.sleep(0.01)
            for _ in range(20):  # over about three deadlines
                answers.append(call(port))
                time.sleep(0.1)
            tally = trickle.tally
    finally:
        daemon.stop()
    print(f"answered {answers.count(ACK)} of {len(answers)}; trickle: {tally}")
    assert answers == [ACK] * len(answers), answers


async def test_one_address_cannot_push_the_pbx_out(start_daemon: Any, tmp_path: Path) -> None:
    """At max_connections, an address holding more than max_per_address makes room
    first: its connections give way before the PBX's older kept-alive ones, and the
    PBX's new call is answered."""
    config = write_config(tmp_path, server="max_connections = 8\nmax_per_address = 4")
    running = await start_daemon(config=config)
    port = port_of(running)
    pbx = [await Client.open(port) for _ in range(2)]
    for client in pbx:  # two calls, each connection kept alive afterwards: idle longest
        assert await client.call() == ACK
    crowd = []
    for _ in range(6):  # the rest of the connections, kept alive too
        client = await Client.open(port, "127.0.0.2")
        await client.send(b"GET /elsewhere HTTP/1.1\r\nHost: gate\r\n\r\n")
        assert (await client.answer())[0].startswith(b"HTTP/1.1 404 ")
        crowd.append(client)
    fresh = await Client.open(port)
    assert await fresh.call() == ACK
    for client in pbx:
        assert await client.call() == ACK
    assert [await client.closed() for client in crowd] == [True] + [False] * 5
    for client in [*pbx, fresh, *crowd]:
        client.close()


async def test_addresses_outside_allow_from_are_closed_at_accept(start_daemon: Any,
                                                                 tmp_path: Path) -> None:
    """With allow_from, a connection from elsewhere is closed at once, nothing read or
    answered; a trusted proxy is heard, and its client is checked in the header."""
    config = write_config(tmp_path, server='trusted_proxies = ["127.0.0.3/32"]',
                          allow_from=("127.0.0.1/32",))
    running = await start_daemon(config=config)
    port = port_of(running)
    request = f"GET {CALL} HTTP/1.1\r\nHost: gate\r\nConnection: close\r\n".encode()
    with capture_logs() as logs:
        stranger = await Client.open(port, "127.0.0.2")
        await stranger.send(request + b"\r\n")
        assert await stranger.everything() == b""
        proxy = await Client.open(port, "127.0.0.3")
        await proxy.send(request + b"X-Forwarded-For: 127.0.0.1\r\n\r\n")
        assert (await proxy.answer())[1] == ACK
        proxied = await Client.open(port, "127.0.0.3")
        await proxied.send(request + b"X-Forwarded-For: 127.0.0.2\r\n\r\n")
        assert (await proxied.answer())[1] == b"forbidden\n"
        pbx = await Client.open(port)
        assert await pbx.call() == ACK
    refused = [e for e in logs if e["event"] == "connections refused: not in allow_from"]
    assert [e["remote"] for e in refused] == ["127.0.0.2"]
    assert [e["remote"] for e in logs if e["event"] == "refused"] == ["127.0.0.2"]  # proxied
    for client in (stranger, proxy, proxied, pbx):
        client.close()


def _server_header(head: bytes) -> list[bytes]:
    return re.findall(rb"(?im)^server:.*$", head)


async def test_an_unparsable_request_is_answered_without_echoing_it(start_daemon: Any) -> None:
    """A request line the parser refuses (an unencoded space in the query) is a 4xx
    whose bytes hold neither the token nor the code; no answer of the webhook or the
    metrics listener names the server software."""
    running = await start_daemon('\n[metrics]\nlisten = "127.0.0.1:0"\n')
    port = port_of(running)
    bad = await Client.open(port)
    await bad.send(f"GET /voipgrid?token={TOKEN}&code=1234 5&did=%2B{BARRIER[1:]} HTTP/1.1"
                   "\r\nHost: gate\r\n\r\n".encode())
    answer = await bad.everything()
    assert re.match(rb"HTTP/1\.[01] 4\d\d ", answer), answer
    assert TOKEN.encode() not in answer and b"1234" not in answer, answer
    assert _server_header(answer) == []
    heads = []
    for target in (CALL, "/elsewhere"):
        client = await Client.open(port)
        await client.send(f"GET {target} HTTP/1.1\r\nHost: gate\r\n\r\n".encode())
        heads.append((await client.answer())[0])
        client.close()
    metrics_port = running.daemon.metrics_listening[0][1]
    for target in ("/metrics", "/healthz", "/elsewhere"):
        client = await Client.open(metrics_port)
        await client.send(f"GET {target} HTTP/1.1\r\nHost: gate\r\n\r\n".encode())
        heads.append((await client.answer())[0])
        client.close()
    assert [_server_header(head) for head in heads] == [[]] * 5, heads
    bad.close()


async def test_a_trickled_body_is_closed_at_the_deadline(start_daemon: Any) -> None:
    """A POST whose body is still arriving when the answer deadline has passed is
    closed: a request that cannot be answered in time holds no connection."""
    running = await start_daemon(deadline=0.5)
    client = await Client.open(port_of(running))
    await client.send(b"POST /voipgrid HTTP/1.1\r\nHost: gate\r\n"
                      b"Content-Type: application/x-www-form-urlencoded\r\n"
                      b"Content-Length: 200\r\n\r\ntoken=")
    sent = 0
    deadline = time.monotonic() + 5
    while not await client.closed(within=0.1):
        assert time.monotonic() < deadline, f"still open after {sent} bytes of body"
        with contextlib.suppress(OSError):
            await client.send(b"x")
        sent += 1
    assert sent < 194
    client.close()


async def test_connections_that_end_a_body_after_their_answer_still_give_way(
        start_daemon: Any, tmp_path: Path) -> None:
    """A body that ends after its answer (a POST to a path that reads none) leaves its
    connection idle, so at the cap it still makes room for a call."""
    config = write_config(tmp_path, server="max_connections = 2")
    running = await start_daemon(config=config)
    port = port_of(running)
    held = []
    for _ in range(2):
        client = await Client.open(port)
        await client.send(b"POST /elsewhere HTTP/1.1\r\nHost: gate\r\nContent-Length: 5\r\n\r\n")
        assert (await client.answer())[0].startswith(b"HTTP/1.1 404 ")
        await client.send(b"x=123")
        held.append(client)
    pbx = await Client.open(port)
    assert await pbx.call() == ACK
    assert [await client.closed() for client in held] == [True, False]
    for client in [*held, pbx]:
        client.close()
