"""The mqtt actuator against a real Mosquitto: confirmation, and never late."""

from __future__ import annotations

import time
from typing import Any

from gated.actuators.mqtt import MqttActuator
from gated.book.config import MqttActuatorConfig

from .broker import (
    LIFT,
    LIFT_CODE,
    Mosquitto,
    Probe,
    entries,
    eventually,
    lift_gate,
    mqtt_ready,
    mqtt_table,
    states,
    tasmota,
)
from .helpers import BARRIER


async def test_echo_from_the_device_answers_ack(broker: Mosquitto, probe: Probe,
                                                start_daemon: Any) -> None:
    """A device that reports ON within confirm: ACK, one QoS 1 non-retained command."""
    probe.answer("cmnd/lift/POWER", tasmota)
    await probe.subscribe("cmnd/lift/POWER", "stat/lift/POWER")
    running = await start_daemon(mqtt_table(broker) + lift_gate())
    await mqtt_ready(running)
    assert await running.get(code=LIFT_CODE, did=LIFT) == (200, "status=ACK")
    assert [(m.payload, m.retain, m.qos) for m in probe.on("cmnd/lift/POWER")] == [
        (b"ON", False, 1)]
    (entry,) = entries(running)
    assert (entry.gate, entry.status, entry.reason, entry.actuator) == (
        "lift", "ACK", "granted_code", "confirmed")


async def test_no_echo_answers_err_with_actuator_timeout(broker: Mosquitto, probe: Probe,
                                                         start_daemon: Any) -> None:
    """A silent device: ERR once confirm has passed, and the entry says actuator_timeout."""
    await probe.subscribe("cmnd/lift/POWER")
    running = await start_daemon(mqtt_table(broker) + lift_gate(confirm=0.4))
    await mqtt_ready(running)
    started = time.monotonic()
    assert await running.get(code=LIFT_CODE, did=LIFT) == (200, "status=ERR")
    assert 0.35 <= time.monotonic() - started < 1.5
    assert len(await probe.wait_for("cmnd/lift/POWER")) == 1
    (entry,) = entries(running)
    assert (entry.status, entry.reason, entry.actuator) == (
        "ERR", "granted_code", "actuator_timeout")


async def test_a_retained_state_is_not_a_confirmation(broker: Mosquitto, probe: Probe,
                                                      start_daemon: Any) -> None:
    """An ON the broker kept from earlier does not confirm today's command."""
    await probe.publish("stat/lift/POWER", b"ON", retain=True)
    running = await start_daemon(mqtt_table(broker) + lift_gate(confirm=0.3))
    await mqtt_ready(running)
    assert await running.get(code=LIFT_CODE, did=LIFT) == (200, "status=ERR")
    (entry,) = entries(running)
    assert entry.actuator == "actuator_timeout"


async def test_without_state_topic_the_broker_ack_is_enough(broker: Mosquitto, probe: Probe,
                                                            start_daemon: Any) -> None:
    """With no state_topic, the broker's PUBACK is the open command issued: ACK."""
    await probe.subscribe("cmnd/lift/POWER")
    running = await start_daemon(mqtt_table(broker) + lift_gate(state=False))
    await mqtt_ready(running)
    assert await running.get(code=LIFT_CODE, did=LIFT) == (200, "status=ACK")
    assert len(await probe.wait_for("cmnd/lift/POWER")) == 1
    (entry,) = entries(running)
    assert entry.actuator == "published"


async def test_shelly_style_json_state_confirms_by_key(broker: Mosquitto, probe: Probe,
                                                       start_daemon: Any) -> None:
    """state_key reads a JSON report: {"output": true} confirms, {"output": false} does not."""
    shelly = (', command_topic = "shelly1/rpc", state_topic = "shelly1/status/switch:0", '
              'state_key = "output", state_payload = "true"')
    gate = f"""
[gates.lift]
numbers = ["{LIFT}"]
actuator = {{ type = "mqtt", payload = "on"{shelly}, confirm = 0.4 }}

[[codes]]
name = "Lift"
code = "{LIFT_CODE}"
gates = ["lift"]
"""
    output = {"value": b"true"}
    probe.answer("shelly1/rpc", lambda _m: (
        "shelly1/status/switch:0", b'{"id":0,"source":"MQTT","output":' + output["value"] + b"}"))
    await probe.subscribe("shelly1/rpc")
    running = await start_daemon(mqtt_table(broker) + gate)
    await mqtt_ready(running)
    assert await running.get(code=LIFT_CODE, did=LIFT) == (200, "status=ACK")
    output["value"] = b"false"
    assert await running.get(code=LIFT_CODE, did=LIFT) == (200, "status=ERR")


def test_confirms_compares_text_or_a_json_value() -> None:
    """Plain payloads compare as trimmed text; with state_key, the JSON value at the key."""

    class NoLink:
        def subscribe(self, *_args: Any, **_kwargs: Any) -> None:
            pass

    plain = MqttActuator("g", MqttActuatorConfig(command_topic="c", state_topic="s"),
                         NoLink())  # type: ignore[arg-type]
    assert plain.confirms(b"ON") and plain.confirms(b"ON\n")
    assert not plain.confirms(b"OFF") and not plain.confirms(b'{"POWER":"ON"}')
    keyed = MqttActuator("g", MqttActuatorConfig(command_topic="c", state_topic="s",
                                                 state_key="a.output", state_payload="true"),
                         NoLink())  # type: ignore[arg-type]
    assert keyed.confirms(b'{"a": {"output": true}}')
    assert not keyed.confirms(b'{"a": {"output": false}}')
    assert not keyed.confirms(b'{"output": true}') and not keyed.confirms(b"not json")
    word = MqttActuator("g", MqttActuatorConfig(command_topic="c", state_topic="s",
                                                state_key="POWER", state_payload="ON"),
                        NoLink())  # type: ignore[arg-type]
    assert word.confirms(b'{"POWER": "ON"}') and not word.confirms(b'{"POWER": "OFF"}')


async def test_broker_down_err_at_once_relay_still_opens_and_nothing_late(
        broker: Mosquitto, start_daemon: Any) -> None:
    """Broker stopped: the MQTT gate answers ERR at once while the relay gate opens;
    restarted: a subscriber on the command topic sees no late or duplicate open."""
    # A persistent session: the watcher misses nothing published while it
    # reconnects after the restart.
    watcher = await Probe(broker.port, client_id="watcher", persistent=True).connect()
    await watcher.subscribe("cmnd/lift/POWER")
    running = await start_daemon(mqtt_table(broker) + lift_gate(state=False), pulse=0.05)
    link = running.daemon.link
    await mqtt_ready(running)
    assert await running.get(code=LIFT_CODE, did=LIFT) == (200, "status=ACK")
    await watcher.wait_for("cmnd/lift/POWER", 1)

    broker.stop()
    await watcher.disconnect()
    await eventually(lambda: not link.connected)
    for _ in range(3):
        started = time.monotonic()
        assert await running.get(code=LIFT_CODE, did=LIFT) == (200, "status=ERR")
        assert time.monotonic() - started < 0.25
    barrier = running.pin(17)
    assert await running.get(code="5555", did=BARRIER) == (200, "status=ACK")
    await eventually(lambda: not barrier.state)
    assert states(barrier) == [False, True, False]

    broker.start()
    await watcher.connect()
    await mqtt_ready(running, connections=2)
    assert await running.get(code=LIFT_CODE, did=LIFT) == (200, "status=ACK")
    # Commands on one connection arrive in order: any late copy from the
    # reconnect would have come before this last command.
    commands = await watcher.wait_for("cmnd/lift/POWER", 2)
    assert [(m.payload, m.retain) for m in commands] == [(b"ON", False), (b"ON", False)]
    await watcher.disconnect()
    lift = [(e.status, e.actuator) for e in entries(running) if e.gate == "lift"]
    assert lift == [("ACK", "published"), *[("ERR", "actuator_unreachable")] * 3,
                    ("ACK", "published")]


async def test_silent_broker_costs_one_open_the_confirm_time(broker: Mosquitto,
                                                             start_daemon: Any) -> None:
    """A frozen broker: the first open waits out confirm (ERR), the link is reset, the
    next is refused at once; when the broker answers again the gate works again."""
    running = await start_daemon(mqtt_table(broker) + lift_gate(state=False, confirm=0.4))
    link = running.daemon.link
    await mqtt_ready(running)
    broker.freeze()
    started = time.monotonic()
    assert await running.get(code=LIFT_CODE, did=LIFT) == (200, "status=ERR")
    assert 0.35 <= time.monotonic() - started < 1.5
    assert not link.connected
    started = time.monotonic()
    assert await running.get(code=LIFT_CODE, did=LIFT) == (200, "status=ERR")
    assert time.monotonic() - started < 0.25
    broker.thaw()
    await eventually(lambda: link.connections >= 2, within=15)
    assert await running.get(code=LIFT_CODE, did=LIFT) == (200, "status=ACK")
    lift = [(e.status, e.actuator) for e in entries(running) if e.gate == "lift"]
    assert lift == [("ERR", "actuator_timeout"), ("ERR", "actuator_unreachable"),
                    ("ACK", "published")]
