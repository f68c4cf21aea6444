"""The daemon's one MQTT connection: aiomqtt 2.x, reconnecting for as long as it runs.

Each connection publishes a retained ``online`` on ``<prefix>/status`` (the
last will says ``offline``), subscribes to everything registered with
``subscribe``, and hands each message to its handlers. A lost connection is
replaced after a capped, jittered backoff, with every subscription made again.

Never late (DESIGN §9): an open that could not be sent when it was decided
must never be sent afterwards. paho keeps unacknowledged QoS 1 messages in its
client object and sends them again when that object reconnects, and it also
queues messages published while disconnected. So:

- Every connection is a fresh aiomqtt ``Client`` (a fresh paho client) with a
  clean session; nothing queued in one connection can reach another. When a
  connection ends, whatever paho still holds is dropped and the client is
  thrown away.
- ``publish`` refuses at once (``BrokerUnavailable``) when there is no live
  connection; nothing is handed to paho to "send when connected".
- A command whose PUBACK does not arrive in time, or whose wait is cancelled
  (the answer deadline), ends its connection by a reset: the socket has
  SO_LINGER 0, so closing it sends RST and the kernel drops any bytes it has
  not yet delivered, instead of retransmitting them when the network heals.
- Commands carry an MQTT 5 message expiry of a few seconds, so a broker never
  hands one to a device that reconnects later (a device with a persistent
  session would otherwise get every open queued while it was away).

No message larger than the largest a site needs (``MAX_PACKET``) is ever
read into memory: with MQTT 5 the CONNECT says so (Maximum Packet Size) and
the broker drops larger messages for this client; should one arrive anyway
(an MQTT 3.1.1 broker without ``message_size_limit``, a broker that ignores
the property), the connection ends before its body is read.

What no client can recall: bytes the broker's host already received. A broker
that stalls after that and resumes later can still deliver the command late;
the device's own pulse length (Tasmota ``PulseTime``) bounds what it does then.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import math
import random
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import paho.mqtt.client as paho
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from gated.book import codeset
from gated.book.config import MqttConfig
from gated.core.errors import BrokerError, BrokerTimeout, BrokerUnavailable, ConfigError

log = structlog.get_logger("gated.mqtt")

# QoS 1 publishes other than commands that may be in flight at once.
BACKGROUND_INFLIGHT = 10
# aiomqtt and paho log through the standard library; gated's logging set-up
# routes it with everything else.
_LIBRARY_LOG = logging.getLogger("gated.mqtt.client")

# The largest payload a site needs: a chunk of the largest code set (with its
# head) or a manifest, and room for a signature on either. Every other message
# gated reads is far smaller (a code's message is at most 64 KiB).
MAX_PAYLOAD = max(codeset.CHUNK_HEAD.size + codeset.chunk_bytes(codeset.MAX_SET_BYTES),
                  codeset.MAX_MANIFEST) + 16 * 1024
# What MQTT adds to a payload: the fixed header (5 bytes at most), the topic
# (2 + at most 65,535 bytes), a packet id, and MQTT 5 properties (an expiry is
# 5 bytes; 4 KiB leaves room for what a publisher may add).
MAX_PACKET = MAX_PAYLOAD + 5 + 2 + 65535 + 2 + 4096

# SO_LINGER on with zero seconds: close() resets the connection and discards
# whatever is still unsent, rather than delivering it after the fact.
_RESET_ON_CLOSE = (socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
# Commands and acknowledgements are a few bytes each and a caller is waiting:
# without this, Nagle's algorithm meets delayed ACKs and adds ~40 ms a hop.
_NO_DELAY = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
# Connect and the clean-shutdown handshake; a broker slower than this is down.
CONNECT_TIMEOUT = 10.0
OFFLINE_TIMEOUT = 2.0
SUBSCRIBE_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class Incoming:
    """A message as gated sees it; ``retain`` is set only for one the broker kept.

    ``expiry``: the MQTT 5 message expiry interval left on it (seconds), if it has one.
    """

    topic: str
    payload: bytes
    retain: bool
    expiry: int | None = None


Handler = Callable[[Incoming], None]


@dataclass(frozen=True, slots=True)
class _Subscription:
    topic_filter: str
    handler: Handler
    qos: int
    no_local: bool


class _Session:
    """One connection: its client, and a future resolved when it is over."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self.client = client
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.reset = False  # end by a reset, not a polite DISCONNECT

    def end(self, *, reset: bool = False) -> None:
        self.reset = self.reset or reset
        if not self.lost.done():
            self.lost.set_result(None)


def backoff(attempt: int, low: float, high: float) -> float:
    """Seconds before reconnect attempt ``attempt`` (0 first): doubling, capped, jittered.

    The jitter only shortens the wait, so ``high`` is a true cap, and many
    sites that lost one broker do not all come back in the same instant.
    """
    return min(high, low * 2.0 ** min(attempt, 30)) * random.uniform(0.75, 1.0)


def tls_context(settings: MqttConfig, ca_file: Path | None) -> ssl.SSLContext | None:
    """The TLS context for ``[mqtt]``, or None for plain TCP; ConfigError if unusable."""
    if not settings.tls and ca_file is None:
        return None
    try:
        return ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot use {ca_file} as CA file: {exc}", path="mqtt.tls_ca") from exc


def make_client(settings: MqttConfig, client_id: str, *, tls: ssl.SSLContext | None,
                will: aiomqtt.Will | None = None) -> aiomqtt.Client:
    """A fresh client with a clean session; never reuse one across connections."""
    v5 = settings.protocol == "5"
    properties = None
    if v5:
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.MaximumPacketSize = MAX_PACKET
    client = aiomqtt.Client(
        settings.host, settings.port,
        username=settings.username, password=settings.password,
        identifier=client_id,
        protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
        # A clean session every time: 3.1.1 says so with clean_session, 5 with clean_start.
        clean_session=None if v5 else True,
        clean_start=True if v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
        will=will,
        keepalive=settings.keepalive,
        timeout=CONNECT_TIMEOUT,
        tls_context=tls,
        socket_options=[_RESET_ON_CLOSE, _NO_DELAY],
        logger=_LIBRARY_LOG,
        properties=properties,
    )
    _refuse_oversized(client._client, f"{settings.host}:{settings.port}")  # below aiomqtt
    return client


def _refuse_oversized(inner: paho.Client, broker: str) -> None:
    """End the connection on a packet over ``MAX_PACKET`` before its body is read.

    paho reads a packet whole into memory, whatever its length (and asks the
    socket for all of it at once); the fixed header says the length first.
    """
    receive = inner._sock_recv

    def bounded(size: int) -> bytes:
        packet = inner._in_packet
        if packet["have_remaining"] and packet["remaining_length"] > MAX_PACKET:
            log.error("mqtt message larger than any gated takes; connection ended unread "
                      "(limit the broker's message size: docs/mqtt.md)", broker=broker,
                      size=packet["remaining_length"], limit=MAX_PACKET)
            raise OSError(errno.EMSGSIZE, "MQTT packet too large")
        return receive(size)

    inner._sock_recv = bounded  # type: ignore[assignment]  # this client only


def _subscribe_topics(settings: MqttConfig, subs: Iterable[_Subscription]) -> list[Any]:
    topics: list[Any] = []
    seen: set[str] = set()
    for sub in subs:
        if sub.topic_filter in seen:
            continue
        seen.add(sub.topic_filter)
        if settings.protocol == "5":
            topics.append((sub.topic_filter, SubscribeOptions(qos=sub.qos, noLocal=sub.no_local)))
        else:
            topics.append((sub.topic_filter, sub.qos))
    return topics


class MqttLink:
    """One connection to the broker, owned by the daemon's lifecycle."""

    def __init__(self, settings: MqttConfig, *, prefix: str, client_id: str,
                 ca_file: Path | None = None) -> None:
        self.settings = settings
        self.prefix = prefix
        self.client_id = client_id
        self.status_topic = f"{prefix}/status"
        self.broker = f"{settings.host}:{settings.port}"
        self._tls = tls_context(settings, ca_file)
        self._subscriptions: list[_Subscription] = []
        self._connect_hooks: list[Callable[[], None]] = []
        self._session: _Session | None = None
        self._up = asyncio.Event()
        self._closing = asyncio.Event()
        self._stopped = asyncio.Event()
        self._running = False
        self._tasks: set[asyncio.Task[Any]] = set()
        # paho holds at most 20 QoS 1 messages in flight and queues the rest,
        # to send whenever a slot frees: an open must never wait there. Other
        # publishes take at most half the slots.
        self._background = asyncio.Semaphore(BACKGROUND_INFLIGHT)
        self.connections = 0  # connections made so far
        # Seconds to wait before the first connect, each site its own: a fleet
        # that restarts together (a power cut, an upgrade) would otherwise
        # arrive at once, and the broker's listen backlog (100 for Mosquitto)
        # leaves the rest to the kernel's SYN retries, a second and more each.
        self.first_delay = random.uniform(0.0, settings.connect_spread)

    # -- set-up, before run() -------------------------------------------------

    def subscribe(self, topic_filter: str, handler: Handler, *, qos: int = 1,
                  no_local: bool = False) -> None:
        """Call ``handler`` for every message on ``topic_filter``, on every connection.

        Handlers run on the event loop between two reads and must not block;
        slow work goes to ``spawn``. ``no_local`` (MQTT 5) skips gated's own
        messages.
        """
        if self._running:
            raise RuntimeError("subscribe before the link runs")
        aiomqtt.Wildcard(topic_filter)  # raises ValueError on a malformed filter
        self._subscriptions.append(_Subscription(topic_filter, handler, qos, no_local))

    async def resubscribe(self, topic_filter: str) -> None:
        """Subscribe again to a registered filter, so the broker sends its retained
        messages again (a set's chunks that arrived before anyone vouched for them)."""
        session = self._session
        if session is None or session.lost.done():
            return
        topics = _subscribe_topics(self.settings, [sub for sub in self._subscriptions
                                                   if sub.topic_filter == topic_filter])
        if topics:
            with contextlib.suppress(aiomqtt.MqttError):
                await session.client.subscribe(topics, timeout=SUBSCRIBE_TIMEOUT)

    def on_connect(self, hook: Callable[[], None]) -> None:
        """Call ``hook`` after each connect, once subscribed and ``online`` is published."""
        self._connect_hooks.append(hook)

    # -- state ------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._session is not None and not self._session.lost.done()

    async def wait_connected(self, within: float) -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                await self._up.wait()
        return self.connected

    # -- publishing --------------------------------------------------------------

    async def publish(self, topic: str, payload: bytes | str, *, qos: int = 1,
                      retain: bool = False, within: float = 5.0, expiry: int | None = None,
                      command: bool = False) -> None:
        """Publish now, or raise; never queue for later.

        Returns once the broker acknowledged (QoS 1) or the message was written
        (QoS 0). Raises BrokerUnavailable when not connected or the connection
        drops meanwhile, BrokerTimeout past ``within`` seconds. A ``command`` that is
        not acknowledged in time ends its connection with a reset, so it cannot
        arrive late (see the module docstring).
        """
        if qos and not command:
            async with self._background:
                await self._publish(topic, payload, qos, retain, within, expiry, command)
        else:
            await self._publish(topic, payload, qos, retain, within, expiry, command)

    async def _publish(self, topic: str, payload: bytes | str, qos: int, retain: bool,
                       within: float, expiry: int | None, command: bool) -> None:
        session = self._session
        if session is None or session.lost.done():
            raise BrokerUnavailable(f"not connected to the MQTT broker {self.broker}")
        properties = None
        if expiry is not None and self.settings.protocol == "5":
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            properties.MessageExpiryInterval = expiry
        sending = asyncio.ensure_future(session.client.publish(
            topic, payload, qos=qos, retain=retain, properties=properties, timeout=math.inf))
        try:
            done, _ = await asyncio.wait({sending, session.lost}, timeout=within,
                                         return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            self._abandon(session, sending, command)
            raise
        if sending in done:
            try:
                sending.result()
            except aiomqtt.MqttError as exc:
                self._abandon(session, sending, command)
                raise BrokerUnavailable(f"publish to {self.broker} failed: {exc}") from None
            return
        lost_before = session.lost.done()
        self._abandon(session, sending, command)
        # Lost before this call gave up (a drop, or another command's reset):
        # unreachable. Otherwise this call timed out (and may have reset it).
        if lost_before:
            raise BrokerUnavailable(f"connection to the MQTT broker {self.broker} lost")
        raise BrokerTimeout(f"the MQTT broker {self.broker} did not acknowledge "
                            f"within {within:g}s")

    def _abandon(self, session: _Session, sending: asyncio.Future[None], command: bool) -> None:
        sending.cancel()
        if command and not session.lost.done():
            log.warning("mqtt command not acknowledged; resetting the connection so it "
                        "cannot arrive late", broker=self.broker)
            session.end(reset=True)

    # -- tasks -------------------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Run ``coro`` beside the link; its failure is logged, never lost."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("mqtt task failed", task=task.get_name(),
                      error=repr(task.exception()))

    async def drain(self, within: float) -> None:
        """Wait up to ``within`` seconds for spawned work, then cancel what is left."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=within)
        for task in list(self._tasks):
            task.cancel()

    # -- the connection loop -----------------------------------------------------------

    async def run(self) -> None:
        """Connect, serve, reconnect, until ``close``."""
        self._running = True
        attempt = 0
        try:
            if self.first_delay > 0:
                log.info("mqtt first connect after a random moment", broker=self.broker,
                         seconds=round(self.first_delay, 2))
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.first_delay):
                        await self._closing.wait()
            while not self._closing.is_set():
                before = self.connections
                error = ""
                try:
                    error = await self._serve(self._new_client())
                except aiomqtt.MqttError as exc:
                    error = str(exc) or type(exc).__name__
                except Exception as exc:  # a broker hiccup must never end the daemon
                    # No traceback: rendered with frame locals it would show the
                    # password and message payloads.
                    error = repr(exc)
                    log.error("mqtt connection failed unexpectedly", broker=self.broker,
                              error=error)
                if self._closing.is_set():
                    break
                if self.connections != before:
                    attempt = 0
                delay = backoff(attempt, self.settings.reconnect_min, self.settings.reconnect_max)
                if self.connections != before:
                    log.warning("mqtt connection lost", broker=self.broker, error=error,
                                retry_in=round(delay, 2))
                elif attempt == 0 or attempt % 10 == 0:
                    log.warning("mqtt broker unreachable", broker=self.broker, error=error,
                                attempts=attempt + 1, retry_in=round(delay, 2))
                attempt += 1
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._closing.wait()
        finally:
            self._running = False
            self._stopped.set()

    def _new_client(self) -> aiomqtt.Client:
        will = aiomqtt.Will(self.status_topic, b"offline", qos=1, retain=True)
        return make_client(self.settings, self.client_id, tls=self._tls, will=will)

    async def _serve(self, client: aiomqtt.Client) -> str:
        """One connection, start to end; why it ended, unless an exception says so."""
        reader: asyncio.Task[None] | None = None
        async with client:
            session = _Session(client)
            try:
                await self._subscribe_all(client)
                await client.publish(self.status_topic, b"online", qos=1, retain=True)
                self.connections += 1
                self._session = session
                self._up.set()
                log.info("mqtt connected", broker=self.broker, client_id=self.client_id,
                         prefix=self.prefix)
                for hook in self._connect_hooks:
                    try:
                        hook()
                    except Exception as exc:
                        log.error("mqtt connect hook failed", hook=repr(hook), error=repr(exc))
                reader = asyncio.create_task(self._read(client), name="mqtt-read")
                closing = asyncio.create_task(self._closing.wait(), name="mqtt-closing")
                waiting: set[asyncio.Future[Any]] = {reader, session.lost, closing}
                try:
                    await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    closing.cancel()
                if self._closing.is_set() and not session.lost.done():
                    # A clean stop: say so, rather than leave it to the will.
                    with contextlib.suppress(aiomqtt.MqttError):
                        await client.publish(self.status_topic, b"offline", qos=1, retain=True,
                                             timeout=OFFLINE_TIMEOUT)
                    log.info("mqtt offline published", broker=self.broker)
            finally:
                self._session = None
                self._up.clear()
                session.end()
                if reader is not None:
                    reader.cancel()
                    await asyncio.wait({reader})
                await self._discard(session)
        if reader is not None and not reader.cancelled():
            error = reader.exception()
            if error is not None:
                raise error
        return "reset after a command was not acknowledged" if session.reset else "closed"

    async def _discard(self, session: _Session) -> None:
        """Make sure nothing of this connection is ever sent on another one."""
        inner: paho.Client = session.client._client  # below aiomqtt on purpose
        dropped = inner.drop_out_messages()
        if dropped:
            log.warning("mqtt messages dropped with their connection", count=len(dropped))
        if session.reset:
            # Let write registrations already scheduled run before the socket goes.
            await asyncio.sleep(0)
            # The socket has SO_LINGER 0: closing it sends RST and discards
            # unsent bytes. aiomqtt's own exit then finds no socket and
            # treats the client as disconnected.
            inner._sock_close()

    async def _subscribe_all(self, client: aiomqtt.Client) -> None:
        topics = _subscribe_topics(self.settings, self._subscriptions)
        if not topics:
            return
        granted = await client.subscribe(topics)
        for (topic_filter, _), code in zip(topics, granted, strict=False):
            if isinstance(code, ReasonCode) and code.is_failure:
                log.error("mqtt subscription refused by the broker (check its ACLs)",
                          topic=topic_filter, reason=str(code))

    async def _read(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            properties = message.properties
            incoming = Incoming(message.topic.value, bytes(message.payload), message.retain,
                                None if properties is None
                                else getattr(properties, "MessageExpiryInterval", None))
            for sub in self._subscriptions:
                if message.topic.matches(sub.topic_filter):
                    try:
                        sub.handler(incoming)
                    except Exception as exc:  # payloads hold codes: no traceback locals
                        log.error("mqtt message handler failed", topic=incoming.topic,
                                  error=repr(exc))

    async def close(self, within: float = 3.0) -> None:
        """Publish ``offline``, disconnect and stop reconnecting."""
        self._closing.set()
        if self._running:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(within):
                    await self._stopped.wait()
        for task in list(self._tasks):
            task.cancel()


@contextlib.asynccontextmanager
async def connect(settings: MqttConfig, client_id: str, *,
                  ca_file: Path | None = None) -> AsyncIterator[aiomqtt.Client]:
    """One short-lived connection (the staff tools); BrokerError if it fails."""
    client = make_client(settings, client_id, tls=tls_context(settings, ca_file))
    try:
        async with client:
            yield client
    except aiomqtt.MqttError as exc:
        raise BrokerError(f"MQTT broker {settings.host}:{settings.port}: {exc}") from None


async def read_retained(client: aiomqtt.Client, filters: list[str], *, marker_topic: str,
                        within: float = 5.0) -> tuple[list[Incoming], bool]:
    """Every retained message on ``filters``; True when the list is known complete.

    The broker sends a subscription's retained messages right after its
    SUBACK and in order; a marker published afterwards on the same connection
    comes back after all of them.
    """
    nonce = random.getrandbits(64).to_bytes(8, "big").hex()
    await client.subscribe([(f, 1) for f in [*filters, marker_topic]])
    await client.publish(marker_topic, nonce, qos=1)
    found: list[Incoming] = []
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(within):
            async for message in client.messages:
                if message.topic.matches(marker_topic):
                    if bytes(message.payload).decode(errors="replace") == nonce:
                        return found, True
                    continue
                if message.retain:
                    found.append(Incoming(message.topic.value, bytes(message.payload), True))
    return found, False
