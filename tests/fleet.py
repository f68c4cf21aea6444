"""Bridged Mosquitto brokers for the tests: a central broker and two site edges.

``edge1`` (site noord) and ``edge2`` (site zuid) each bridge to ``central``
with the operator's own bridge file, config/mosquitto/bridge-noord.conf (what
docs/fleet.md shows), turned into a local one: central's address, a reconnect
every second or two instead of 2 to 30 s, no TLS and no login unless asked for.
``edge2``'s bridge runs through a TCP forwarder in the test process, so a test
can cut that link and restore it. Every broker has its own persistence; a
broker can be restarted (its retained messages survive) or replaced by one with
an empty store on the same port.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import threading
import time
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from .broker import Mosquitto, Probe, eventually, free_port

ROOT = Path(__file__).resolve().parent.parent
BRIDGE_FILE = ROOT / "config" / "mosquitto" / "bridge-noord.conf"
ACL_FILE = ROOT / "config" / "mosquitto" / "acl"

FLEET = "gated/fleet"
SITES = {"edge1": "noord", "edge2": "zuid"}
# A topic only the tests' bridges carry (central -> edge), last in the file so
# that once a marker comes through, every subscription before it is in place.
PING = "fleet-test/{site}/ping"


def bridge_config(site: str, port: int, *, login: tuple[str, str] | None = None,
                  settings: dict[str, str] | None = None) -> str:
    """bridge-noord.conf for ``site``, bridged to 127.0.0.1:``port``.

    ``settings``: other values for the file's settings (``{"cleansession": "true"}``).
    """
    local: dict[str, str | None] = {
        "address": f"address 127.0.0.1:{port}",
        # Mosquitto 2.0.11 ignores a single value here and keeps its default
        # backoff of 5 to 30 s; base and cap both 1 s retry every second or two.
        "restart_timeout": "restart_timeout 1 1",
        "bridge_capath": None,
        "remote_username": f"remote_username {login[0]}" if login else None,
        "remote_password": f"remote_password {login[1]}" if login else None,
    }
    local.update({key: f"{key} {value}" for key, value in (settings or {}).items()})
    lines = []
    for line in BRIDGE_FILE.read_text().replace("noord", site).splitlines():
        key = line.split(" ", 1)[0]
        if key in local:
            value = local[key]
            if value is not None:
                lines.append(value)
        elif line and not line.startswith("#"):
            lines.append(line)
    lines.append(f"topic {PING.format(site=site)}/+ in 1")
    return "\n".join(lines) + "\n"


def bridge_topics(site: str = "noord") -> list[tuple[str, str, int]]:
    """The ``topic`` lines of the bridge file: (filter, direction, QoS)."""
    text = BRIDGE_FILE.read_text().replace("noord", site)
    return [(t, d, int(q)) for t, d, q in re.findall(r"^topic (\S+) (in|out|both) (\d)$",
                                                     text, re.MULTILINE)]


def bridge_subscribed(log: str, connection: str) -> bool:
    """Whether, by the edge's log, bridge ``connection`` is connected and central has
    acknowledged every subscription it made in this connection.

    Central queues a subscription's retained messages before it acknowledges it,
    so whatever it is sent after this comes behind them.
    """
    lines = log.splitlines()
    connack = f"Received CONNACK on connection local.{connection}."
    begun = [n for n, line in enumerate(lines) if line.endswith(connack)]
    if not begun:
        return False
    since = lines[begun[-1] + 1:]
    gone = (f"Client local.{connection} ", f"Socket error on client local.{connection}",
            f"Connecting bridge (step 1) {connection} ")
    if any(word in line for line in since for word in gone):
        return False
    # Sent all at once when the CONNACK arrives; acknowledged in order, later.
    sent = sum(f"Bridge local.{connection} sending SUBSCRIBE" in line for line in since)
    acked = sum(line.endswith(f"Received SUBACK from local.{connection}") for line in since)
    return sent > 0 and acked == sent


class Forwarder:
    """A TCP forwarder with its own thread, whose link a test can cut and restore."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = free_port()
        self.refused = 0  # connections turned away while cut
        self._cut = False
        self._pairs: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._run(self._listen())

    def cut(self) -> None:
        """Close every forwarded connection, and turn new ones away until ``restore``."""
        self._run(self._close_all(cut=True))

    def restore(self) -> None:
        self._run(self._close_all(cut=False))

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        self._run(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def _run(self, coroutine: Coroutine[Any, Any, None]) -> None:
        asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(5)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def _close_all(self, *, cut: bool) -> None:
        self._cut = cut
        for writer in list(self._pairs):
            writer.transport.abort()
        self._pairs.clear()

    async def _shutdown(self) -> None:
        await self._close_all(cut=True)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._cut:
            self.refused += 1
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.transport.abort()
            return
        self._pairs.update((writer, up_writer))
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        # One side ended: end the other too, as a dropped link does.
        writer.transport.abort()
        self._pairs.discard(writer)


@dataclass
class Fleet:
    """``central``, ``edge1`` (site noord) and ``edge2`` (site zuid, behind ``link``)."""

    central: Mosquitto
    edge1: Mosquitto
    edge2: Mosquitto
    link: Forwarder
    logins: dict[int, tuple[str, str]] = field(default_factory=dict)  # the probes' own, by port
    probes: list[Probe] = field(default_factory=list)
    _markers: itertools.count[int] = field(default_factory=itertools.count)

    @property
    def edges(self) -> list[Mosquitto]:
        return [self.edge1, self.edge2]

    def site(self, edge: Mosquitto) -> str:
        return SITES["edge1" if edge is self.edge1 else "edge2"]

    async def probe(self, broker: Mosquitto, *filters: str, client_id: str | None = None,
                    persistent: bool = False) -> Probe:
        """A connected test client on ``broker``, subscribed to ``filters``; closed after."""
        user, password = self.logins.get(broker.port, (None, None))
        client = await Probe(broker.port, client_id=client_id, persistent=persistent,
                             username=user, password=password).connect()
        self.probes.append(client)
        if filters:
            await client.subscribe(*filters)
        return client

    async def linked(self, edge: Mosquitto, *, within: float = 5.0) -> None:
        """Wait until ``edge``'s bridge is up and subscribed on central, and the edge
        has every retained message central sent for those subscriptions.

        ``$SYS/broker/connection/<name>/state`` is no proof: the bridge sends 1
        before its subscriptions, and an edge's own copy can still say 1 from
        before a drop. A marker sent from central must come through, and only
        once central has acknowledged the subscriptions of the bridge's current
        connection: central keeps the bridge's session (cleansession false), so
        a marker sent before that goes out on the old session's subscriptions,
        ahead of the retained messages the new ones bring.
        """
        site = self.site(edge)
        ping = PING.format(site=site)
        watcher = await self.probe(edge, f"{ping}/+")
        sender = await self.probe(self.central)
        marker = f"{ping}/{next(self._markers)}"
        async with asyncio.timeout(within):
            await eventually(lambda: bridge_subscribed(edge.log_of_this_run(), f"edge-{site}"),
                             within=within, step=0.02)
            while not watcher.on(marker):
                await sender.publish(marker, b"")
                with contextlib.suppress(TimeoutError):
                    await watcher.wait_for(marker, within=0.1)
        for client in (watcher, sender):
            await client.disconnect()
            self.probes.remove(client)

    async def settled(self, client: Probe, *, within: float = 10.0) -> None:
        """Wait until ``client`` has every message its broker had queued for it so far.

        A marker ``client`` sends itself comes after them (gated's own sync).
        """
        marker = f"fleet-test/settle/{next(self._markers)}"
        await client.subscribe(marker)
        async with asyncio.timeout(within):
            # A full queue drops the marker too: send it until one comes back.
            while not client.on(marker):
                await client.publish(marker, b"")
                with contextlib.suppress(TimeoutError):
                    await client.wait_for(marker, within=0.2)

    async def cut_seen(self, *, attempts: int = 1, within: float = 5.0) -> None:
        """Wait until ``edge2``'s bridge has tried ``attempts`` more times and been turned away."""
        target = self.link.refused + attempts
        await eventually(lambda: self.link.refused >= target, within=within)

    def restart(self, broker: Mosquitto) -> None:
        """Stop and start again on the same port, with the same persistence."""
        broker.stop()
        broker.start()

    def replace(self, broker: Mosquitto) -> None:
        """A new broker on the same port with the same config and an empty store."""
        broker.stop()
        for stored in broker.dir.glob("mosquitto.db*"):
            stored.unlink()
        broker.start()

    async def close(self) -> None:
        for client in self.probes:
            await client.disconnect()
        for broker in (self.edge1, self.edge2, self.central):
            broker.stop()
        self.link.close()


def start_fleet(directory: Path, *, extra: dict[str, str] | None = None,
                users: dict[str, dict[str, str]] | None = None,
                acl: dict[str, Path] | None = None,
                logins: dict[str, tuple[str, str]] | None = None,
                probe_logins: dict[str, tuple[str, str]] | None = None,
                bridge: dict[str, str] | None = None) -> Fleet:
    """Start central, the forwarder and both edges; stop whatever started if one fails.

    ``extra``: config lines per broker name (``central``, ``edge1``, ``edge2``);
    ``users`` and ``acl``: a password file and an ``acl_file`` for that broker;
    ``logins``: the user and password an edge's bridge logs in to central with;
    ``probe_logins``: those the tests' own clients log in to a broker with;
    ``bridge``: other values for settings of both edges' bridges.
    """
    extra, users, acl, logins = extra or {}, users or {}, acl or {}, logins or {}
    probe_logins = probe_logins or {}
    started: list[Mosquitto] = []
    link: Forwarder | None = None

    def make(name: str) -> Mosquitto:
        lines = extra.get(name, "")
        if name in acl:
            lines += f"acl_file {acl[name]}\n"
        return Mosquitto(directory / name, listener=lines, users=users.get(name))

    try:
        central = make("central")
        central.start()
        started.append(central)
        link = Forwarder(central.port)
        link.start()
        edges = []
        for name, port in (("edge1", central.port), ("edge2", link.port)):
            edge = make(name)
            # The bridge section comes last: every line after `connection` is its own.
            edge.conf.write_text(edge.conf.read_text() + "\n" + bridge_config(
                SITES[name], port, login=logins.get(name), settings=bridge))
            edge.start()
            started.append(edge)
            edges.append(edge)
    except BaseException:
        for broker in started:
            broker.stop()
        if link is not None:
            link.close()
        raise
    ports = {"central": central.port, "edge1": edges[0].port, "edge2": edges[1].port}
    return Fleet(central, edges[0], edges[1], link,
                 logins={ports[name]: login for name, login in probe_logins.items()})


def publish_retained(port: int, messages: Iterable[tuple[str, bytes]]) -> None:
    """Publish retained QoS 1 messages, as fast as the broker acknowledges them.

    paho directly: a bulk of thousands through aiomqtt takes seconds longer.
    """
    client = mqtt.Client(CallbackAPIVersion.VERSION2)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        sent = [client.publish(topic, payload, qos=1, retain=True) for topic, payload in messages]
        for info in sent:
            info.wait_for_publish(30)
    finally:
        client.disconnect()
        client.loop_stop()


def new_subscriber_gets(port: int, topic_filter: str, *, within: float = 30.0) -> int:
    """How many messages a new clean-session subscriber to ``topic_filter`` is sent.

    A marker the subscriber sends itself comes after them all; a full queue
    drops the marker too, so it is sent until one comes back.
    """
    got: list[str] = []
    back = threading.Event()
    marker = f"fleet-test/count/{port}"

    def on_message(_client: Any, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        if message.topic == marker:
            back.set()
        else:
            got.append(message.topic)

    client = mqtt.Client(CallbackAPIVersion.VERSION2, clean_session=True)
    client.on_message = on_message
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        client.subscribe([(topic_filter, 1), (marker, 1)])
        deadline = time.monotonic() + within
        while not back.wait(0.2):
            assert time.monotonic() < deadline, f"no marker back within {within}s"
            client.publish(marker, b"", qos=1)
    finally:
        client.disconnect()
        client.loop_stop()
    return len(got)
