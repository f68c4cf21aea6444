"""A real Mosquitto for the tests, and a test's own MQTT client.

The broker runs on a free port with its own config, persistence and log in
the test's tmp_path; it can be stopped, started again on the same port (with
its retained messages and persistent sessions, like a real restart) and
frozen with SIGSTOP to play a broker that stopped answering.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gated.site.store import read_entries

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Mosquitto:
    def __init__(self, directory: Path, *, listener: str = "",
                 users: dict[str, str] | None = None) -> None:
        """``listener``: extra lines for the listener (TLS files); ``users``: require them."""
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.conf = self.dir / "mosquitto.conf"
        auth = "allow_anonymous true\n"
        if users is not None:
            passwords = self.dir / "passwd"
            passwords.write_text("")
            for user, password in users.items():
                subprocess.run(["mosquitto_passwd", "-b", str(passwords), user, password],
                               check=True, capture_output=True)
            auth = f"allow_anonymous false\npassword_file {passwords}\n"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            + listener + auth
            # Started as root, Mosquitto would switch to its own user and lose
            # access to the test's files; stay whoever runs the tests.
            + f"user {pwd.getpwuid(os.getuid()).pw_name}\n"
            "persistence true\n"
            f"persistence_location {self.dir}/\n"
            f"log_dest file {self.dir}/mosquitto.log\n"
            "log_type all\n"
        )
        self.process: subprocess.Popen[bytes] | None = None
        self._log_from = 0  # where this run's lines begin in the log (it is appended to)

    def start(self, within: float = 5.0) -> None:
        assert self.process is None, "already running"
        path = self.dir / "mosquitto.log"
        self._log_from = path.stat().st_size if path.exists() else 0
        self.process = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                _, err = self.process.communicate()
                raise RuntimeError(f"mosquitto exited: {err.decode(errors='replace')}")
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", self.port), timeout=0.2):
                return
            time.sleep(0.01)
        raise RuntimeError(f"mosquitto did not listen on {self.port} within {within}s")

    def stop(self) -> None:
        """SIGTERM, as an orderly broker shutdown: clients see their connection close."""
        if self.process is None:
            return
        self.thaw()
        self.process.terminate()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        assert self.process.stderr is not None
        self.process.stderr.close()
        self.process = None

    def freeze(self) -> None:
        """SIGSTOP: connections stay open, nothing is answered."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        if self.process is not None:
            os.kill(self.process.pid, signal.SIGCONT)

    def log(self) -> str:
        path = self.dir / "mosquitto.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def log_of_this_run(self) -> str:
        """The log since the last start (a restarted broker appends to the same file)."""
        path = self.dir / "mosquitto.log"
        if not path.exists():
            return ""
        with path.open("rb") as log:
            log.seek(self._log_from)
            return log.read().decode(errors="replace")


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    retain: bool
    qos: int
    at: float

    def json(self) -> Any:
        return json.loads(self.payload)


@dataclass
class Probe:
    """A test's MQTT client: records every message; can answer like a device."""

    port: int
    client_id: str | None = None
    persistent: bool = False  # keep the session (and the messages queued for it) across reconnects
    mqtt5: bool = False  # MQTT 5, to publish with properties (a message expiry)
    username: str | None = None
    password: str | None = None
    received: list[Received] = field(default_factory=list)
    answers: list[tuple[str, Callable[[Received], tuple[str, bytes] | None]]] = field(
        default_factory=list)
    _client: aiomqtt.Client | None = None
    _reader: asyncio.Task[None] | None = None
    _filters: list[str] = field(default_factory=list)
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def connect(self) -> Probe:
        self._client = aiomqtt.Client(
            "127.0.0.1", self.port, identifier=self.client_id,
            username=self.username, password=self.password,
            clean_session=None if self.mqtt5 else not self.persistent, timeout=5,
            protocol=aiomqtt.ProtocolVersion.V5 if self.mqtt5 else None,
            # Answer like a device with no Nagle delay, so timings are gated's own.
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
        await self._client.__aenter__()
        self._reader = asyncio.create_task(self._read(self._client))
        if self._filters:
            await self._client.subscribe([(f, 1) for f in self._filters])
        return self

    async def disconnect(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.wait({self._reader})
            self._reader = None
        if self._client is not None:
            with contextlib.suppress(aiomqtt.MqttError):
                await self._client.__aexit__(None, None, None)
            self._client = None

    async def subscribe(self, *filters: str) -> None:
        assert self._client is not None
        self._filters.extend(filters)
        await self._client.subscribe([(f, 1) for f in filters])

    async def publish(self, topic: str, payload: bytes | str = b"", *, retain: bool = False,
                      qos: int = 1, expiry: int | None = None) -> None:
        """``expiry``: an MQTT 5 message expiry interval, seconds (needs ``mqtt5``)."""
        assert self._client is not None
        properties = None
        if expiry is not None:
            assert self.mqtt5, "a message expiry needs an MQTT 5 probe"
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            properties.MessageExpiryInterval = expiry
        await self._client.publish(topic, payload, qos=qos, retain=retain,
                                   properties=properties)

    def answer(self, topic_filter: str,
               reply: Callable[[Received], tuple[str, bytes] | None]) -> None:
        """Publish ``reply(message)`` for every message on ``topic_filter`` (a fake device)."""
        self.answers.append((topic_filter, reply))

    async def _read(self, client: aiomqtt.Client) -> None:
        with contextlib.suppress(aiomqtt.MqttError):
            async for message in client.messages:
                got = Received(message.topic.value, bytes(message.payload), message.retain,
                               message.qos, time.monotonic())
                self.received.append(got)
                self._arrived.set()
                for topic_filter, reply in self.answers:
                    if message.topic.matches(topic_filter):
                        out = reply(got)
                        if out is not None:
                            await client.publish(out[0], out[1], qos=1)

    def on(self, topic_filter: str) -> list[Received]:
        return [m for m in self.received if aiomqtt.Topic(m.topic).matches(topic_filter)]

    async def wait_for(self, topic_filter: str, count: int = 1, *,
                       within: float = 5.0) -> list[Received]:
        """Wait until ``count`` messages arrived on ``topic_filter``; all of them."""
        async with asyncio.timeout(within):
            while len(self.on(topic_filter)) < count:
                self._arrived.clear()
                await self._arrived.wait()
        return self.on(topic_filter)


async def eventually(check: Callable[[], bool], *, within: float = 5.0,
                     step: float = 0.01) -> None:
    """Poll ``check`` until true, or fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within}s")
        await asyncio.sleep(step)


# -- config snippets for a daemon on this broker ---------------------------------

LIFT = "+31501234569"  # the called number of the MQTT gate
LIFT_CODE = "7777"


def mqtt_table(broker: Mosquitto, extra: str = "") -> str:
    """An ``[mqtt]`` table for ``broker`` that connects at once and reconnects fast
    (tests restart brokers)."""
    spread = "" if "connect_spread" in extra else "connect_spread = 0\n"
    return f"""
[mqtt]
host = "127.0.0.1"
port = {broker.port}
reconnect_min = 0.05
reconnect_max = 0.3
keepalive = 5
{spread}{extra}
"""


def lift_gate(*, state: bool = True, confirm: float = 0.5, extra: str = "") -> str:
    """A third gate, ``lift``, behind a Tasmota-style MQTT relay, and a code for it."""
    keys = 'type = "mqtt", command_topic = "cmnd/lift/POWER", payload = "ON"'
    if state:
        keys += ', state_topic = "stat/lift/POWER", state_payload = "ON"'
    keys += f", confirm = {confirm}{extra}"
    return f"""
[gates.lift]
numbers = ["{LIFT}"]
actuator = {{ {keys} }}

[[codes]]
name = "Lift"
code = "{LIFT_CODE}"
gates = ["lift"]
"""


def tasmota(received: Received) -> tuple[str, bytes] | None:
    """What a Tasmota relay answers to ``cmnd/<t>/POWER ON``."""
    if received.payload == b"ON":
        return received.topic.replace("cmnd/", "stat/", 1), b"ON"
    return None


async def mqtt_ready(running: Any, connections: int = 1) -> None:
    """Wait until the daemon is connected and has every retained code from the broker."""
    bridge = running.daemon.bridge
    await eventually(lambda: bridge.synced_connections >= connections
                     and running.daemon.link.connected)


def open_payload(when: float | None = None) -> bytes:
    """A remote open that says it was sent at ``when`` (now by default)."""
    return json.dumps({"at": time.time() if when is None else when}).encode()


def entries(running: Any) -> list[Any]:
    return list(reversed(read_entries(running.daemon.gatekeeper.store.path, limit=1000)))


def states(pin: Any) -> list[bool]:
    return [bool(s.state) for s in pin.states]
