"""config/mosquitto/acl on a real Mosquitto: each user can do what its role needs, and no more.

Mosquitto drops a forbidden publish without telling an MQTT 3.1.1 client; an
MQTT 5 client's QoS 1 publish gets the reason code "Not authorized" in its
PUBACK. Both are checked: the reason code, and a subscriber allowed to read
everything that sees nothing arrive.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from .broker import Mosquitto
from .fleet import ACL_FILE

USERS = ["gated-noord", "gated-zuid", "staff", "homeassistant", "edge-noord", "edge-zuid",
         "watcher"]
GRANTED = 0
NOT_AUTHORIZED = 135


class Client:
    """An MQTT 5 client of one user: what the broker answers each publish, what arrives."""

    def __init__(self, broker: Mosquitto, user: str) -> None:
        self.received: list[tuple[str, bytes]] = []
        self._acks: dict[int, int] = {}
        self._acked = threading.Condition()
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"test-{user}",
                                   protocol=mqtt.MQTTv5)
        self._client.username_pw_set(user, f"pw-{user}")
        self._client.on_message = self._on_message
        self._client.on_publish = self._on_publish
        self._client.on_subscribe = self._on_subscribe
        self._subscribed = threading.Event()
        connected = threading.Event()
        self._client.on_connect = lambda *args: connected.set()
        self._client.connect("127.0.0.1", broker.port)
        self._client.loop_start()
        assert connected.wait(5), f"{user} did not connect"

    def _on_message(self, _client: object, _userdata: object, message: mqtt.MQTTMessage) -> None:
        self.received.append((message.topic, bytes(message.payload)))

    def _on_publish(self, _client: object, _userdata: object, mid: int, reason: ReasonCode,
                    _properties: object) -> None:
        with self._acked:
            self._acks[mid] = reason.value
            self._acked.notify_all()

    def _on_subscribe(self, *_args: object) -> None:
        self._subscribed.set()

    def subscribe(self, *filters: str) -> None:
        self._subscribed.clear()
        self._client.subscribe([(f, 1) for f in filters])
        assert self._subscribed.wait(5)

    def publish(self, topic: str, payload: bytes = b"x", *, retain: bool = False) -> int:
        """The PUBACK's reason code: 0 granted, 135 not authorized."""
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        with self._acked:
            assert self._acked.wait_for(lambda: info.mid in self._acks, 5)
            return self._acks.pop(info.mid)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


class Broker:
    """Mosquitto with the repository's ACL file, passwords and no anonymous clients.

    ``watcher`` is the tests' own user, allowed to read everything; it
    subscribes to everything from the start.
    """

    def __init__(self, directory: Path) -> None:
        acl = directory / "acl"
        directory.mkdir(parents=True, exist_ok=True)
        acl.write_text(ACL_FILE.read_text() + "\nuser watcher\ntopic read #\n")
        self.server = Mosquitto(directory / "broker", listener=f"acl_file {acl}\n",
                                users={user: f"pw-{user}" for user in USERS})
        self.server.start()
        self.clients: dict[str, Client] = {}
        self.watcher = self.client("watcher")
        self.watcher.subscribe("#")

    def client(self, user: str) -> Client:
        if user not in self.clients:
            self.clients[user] = Client(self.server, user)
        return self.clients[user]

    def seen(self, topics: list[str], since: int = 0) -> list[str]:
        """Which of ``topics`` reached the watcher after its first ``since`` messages.

        A marker the watcher sees last says when all of them are in.
        """
        marker = f"gated/noord/events/marker-{time.monotonic_ns()}"
        assert self.client("gated-noord").publish(marker) == GRANTED
        deadline = time.monotonic() + 5
        while (marker, b"x") not in self.watcher.received:
            assert time.monotonic() < deadline, "marker did not arrive"
            time.sleep(0.01)
        return [t for t, _ in self.watcher.received[since:] if t in topics]

    def close(self) -> None:
        for client in self.clients.values():
            client.close()
        self.server.stop()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    server = Broker(tmp_path / "secured")
    yield server
    server.close()


def _refused(broker: Broker, user: str, topics: list[str]) -> None:
    """Each publish by ``user`` is refused, and nothing of it reaches anyone."""
    client = broker.client(user)
    before = len(broker.watcher.received)
    assert {t: client.publish(t) for t in topics} == dict.fromkeys(topics, NOT_AUTHORIZED)
    assert broker.seen(topics, since=before) == []


def _granted(broker: Broker, user: str, topics: list[str]) -> None:
    client = broker.client(user)
    before = len(broker.watcher.received)
    assert {t: client.publish(t) for t in topics} == dict.fromkeys(topics, GRANTED)
    assert broker.seen(topics, since=before) == topics


def test_a_site_cannot_write_another_sites_topics_or_discovery_configs(broker: Broker) -> None:
    _refused(broker, "gated-noord", [
        "gated/zuid/status", "gated/zuid/codes/visitor-1", "gated/zuid/gates/barrier/open",
        "homeassistant/button/gated_zuid/barrier_open/config", "homeassistant/status",
        "cmnd/barrier/POWER"])
    _granted(broker, "gated-noord", [
        "gated/noord/status", "gated/noord/codes/visitor-1/error",
        "homeassistant/button/gated_noord/barrier_open/config"])


def test_a_site_reads_fleet_codes_but_cannot_publish_them(broker: Broker) -> None:
    site = broker.client("gated-noord")
    site.subscribe("gated/fleet/codes/+", "gated/fleet/set/#")
    _granted(broker, "staff", ["gated/fleet/codes/visitor-1", "gated/fleet/set",
                               "gated/fleet/set/0"])
    assert [t for t, _ in site.received] == ["gated/fleet/codes/visitor-1", "gated/fleet/set",
                                             "gated/fleet/set/0"]

    _refused(broker, "gated-noord", [
        "gated/fleet/codes/visitor-2", "gated/fleet/routes/route-1", "gated/fleet/set",
        "gated/fleet/set/1",
        "gated/fleet/codes/visitor-1/error/zuid", "gated/fleet/codes/visitor-1/error"])
    _granted(broker, "gated-noord", ["gated/fleet/codes/visitor-1/error/noord",
                                     "gated/fleet/routes/route-1/error/noord"])


def test_home_assistant_cannot_rewrite_a_sites_discovery_config(broker: Broker) -> None:
    config = "homeassistant/button/gated_noord/barrier_open/config"
    assert broker.client("gated-noord").publish(config, b"{}", retain=True) == GRANTED
    assert broker.seen([config]) == [config]
    hass = broker.client("homeassistant")
    hass.subscribe("homeassistant/#", "gated/+/status")
    _refused(broker, "homeassistant", [
        "homeassistant/button/gated_noord/barrier_open/config",
        "homeassistant/button/gated_zuid/barrier_open/config",
        "gated/noord/codes/visitor-1", "gated/noord/status", "gated/fleet/codes/visitor-1"])
    _granted(broker, "homeassistant", ["homeassistant/status", "gated/noord/gates/barrier/open",
                                       "gated/zuid/gates/barrier/open"])
    assert (config, b"{}") in hass.received


def test_staff_can_publish_codes_but_not_open_gates(broker: Broker) -> None:
    _granted(broker, "staff", [
        "gated/noord/codes/visitor-1", "gated/zuid/routes/route-1", "gated/fleet/codes/visitor-1",
        "gated/fleet/routes/route-1", "gated/noord/sync/staff-1", "gated/fleet/set",
        "gated/fleet/set/0"])
    _refused(broker, "staff", [
        "gated/noord/gates/barrier/open", "gated/noord/status", "gated/noord/events",
        "homeassistant/button/gated_noord/barrier_open/config", "homeassistant/status"])


def test_a_site_reads_nothing_of_another_site(broker: Broker) -> None:
    site = broker.client("gated-noord")
    site.subscribe("gated/zuid/#", "homeassistant/+/gated_zuid/+/config")
    _granted(broker, "staff", ["gated/zuid/codes/visitor-1"])
    broker.client("gated-zuid").publish("homeassistant/button/gated_zuid/barrier_open/config")
    assert broker.seen(["homeassistant/button/gated_zuid/barrier_open/config"]) != []
    assert site.received == []


def test_an_anonymous_client_is_refused(broker: Broker) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    answer: list[int] = []
    done = threading.Event()

    def on_connect(_client: object, _userdata: object, _flags: object, reason: ReasonCode,
                   _properties: object) -> None:
        answer.append(reason.value)
        done.set()

    client.on_connect = on_connect
    client.connect("127.0.0.1", broker.server.port)
    client.loop_start()
    try:
        assert done.wait(5)
        assert answer == [NOT_AUTHORIZED]
    finally:
        client.loop_stop()


def test_an_edge_bridge_carries_only_its_own_sites_reports_to_central(broker: Broker) -> None:
    """What edge-noord may publish on central: what the site reports, never codes or opens."""
    _refused(broker, "edge-noord", [
        "gated/noord/codes/visitor-1", "gated/noord/gates/barrier/open",
        "gated/fleet/codes/visitor-1", "gated/fleet/set", "gated/zuid/status",
        "gated/fleet/codes/visitor-1/error/zuid", "homeassistant/status",
        "homeassistant/button/gated_zuid/barrier_open/config"])
    _granted(broker, "edge-noord", [
        "gated/noord/status", "gated/noord/events", "gated/noord/gates/barrier/event",
        "gated/noord/alarms", "gated/noord/fleet", "gated/noord/codes/visitor-1/error",
        "gated/fleet/codes/visitor-1/error/noord",
        "homeassistant/button/gated_noord/barrier_open/config"])
