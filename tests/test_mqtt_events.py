"""What gated says on the broker (events, status, discovery) and the opens it takes."""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

from .broker import (
    Mosquitto,
    Probe,
    entries,
    eventually,
    mqtt_ready,
    mqtt_table,
    open_payload,
    states,
)
from .helpers import BARRIER, DOOR, RESIDENT

PREFIX = "gated/test"
EVENT_FIELDS = {"event_type", "time", "site", "gate", "status", "result", "reason", "credential",
                "credential_id", "kind", "caller", "did", "source", "actuator", "latency_ms"}


async def test_every_entry_is_an_event_with_the_documented_fields(
        broker: Mosquitto, probe: Probe, start_daemon: Any) -> None:
    """Each entry is one JSON event on <prefix>/events (and the gate's event topic),
    not retained, with the documented fields and never the typed digits."""
    await probe.subscribe(f"{PREFIX}/events", f"{PREFIX}/gates/+/event")
    running = await start_daemon(mqtt_table(broker))
    await mqtt_ready(running)
    await running.get(code="471123", did=BARRIER, callerid="0612345678")
    await running.get(code="834512", did=BARRIER, callerid=RESIDENT)
    await running.get(code="471123", did="+31209999999")
    events = await probe.wait_for(f"{PREFIX}/events", 3)
    assert all(not m.retain for m in events)
    parsed = [m.json() for m in events]
    assert all(set(e) == EVENT_FIELDS for e in parsed)
    assert [(e["gate"], e["status"], e["result"], e["event_type"], e["reason"], e["credential"])
            for e in parsed] == [
        ("barrier", "ACK", "granted", "granted", "granted_code", "Demo"),
        ("barrier", "NAK", "denied", "denied", "unknown_code", ""),
        (None, "NAK", "denied", "denied", "unknown_number", ""),
    ]
    first = parsed[0]
    assert (first["caller"], first["did"], first["source"], first["site"], first["kind"]) == (
        RESIDENT, BARRIER, "pbx", "test", "code")
    assert first["actuator"] == "pulsed" and first["latency_ms"] >= 0
    when = dt.datetime.fromisoformat(first["time"])
    assert when.utcoffset() is not None
    assert abs(when.timestamp() - entries(running)[0].time) < 0.001
    gate_events = await probe.wait_for(f"{PREFIX}/gates/barrier/event", 2)
    assert [m.json() for m in gate_events] == parsed[:2]
    assert probe.on(f"{PREFIX}/gates/+/event") == gate_events
    text = b"".join(m.payload for m in probe.received)
    assert b"471123" not in text and b"834512" not in text


async def test_retained_open_at_start_opens_nothing(broker: Mosquitto, probe: Probe,
                                                    start_daemon: Any) -> None:
    """An open left retained on the broker is stale: at connect it opens nothing."""
    await probe.publish(f"{PREFIX}/gates/barrier/open", open_payload(), retain=True)
    running = await start_daemon(mqtt_table(broker))
    await mqtt_ready(running)  # every retained message has been handled by now
    await running.daemon.gatekeeper.store.flush()
    assert states(running.pin(17)) == [False]
    assert entries(running) == []


async def test_live_open_opens_and_is_recorded(broker: Mosquitto, probe: Probe,
                                               start_daemon: Any) -> None:
    """A live message on <prefix>/gates/<gate>/open opens that gate once, recorded with
    source mqtt; an empty one (clearing a retained message) opens nothing."""
    await probe.subscribe(f"{PREFIX}/events")
    running = await start_daemon(mqtt_table(broker), pulse=0.05)
    await mqtt_ready(running)
    barrier, door = running.pin(17), running.pin(27)
    await probe.publish(f"{PREFIX}/gates/barrier/open", b"")
    await probe.publish(f"{PREFIX}/gates/barrier/open", open_payload())
    await probe.publish(f"{PREFIX}/gates/nowhere/open", open_payload())
    events = await probe.wait_for(f"{PREFIX}/events", 2)
    await eventually(lambda: not barrier.state)
    assert states(barrier) == [False, True, False]
    assert states(door) == [False, True]
    assert [(e.gate, e.status, e.reason, e.source, e.actuator) for e in entries(running)] == [
        ("barrier", "ACK", "granted_remote", "mqtt", "pulsed"),
        (None, "NAK", "unknown_gate", "mqtt", ""),
    ]
    assert [(m.json()["source"], m.json()["result"]) for m in events] == [
        ("mqtt", "granted"), ("mqtt", "denied")]


async def test_status_is_online_then_offline_on_a_clean_stop(broker: Mosquitto, probe: Probe,
                                                             start_daemon: Any) -> None:
    """<prefix>/status is retained online once connected, and offline after a clean stop."""
    await probe.subscribe(f"{PREFIX}/status")
    running = await start_daemon(mqtt_table(broker))
    await mqtt_ready(running)
    assert [m.payload for m in await probe.wait_for(f"{PREFIX}/status")] == [b"online"]
    await running.stop()
    assert [m.payload for m in await probe.wait_for(f"{PREFIX}/status", 2)] == [
        b"online", b"offline"]
    late = Probe(broker.port)
    await late.connect()
    await late.subscribe(f"{PREFIX}/status")
    (kept,) = await late.wait_for(f"{PREFIX}/status")
    assert (kept.payload, kept.retain) == (b"offline", True)
    await late.disconnect()


async def test_home_assistant_discovery(broker: Mosquitto, probe: Probe,
                                        start_daemon: Any) -> None:
    """One device per site: an event entity and an open button per gate, a last-entry
    sensor, all available on <prefix>/status; announced again when Home Assistant says
    online, and the button really opens its gate."""
    await probe.subscribe("homeassistant/+/+/+/config")
    running = await start_daemon(mqtt_table(broker), pulse=0.05)
    await mqtt_ready(running)
    announced = await probe.wait_for("homeassistant/+/+/+/config", 5)
    configs = {m.topic: m.json() for m in announced}
    assert sorted(configs) == [
        "homeassistant/button/gated_test/barrier_open/config",
        "homeassistant/button/gated_test/door_open/config",
        "homeassistant/event/gated_test/barrier/config",
        "homeassistant/event/gated_test/door/config",
        "homeassistant/sensor/gated_test/last_entry/config",
    ]
    for config in configs.values():
        assert config["availability_topic"] == f"{PREFIX}/status"
        assert (config["payload_available"], config["payload_not_available"]) == (
            "online", "offline")
        assert config["device"]["identifiers"] == ["gated_test"]
        assert config["unique_id"].startswith("gated_test_")
    event = configs["homeassistant/event/gated_test/barrier/config"]
    assert event["state_topic"] == f"{PREFIX}/gates/barrier/event"
    assert event["event_types"] == ["granted", "denied", "failed"]
    button = configs["homeassistant/button/gated_test/door_open/config"]
    assert (button["command_topic"], button["retain"]) == (f"{PREFIX}/gates/door/open", False)
    # A press sends the time it was pressed, so that a late delivery opens nothing.
    assert button["command_template"] == '{"at": {{ as_timestamp(now()) }}}'
    sensor = configs["homeassistant/sensor/gated_test/last_entry/config"]
    assert sensor["state_topic"] == sensor["json_attributes_topic"] == f"{PREFIX}/last_entry"
    assert "value_json.result" in sensor["value_template"]

    await probe.publish("homeassistant/status", b"online")
    assert len(await probe.wait_for("homeassistant/+/+/+/config", 10)) == 10

    door = running.pin(27)
    # What Home Assistant renders from the template (a float: seconds and a fraction).
    pressed = button["command_template"].replace("{{ as_timestamp(now()) }}", str(time.time()))
    await probe.publish(button["command_topic"], pressed)
    await eventually(lambda: len(states(door)) == 4)
    assert states(door) == [False, True, False, True]
    await eventually(lambda: len(entries(running)) == 1)
    assert entries(running)[0].reason == "granted_remote"
    assert await running.get(code="471123", did=DOOR) == (
        200, "status=ACK&callername=Welcome&destination=201")


async def test_events_and_discovery_can_be_switched_off(broker: Mosquitto, probe: Probe,
                                                        start_daemon: Any) -> None:
    """events = false and discovery = false publish neither; status still works."""
    await probe.subscribe(f"{PREFIX}/#", "homeassistant/#")
    running = await start_daemon(mqtt_table(broker, "events = false\ndiscovery = false"))
    await mqtt_ready(running)
    assert await running.get(code="471123", did=BARRIER) == (
        200, "status=ACK&callername=Welcome&destination=201")
    await probe.publish(f"{PREFIX}/sync", b"probe-marker")  # after gated's own messages
    await probe.wait_for(f"{PREFIX}/sync", 2)
    assert sorted({m.topic for m in probe.received}) == [f"{PREFIX}/status", f"{PREFIX}/sync"]


async def test_a_site_lock_is_published_as_an_alarm(broker: Mosquitto, probe: Probe,
                                                    start_daemon: Any) -> None:
    """The site-wide lock goes out on <prefix>/alarms, not retained, without digits."""
    await probe.subscribe(f"{PREFIX}/alarms")
    running = await start_daemon(mqtt_table(broker) + "\n[lockout]\nsite_failures = 3\n")
    await mqtt_ready(running)
    for n in range(3):
        await running.get(code=f"90909{n}", did=BARRIER, callerid=f"+3161111000{n}")
    (message,) = await probe.wait_for(f"{PREFIX}/alarms", 1)
    alarm = message.json()
    assert not message.retain
    assert (alarm["alarm"], alarm["key"], alarm["site"], alarm["seconds"]) == (
        "site_locked", "*site*", "test", 300.0)
    assert dt.datetime.fromisoformat(alarm["time"]).utcoffset() is not None
    assert b"90909" not in message.payload


async def test_a_gate_taken_out_of_the_config_leaves_home_assistant(
        broker: Mosquitto, probe: Probe, start_daemon: Any) -> None:
    """After a restart without a gate, its retained discovery configs are cleared; the
    remaining gates' configs stay, and another site's on the same broker are untouched."""
    other = {"homeassistant/button/gated_zuid/garage_open/config": b'{"name": "Open garage"}',
             # Same node id, another site ("test" vs a site whose id maps onto it).
             "homeassistant/button/gated_test/lift_open/config":
                 b'{"availability_topic": "gated/elsewhere/status"}'}
    for topic, payload in other.items():
        await probe.publish(topic, payload, retain=True)
    garage = '\n[gates.garage]\nnumbers = ["+31501234570"]\n' \
             'actuator = { type = "mock", pin = 22 }\n'
    await probe.subscribe("homeassistant/+/+/+/config")
    running = await start_daemon(mqtt_table(broker) + garage)
    await mqtt_ready(running)
    await probe.wait_for("homeassistant/+/gated_test/+/config", 8)
    await running.stop()

    again = await start_daemon(mqtt_table(broker))
    await mqtt_ready(again)
    gone = ["homeassistant/button/gated_test/garage_open/config",
            "homeassistant/event/gated_test/garage/config"]
    for topic in gone:
        await eventually(lambda t=topic: any(not m.payload for m in probe.on(t)))

    late = Probe(broker.port)
    await late.connect()
    await late.subscribe("homeassistant/#")
    await late.publish("homeassistant/marker", b"end")  # after every retained message
    await late.wait_for("homeassistant/marker")
    kept = {m.topic: m.payload for m in late.on("homeassistant/+/+/+/config")}
    await late.disconnect()
    assert sorted(kept) == sorted([
        "homeassistant/button/gated_test/barrier_open/config",
        "homeassistant/button/gated_test/door_open/config",
        "homeassistant/event/gated_test/barrier/config",
        "homeassistant/event/gated_test/door/config",
        "homeassistant/sensor/gated_test/last_entry/config",
        *other,
    ])
    assert all(kept[topic] == payload for topic, payload in other.items())
