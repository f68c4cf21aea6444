"""What reaches the log from outside: never a request line, never a control character."""

from __future__ import annotations

import socket
import sqlite3
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from gated.cli import main
from gated.site.store import INSERT_ENTRY, Entry, read_entries

from .helpers import BARRIER, TOKEN, write_config
from .process import DaemonProcess, free_port

CODE = "471123"
QUERY = f"token={TOKEN}&code={CODE}&did=%2B{BARRIER[1:]}"
# Each is refused by aiohttp's parser before gated sees it; each carries the token and a
# valid code, as a PBX request would.
UNPARSABLE = {
    "non-ASCII in the query": f"GET /voipgrid?{QUERY}&callername=José HTTP/1.1\r\n\r\n",
    "over-long line": f"GET /voipgrid?{QUERY}&callername={'x' * 4100} HTTP/1.1\r\n\r\n",
    "control character": f"GET /voipgrid?{QUERY}&callername=a\x01b HTTP/1.1\r\n\r\n",
    "bad version": f"GET /voipgrid?{QUERY} HTTP/1.x\r\n\r\n",
    "bad header": f"GET /voipgrid HTTP/1.1\r\nX-Token: {TOKEN}\x01{CODE}\r\n\r\n",
    "bad length": f"POST /voipgrid HTTP/1.1\r\nContent-Length: {CODE}{TOKEN}\r\n\r\n",
    # A bad method is only logged at error level when it follows a good request.
    "bad method": f"GET /nothing HTTP/1.1\r\n\r\nG\x01T /voipgrid?{QUERY} HTTP/1.1\r\n\r\n",
}


def exchange(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


@pytest.mark.parametrize("parser", ["C", "Python"])
def test_unparsable_requests_never_put_the_request_line_in_the_log(tmp_path: Path,
                                                                   parser: str) -> None:
    """Bytes aiohttp cannot parse get a 400, and the daemon logs one line naming the peer
    and the error, never the token or the code they carried."""
    port = free_port()
    config = write_config(tmp_path)
    config.write_text(config.read_text().replace("127.0.0.1:0", f"127.0.0.1:{port}"))
    env = {"AIOHTTP_NO_EXTENSIONS": "1"} if parser == "Python" else {}
    daemon = DaemonProcess(config, env=env)
    try:
        daemon.wait_for("listening")
        for name, request in UNPARSABLE.items():
            answer = exchange(port, request.encode())
            assert b" 400 " in answer, name
        daemon.wait_for("bad request refused", remote="127.0.0.1")
    finally:
        daemon.stop()
    text = "\n".join(repr(e) for e in daemon.events)
    assert TOKEN not in text and CODE not in text
    assert not [e for e in daemon.events if e["event"] in ("entry", "relay on")]
    refused = [e for e in daemon.events if e["event"] == "bad request refused"]
    assert refused[0]["error"] in {"InvalidURLError", "BadHttpMessage", "LineTooLong"}
    assert all(e["level"] == "warning" and "exception" not in e for e in refused)


NO_LOGGER_PRINTS_IT = """
import asyncio, logging, socket
from aiohttp import web
from aiohttp.http_parser import HttpRequestParser
from gated.site import logs

logs.configure("{fmt}", "debug")
# Every logger at its most talkative: debug records, the access log switched back on.
logging.getLogger().setLevel(logging.DEBUG)
logging.getLogger("aiohttp.access").disabled = False

REQUEST = b"GET /voipgrid?token={token}&code={code}&callername=Jos\\xc3\\xa9 HTTP/1.1\\r\\n\\r\\n"
GOOD = (b"GET /voipgrid?token={token}&code={code} HTTP/1.1\\r\\n"
        b"Host: x\\r\\nConnection: close\\r\\n\\r\\n")


class Strict(asyncio.Protocol):
    # A protocol that lets the parser's error escape: asyncio's own logger reports it.
    def connection_made(self, transport):
        self.parser = HttpRequestParser(self, asyncio.get_running_loop(), 2 ** 16)

    def data_received(self, data):
        self.parser.feed_data(data)


def send(port, data):
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        while sock.recv(65536):
            pass


async def main():
    app = web.Application()
    app.router.add_get("/voipgrid", lambda request: web.Response(text="status=NAK"))
    runner = web.AppRunner(app)  # aiohttp.access at its default
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    raw = await loop.create_server(Strict, "127.0.0.1", 0)
    for data in (GOOD, REQUEST, b"G\\x01T /" + REQUEST[5:]):
        await asyncio.to_thread(send, port, data)
    await asyncio.to_thread(send, raw.sockets[0].getsockname()[1], REQUEST)
    await asyncio.sleep(0.2)
    raw.close()
    await runner.cleanup()

asyncio.run(main())
print("done")
"""


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_no_logger_prints_a_request_line(fmt: str) -> None:
    """aiohttp.server (debug included), aiohttp.access and asyncio, all switched on, given
    bytes that fail to parse: none of them prints the token or the code."""
    script = NO_LOGGER_PRINTS_IT.format(fmt=fmt, token=TOKEN, code=CODE)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=30, check=True)
    out = result.stdout + result.stderr
    assert out.rstrip().endswith("done")
    assert TOKEN not in out and CODE not in out, out
    assert "bad request refused" in out and "protocol.data_received() call failed" in out


HOSTILE = "\x1b\u009b\u202e\u200f\u2028"  # ESC, C1 CSI, RLO override, RLM mark, line separator
NAMED = '\n[[codes]]\nname = "Night\\u202e shift"\ncode = "8888"\ngates = ["barrier"]\n'


def test_control_and_bidi_characters_reach_no_log_entry_or_gated_log(tmp_path: Path,
                                                                      capsys: Any) -> None:
    """C0/C1 controls, bidi overrides and marks in a callername (or a credential's name, or
    a row stored before) are gone from the daemon's log, the stored entry and `gated log`."""
    port = free_port()
    config = write_config(tmp_path, NAMED)
    config.write_text(config.read_text().replace("127.0.0.1:0", f"127.0.0.1:{port}"))
    daemon = DaemonProcess(config)
    name = urllib.parse.quote(f"Jos\u00e9{HOSTILE}[31m")
    try:
        daemon.wait_for("listening")
        url = (f"http://127.0.0.1:{port}/voipgrid?token={TOKEN}&code=8888"
               f"&did=%2B{BARRIER[1:]}&callername={name}")
        with urllib.request.urlopen(url, timeout=5) as response:
            assert response.read() == b"status=ACK"
        entry = daemon.wait_for("entry")
    finally:
        daemon.stop()
    assert entry["callername"] == "José [31m" and entry["credential"] == "Night shift"
    logged = "".join(str(v) for e in daemon.events for v in e.values())
    assert not set(HOSTILE) & set(logged)
    store = tmp_path / "state" / "entries.sqlite3"
    (stored,) = read_entries(store)
    assert stored.callername == "José [31m"
    old = Entry(time=stored.time, gate="barrier", caller=None, did=None, status="NAK",
                reason="unknown_code", callername=f"old{HOSTILE}row")
    with sqlite3.connect(store) as conn:
        conn.execute(INSERT_ENTRY, tuple(old.as_dict().values()))
    conn.close()
    capsys.readouterr()
    assert main(["-c", str(config), "log"]) == 0
    assert main(["-c", str(config), "log", "--json"]) == 0
    out = capsys.readouterr().out
    assert "Night shift" in out and "old row" in out and "José [31m" in out
    assert not set(HOSTILE) & set(out) and "\\u001b" not in out
