"""What the webhook asks of its sockets: who is heard, for how long, how many at once.

A PBX sends its request whole the moment it connects; a client that does not
can never be answered within the deadline. So:

- an address outside ``allow_from`` is closed at accept, before anything is
  read (a trusted proxy is let in: its clients are named in its header);
- a request whose head (and body) is not whole within the answer deadline is
  closed;
- past ``max_connections``, a connection gives way for the new one: the one
  longest in sending its request, then the one idle longest between requests,
  never one being answered, and of each kind first one of an address holding
  more than ``max_per_address``. Only when every connection is being answered
  is the new one told 503, before anything is read. So trickling sockets never
  hold the PBX out, and one address cannot push out the others.

When the daemon cannot accept (out of file handles, stopped, swapped out), a
request waits in the kernel; accepted late, aiohttp reads it at once and it
looks fresh. The kernel knows better: TCP_INFO says how long ago the last
bytes arrived, so the answer deadline counts from when the request reached
gated, not from when gated got round to it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import resource
import socket
import struct
from http import HTTPStatus
from typing import Any, Protocol

import structlog
from aiohttp import hdrs, web
from aiohttp.web_protocol import RequestHandler

from gated.site.logs import REPEAT_WINDOW

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
# A request's head arrives with its connection; one still unfinished after
# this share of the deadline is no PBX's, and gives way before an idle one.
FRESH_SHARE = 0.1

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


class Admission(Protocol):
    """Who may connect, by the address a connection comes from (a port: the webhook's
    settings, which a reload replaces, say it)."""

    def admits(self, address: str) -> bool:
        """Whether to hear this address at all; False closes it at accept."""

    def vouched(self, address: str) -> bool:
        """Whether this address is known (the PBX's, a trusted proxy's) and so never
        counted against ``max_per_address``."""


class Everyone:
    """Admission for a listener that hears any address and vouches for none."""

    def admits(self, address: str) -> bool:
        return True

    def vouched(self, address: str) -> bool:
        return False


def counted_as(address: str) -> str:
    """The address ``max_per_address`` counts by: an IPv6 client holds its /64, at least."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return address


async def _unnamed(_request: web.Request, response: web.StreamResponse) -> None:
    response.headers.popall(hdrs.SERVER, None)


def name_no_server(app: web.Application) -> None:
    """Answers of ``app`` carry no Server header (aiohttp's names its version)."""
    app.on_response_prepare.append(_unnamed)


class _Plain(web.Response):
    """An answer aiohttp makes itself (a request it could not parse, a failed
    handler), named by its status alone: no Server header, nothing the client sent."""

    def __init__(self, status: int) -> None:
        super().__init__(status=status, text=f"{status} {HTTPStatus(status).phrase}\n",
                         content_type="text/plain")
        self.force_close()

    async def _prepare_headers(self) -> None:
        # No request matched a route, so no app's on_response_prepare runs for it.
        await super()._prepare_headers()
        self.headers.popall(hdrs.SERVER, None)


class _Repeated:
    """A warning for what may happen thousands of times a second: the first at once,
    then at most one each REPEAT_WINDOW, saying how many."""

    def __init__(self, event: str) -> None:
        self.event = event
        self.count = 0
        self.told = -REPEAT_WINDOW

    def __call__(self, now: float, **fields: Any) -> None:
        self.count += 1
        if now - self.told >= REPEAT_WINDOW:
            log.warning(self.event, count=self.count, **fields)
            self.told, self.count = now, 0


class _Busy(asyncio.Protocol):
    """A connection past the cap: told 503 and closed before anything is read."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(_BUSY)
        transport.close()


class _Arrival(asyncio.Protocol):
    """A connection not yet let in: where it comes from decides, before anything is read."""

    def __init__(self, connections: Connections) -> None:
        self.connections = connections

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.connections.arrive(transport)


class _Connection(RequestHandler):
    """aiohttp's connection, telling ``Connections`` where its request stands.

    ``since``: when it began to owe a request (connected, or the first byte after
    its last answer), None while it owes none. ``pending``: requests whose head
    is whole, not yet answered; ``body``: the last one's body while it still
    arrives. It is idle when it owes none and has none pending.
    """

    __slots__ = ("address", "body", "closed", "connections", "counted", "idle_since", "pending",
                 "since", "timer")

    def __init__(self, connections: Connections, address: str, counted: str | None) -> None:
        server = connections.server
        # The runner's settings (limits, keep-alive), as server() would pass them.
        super().__init__(server, loop=connections.loop, **server._kwargs)
        self.connections = connections
        self.address = address
        self.counted = counted  # as max_per_address counts it; None: not counted
        self.since: float | None = None
        self.idle_since = 0.0
        self.pending = 0
        self.body: Any = None  # the body of the last request, while it still arrives
        self.timer: asyncio.TimerHandle | None = None
        self.closed = False

    @property
    def answering(self) -> bool:
        """A whole request is being answered (not one whose body still arrives)."""
        return bool(self.pending) and self.body is None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.connections.owes(self)

    def data_received(self, data: bytes) -> None:
        if self.since is None and data:
            self.connections.owes(self)
        before = len(self._messages)
        super().data_received(data)
        if parsed := len(self._messages) - before:
            self.pending += parsed
            self.body = self._messages[-1][1]
        if self.since is not None and self.body is not None and self.body.is_eof():
            self.body = None
            self.connections.whole(self)
            if not self.pending:  # a body that ended after its answer (aiohttp read it out)
                self.connections.idles(self)

    def log_access(self, request: Any, response: Any, time: float | None) -> None:
        # Called once each answer is written: the one hook aiohttp has for it.
        super().log_access(request, response, time)
        self.pending = max(self.pending - 1, 0)
        if not self.pending and self.since is None:
            self.connections.idles(self)

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        # aiohttp's own answer quotes the request line it could not parse, token
        # and code included; it still logs (filtered) and checks nothing was sent.
        super().handle_error(request, status, exc, message)
        return _Plain(status)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.connections.gone(self)
        super().connection_lost(exc)


class Connections:
    """The listener's protocol factory: its open connections, and who gives way."""

    def __init__(self, server: web.Server, *, limit: int, per_address: int,
                 deadline: float, admission: Admission) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.limit = limit
        self.per_address = per_address
        self.deadline = deadline
        self.fresh = deadline * FRESH_SHARE
        self.admission = admission
        # Both oldest first: a connection enters at the end when it changes state.
        self.receiving: dict[_Connection, None] = {}
        self.idle: dict[_Connection, None] = {}
        self.count = 0
        self.by_address: dict[str, int] = {}
        self.crowded: set[str] = set()  # addresses holding more than per_address
        self.refused = _Repeated("connections refused: max_connections reached")
        self.unknown = _Repeated("connections refused: not in allow_from")
        self.slow = _Repeated("requests closed: not whole within the answer deadline")
        self.evicted = _Repeated("connection closed to make room")

    def __call__(self) -> asyncio.Protocol:
        return _Arrival(self)

    def arrive(self, transport: asyncio.BaseTransport) -> None:
        """Let a new connection in, making room if need be, or close it."""
        peer = transport.get_extra_info("peername")
        address = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        now = self.loop.time()
        if not self.admission.admits(address):
            self.unknown(now, remote=address)
            transport.close()
            return
        if self.count >= self.limit:
            victim = self._victim(now)
            if victim is None:
                self.refused(now, limit=self.limit)
                _Busy().connection_made(transport)
                return
            self._evict(victim, now)
        counted = None if self.admission.vouched(address) else counted_as(address)
        connection = _Connection(self, address, counted)
        self.count += 1
        if counted is not None:
            held = self.by_address[counted] = self.by_address.get(counted, 0) + 1
            if held > self.per_address:
                self.crowded.add(counted)
        transport.set_protocol(connection)
        connection.connection_made(transport)

    def _victim(self, now: float) -> _Connection | None:
        """Who gives way: the one longest in sending its request (head or body), once
        it has had time to send it; else the one idle longest; else the one longest
        in sending; never one being answered (None: all are). Of each kind, one of
        an address holding more than max_per_address goes first."""
        fresh_from = now - self.fresh
        slow = (c for c in self.receiving
                if c.since is not None and c.since <= fresh_from and not c.answering)
        young = (c for c in self.receiving
                 if c.since is not None and c.since > fresh_from and not c.answering)
        for kind in (slow, iter(self.idle), young):
            first = None
            for connection in kind:
                if connection.counted in self.crowded:
                    return connection
                if first is None:
                    first = connection
                    if not self.crowded:
                        break
            if first is not None:
                return first
        return None

    def _evict(self, connection: _Connection, now: float) -> None:
        self.evicted(now, remote=connection.address)
        self._drop(connection)
        connection.force_close()

    def owes(self, connection: _Connection) -> None:
        """It begins to owe a request: it must be whole within the deadline."""
        if connection.closed:
            return
        now = self.loop.time()
        connection.since = now
        self.idle.pop(connection, None)
        self.receiving[connection] = None
        connection.timer = self.loop.call_at(now + self.deadline, self._too_slow, connection)

    def whole(self, connection: _Connection) -> None:
        connection.since = None
        self.receiving.pop(connection, None)
        if connection.timer is not None:
            connection.timer.cancel()
            connection.timer = None

    def idles(self, connection: _Connection) -> None:
        if connection.closed:
            return
        connection.idle_since = self.loop.time()
        self.idle[connection] = None

    def _too_slow(self, connection: _Connection) -> None:
        connection.timer = None
        if connection.since is not None:
            self.slow(self.loop.time(), remote=connection.address)
            self._drop(connection)
            connection.force_close()

    def gone(self, connection: _Connection) -> None:
        self._drop(connection)

    def _drop(self, connection: _Connection) -> None:
        """Forget a connection that is closing (its socket goes a loop turn later)."""
        if connection.closed:
            return
        connection.closed = True
        self.whole(connection)
        self.idle.pop(connection, None)
        self.count -= 1
        counted = connection.counted
        if counted is not None:
            held = self.by_address[counted] = self.by_address[counted] - 1
            if held <= self.per_address:
                self.crowded.discard(counted)
            if not held:
                del self.by_address[counted]


class CappedSite(web.TCPSite):
    """A TCPSite behind ``Connections``: at most ``max_connections`` open (so sockets
    never take the file handles the store and the broker need), an address with
    more than ``max_per_address`` the first to make room, none from outside
    ``admission``, and no request slower than ``deadline``."""

    def __init__(self, runner: web.BaseRunner, host: str | None, port: int, *,
                 max_connections: int, deadline: float,
                 max_per_address: int | None = None, admission: Admission | None = None,
                 reuse_address: bool | None = None) -> None:
        super().__init__(runner, host, port, reuse_address=reuse_address)
        self.max_connections = max_connections
        self.max_per_address = max_per_address or max_connections
        self.deadline = deadline
        self.admission = admission or Everyone()
        self.connections: Connections | None = None

    async def start(self) -> None:
        # TCPSite.start, with the runner's server behind Connections.
        fit_file_limit(self.max_connections)
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        self.connections = Connections(server, limit=self.max_connections,
                                       per_address=self.max_per_address,
                                       deadline=self.deadline, admission=self.admission)
        self._server = await asyncio.get_running_loop().create_server(
            self.connections, self._host, self._port,
            backlog=self._backlog, reuse_address=self._reuse_address,
        )
        self._bound_port = self._server.sockets[0].getsockname()[1]
