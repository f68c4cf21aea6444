"""A real HTTP receiver for forwarded entries, and [[forward]] config snippets."""

from __future__ import annotations

import asyncio
import secrets
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

# 32 random bytes, base64, as `openssl rand -base64 32` makes them.
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw9Y1wnGEI+Zs="
API_SECRET = "ga4-api-secret-0123"


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    at: float  # time.monotonic() when it arrived


def _held_port() -> socket.socket:
    """A socket bound to a free port, not listening: the port is held from now on (no
    other socket can bind it, SO_REUSEADDR or not) and refuses connections until
    ``listen``. A port number picked and let go is anyone's until it is bound again:
    another test's server, in this run or another on the machine, could take it
    and be sent the forwards meant for this one."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


@dataclass
class Receiver:
    """An aiohttp server on a port it holds from the start: down (refusing connections)
    until started, scripted answers. Only requests under its own random path count:
    whatever else on the machine reaches its port (another run's sender aimed at a port
    since reused, someone's curl) cannot know that path."""

    # Statuses to answer, in order; 200 once they run out.
    script: list[int] = field(default_factory=list)
    hang: bool = False
    requests: list[Received] = field(default_factory=list)
    strays: list[str] = field(default_factory=list)  # paths asked for outside its own
    _socket: socket.socket = field(default_factory=_held_port)
    _prefix: str = field(default_factory=lambda: f"/r{secrets.token_hex(8)}")
    _runner: web.AppRunner | None = None
    _arrived: asyncio.Condition = field(default_factory=asyncio.Condition)

    @property
    def port(self) -> int:
        return int(self._socket.getsockname()[1])

    @property
    def base(self) -> str:
        """The receiver's own root: what a URL for it starts with."""
        return f"http://127.0.0.1:{self.port}{self._prefix}"

    @property
    def url(self) -> str:
        return f"{self.base}/hook"

    async def _handle(self, request: web.Request) -> web.Response:
        if not request.path.startswith(self._prefix + "/"):
            self.strays.append(request.path)
            return web.Response(status=404)
        body = await request.read()
        self.requests.append(Received(dict(request.headers), body, time.monotonic()))
        async with self._arrived:
            self._arrived.notify_all()
        if self.hang:
            await asyncio.sleep(3600)
        status = self.script.pop(0) if self.script else 200
        return web.Response(status=status, text="bad field: client_id" if status == 400 else "")

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None,
                                     shutdown_timeout=0.1)
        await self._runner.setup()
        # Listens on the socket held since the start; closed with the runner.
        await web.SockSite(self._runner, self._socket).start()
        return self

    async def stop(self) -> None:
        """Stop answering and let the port go (a receiver is started once)."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self._socket.close()

    async def wait_for(self, count: int, within: float = 10.0) -> list[Received]:
        """Until ``count`` requests have arrived (all of them so far, in order)."""
        async with asyncio.timeout(within), self._arrived:
            await self._arrived.wait_for(lambda: len(self.requests) >= count)
        return self.requests


def forward_table(url: str, *, name: str = "crm", fmt: str = "json", caller: str = "pseudonym",
                  extra: str = "") -> str:
    secret = f'secret = "{SECRET}"\n' if fmt == "json" else ""
    return (f'\n[[forward]]\nname = "{name}"\nurl = "{url}"\nformat = "{fmt}"\n'
            f'caller = "{caller}"\n{secret}{extra}\n')


def ga4_url(receiver: Receiver) -> str:
    return f"{receiver.base}/mp/collect?measurement_id=G-TEST&api_secret={API_SECRET}"


def headers_of(received: Received) -> dict[str, Any]:
    return {k.lower(): v for k, v in received.headers.items()}
