"""A real HTTP receiver for forwarded entries, and [[forward]] config snippets."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from .process import free_port

# 32 random bytes, base64, as `openssl rand -base64 32` makes them.
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw9Y1wnGEI+Zs="
API_SECRET = "ga4-api-secret-0123"


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    at: float  # time.monotonic() when it arrived


@dataclass
class Receiver:
    """An aiohttp server on a fixed free port: down until started, scripted answers."""

    port: int = field(default_factory=free_port)
    # Statuses to answer, in order; 200 once they run out.
    script: list[int] = field(default_factory=list)
    hang: bool = False
    requests: list[Received] = field(default_factory=list)
    _runner: web.AppRunner | None = None
    _arrived: asyncio.Condition = field(default_factory=asyncio.Condition)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def _handle(self, request: web.Request) -> web.Response:
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
        await web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

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
    return (f"http://127.0.0.1:{receiver.port}/mp/collect?measurement_id=G-TEST"
            f"&api_secret={API_SECRET}")


def headers_of(received: Received) -> dict[str, Any]:
    return {k.lower(): v for k, v in received.headers.items()}
