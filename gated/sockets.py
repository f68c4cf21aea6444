"""What the webhook asks of its sockets: how long a request waited, how many may be open.

When the daemon cannot accept (out of file handles, stopped, swapped out), a
request waits in the kernel; accepted late, aiohttp reads it at once and it
looks fresh. The kernel knows better: TCP_INFO says how long ago the last
bytes arrived, so the answer deadline counts from when the request reached
gated, not from when gated got round to it.
"""

from __future__ import annotations

import asyncio
import resource
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

import structlog
from aiohttp import web

from gated.logs import REPEAT_WINDOW

log = structlog.get_logger("gated.sockets")

# struct tcp_info (linux/tcp.h, stable ABI): eight one-byte fields, then __u32s;
# tcpi_last_data_recv, milliseconds since data last arrived, is the twelfth.
_TCP_INFO = getattr(socket, "TCP_INFO", None)
_LAST_DATA_RECV = struct.Struct("=I")
_LAST_DATA_RECV_OFFSET = 52
_TCP_INFO_NEEDED = _LAST_DATA_RECV_OFFSET + _LAST_DATA_RECV.size

# Files the daemon holds besides webhook connections: the store and its WAL,
# the broker, forwards, the metrics listener and its clients, pins, the loop.
FILES_RESERVED = 64

_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
         b"Connection: close\r\n\r\n")


def waited(transport: asyncio.BaseTransport | None) -> float:
    """Seconds since the last bytes arrived on this connection; 0.0 where the kernel
    cannot say (not Linux, not TCP)."""
    sock: Any = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or _TCP_INFO is None:
        return 0.0
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _TCP_INFO_NEEDED)
    except OSError:
        return 0.0
    if len(info) < _TCP_INFO_NEEDED:
        return 0.0
    return float(_LAST_DATA_RECV.unpack_from(info, _LAST_DATA_RECV_OFFSET)[0]) / 1000


def fit_file_limit(max_connections: int) -> None:
    """Room for ``max_connections`` and the daemon's own files: raise the soft file
    limit as far as the hard one allows, and say so when that is not enough."""
    need = max_connections + FILES_RESERVED
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    allowed = need if hard == resource.RLIM_INFINITY else min(need, hard)
    if allowed > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (allowed, hard))
        soft = allowed
    if soft < need:
        log.warning("file limit too low for max_connections: when it runs out, calls wait "
                    "and the store may fail; lower max_connections or raise LimitNOFILE",
                    limit=soft, max_connections=max_connections, needed=need)


class _Busy(asyncio.Protocol):
    """A connection past the cap: told 503 and closed before anything is read."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(_BUSY)
        transport.close()


class _Capped:
    """aiohttp's protocol factory, refusing connections past ``limit``.

    At the cap, the connection that has been silent longest makes room if it
    has been silent for over ``idle_after`` seconds (no request can still be
    in progress on it then): otherwise a few connections that never send a
    request would keep the PBX out until they time out.
    """

    def __init__(self, server: web.Server, limit: int, idle_after: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.server = server
        self.limit = limit
        self.idle_after = idle_after
        self.clock = clock
        self.refused = 0
        self.told = -REPEAT_WINDOW
        self.next_scan = 0.0

    def __call__(self) -> asyncio.Protocol:
        # aiohttp counts a connection once it is made, a loop turn after this
        # call: one burst of accepts (the listen backlog) may go past the cap.
        if len(self.server.connections) < self.limit:
            return self.server()
        now = self.clock()
        # A scan asks the kernel about every connection: under a flood, only
        # when one of them can have gone silent long enough since the last.
        if now >= self.next_scan:
            silent, idlest = max(((waited(c.transport), c) for c in self.server.connections),
                                 key=lambda pair: pair[0], default=(0.0, None))
            if idlest is not None and silent > self.idle_after:
                log.info("idle connection closed to make room", limit=self.limit)
                idlest.force_close()
                return self.server()
            self.next_scan = now + self.idle_after - silent
        self.refused += 1
        if now - self.told >= REPEAT_WINDOW:
            log.warning("connections refused: max_connections reached", limit=self.limit,
                        refused=self.refused)
            self.told, self.refused = now, 0
        return _Busy()


class CappedSite(web.TCPSite):
    """A TCPSite that closes connections past ``max_connections`` at once, so open
    sockets never take the file handles the store and the broker need."""

    def __init__(self, runner: web.BaseRunner, host: str | None, port: int, *,
                 max_connections: int, idle_after: float,
                 reuse_address: bool | None = None) -> None:
        super().__init__(runner, host, port, reuse_address=reuse_address)
        self.max_connections = max_connections
        self.idle_after = idle_after

    async def start(self) -> None:
        # TCPSite.start, with the runner's server behind the cap.
        fit_file_limit(self.max_connections)
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            _Capped(server, self.max_connections, self.idle_after), self._host, self._port,
            backlog=self._backlog, reuse_address=self._reuse_address,
        )
        self._bound_port = self._server.sockets[0].getsockname()[1]
