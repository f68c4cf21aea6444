"""Home Assistant's side of the broker: what it finds after its own restart, and the
entities of gates removed while it was away."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import msgspec
import pytest

from gated.mqtt import hass

from .broker import Mosquitto, Probe, eventually, mqtt_ready, mqtt_table
from .helpers import BARRIER

PREFIX = "gated/test"
GARAGE = ('\n[gates.garage]\nnumbers = ["+31501234570"]\n'
          'actuator = { type = "mock", pin = 22 }\n')
GARAGE_CONFIGS = ["homeassistant/button/gated_test/garage_open/config",
                  "homeassistant/event/gated_test/garage/config"]


async def _home_assistant(broker: Mosquitto) -> Probe:
    """Home Assistant (re)started: subscribed to discovery and to the sites, not yet
    announced."""
    hass = Probe(broker.port)
    await hass.connect()
    await hass.subscribe("homeassistant/#", "gated/#")
    await hass.publish("homeassistant/marker", b"end")  # after every retained message
    await hass.wait_for("homeassistant/marker")
    return hass


async def test_a_gate_removed_while_home_assistant_is_down_leaves_it_when_it_returns(
        broker: Mosquitto, probe: Probe, start_daemon: Any) -> None:
    """A gate taken out while Home Assistant is away (its clearing unseen) is cleared again
    when Home Assistant says it is back (its birth message), even across another restart
    of gated meanwhile; gates still configured are announced, never cleared."""
    await probe.subscribe("homeassistant/+/+/+/config")
    first = await start_daemon(mqtt_table(broker) + GARAGE)
    await mqtt_ready(first)
    await probe.wait_for("homeassistant/+/gated_test/+/config", 7)
    await first.stop()

    # Home Assistant is down now: the garage's clearing goes unseen.
    second = await start_daemon(mqtt_table(broker))
    await mqtt_ready(second)
    for topic in GARAGE_CONFIGS:
        await eventually(lambda t=topic: any(not m.payload for m in probe.on(t)))
    await second.stop()
    third = await start_daemon(mqtt_table(broker))
    await mqtt_ready(third)

    hass = await _home_assistant(broker)
    assert hass.on(GARAGE_CONFIGS[0]) == []  # nothing retained to tell it
    await hass.publish("homeassistant/status", b"online")
    for topic in GARAGE_CONFIGS:
        (cleared,) = await hass.wait_for(topic, within=5)
        assert (cleared.payload, cleared.retain) == (b"", False)
    # Home Assistant announced again: the remaining gates' configs, none empty.
    await hass.wait_for("homeassistant/+/gated_test/+/config", 5 + 2 + 5)
    live = [m for m in hass.on("homeassistant/+/gated_test/+/config") if not m.retain]
    assert all(m.payload for m in live if m.topic not in GARAGE_CONFIGS)
    await hass.disconnect()


async def test_the_last_entry_sensor_has_a_state_after_home_assistant_restarts(
        broker: Mosquitto, start_daemon: Any) -> None:
    """The last-entry sensor's state topic keeps the last entry retained, so Home
    Assistant shows it after its own restart instead of unknown; no digits in it."""
    running = await start_daemon(mqtt_table(broker))
    await mqtt_ready(running)
    await running.get(code="471123", did=BARRIER, callerid="0612345678")
    await running.get(code="834512", did=BARRIER, callerid="0612345678")
    await eventually(lambda: running.daemon.bridge._pending_events == 0)

    hass = await _home_assistant(broker)
    (config,) = hass.on("homeassistant/sensor/gated_test/last_entry/config")
    sensor = config.json()
    assert sensor["json_attributes_topic"] == sensor["state_topic"]
    kept = [m for m in hass.on(sensor["state_topic"]) if m.retain]
    assert [(m.json()["result"], m.json()["reason"]) for m in kept] == [
        ("denied", "unknown_code")]
    assert b"834512" not in kept[0].payload and b"471123" not in kept[0].payload
    await hass.disconnect()


async def test_the_open_button_carries_no_payload_the_template_replaces(
        broker: Mosquitto, probe: Probe, start_daemon: Any) -> None:
    """The button's config says what a press sends once: its command template (the time
    of the press), with no payload_press that the template overrides."""
    await probe.subscribe("homeassistant/button/+/+/config")
    running = await start_daemon(mqtt_table(broker))
    await mqtt_ready(running)
    buttons = await probe.wait_for("homeassistant/button/gated_test/+/config", 2)
    for button in buttons:
        config = button.json()
        assert "payload_press" not in config
        assert config["command_template"] == '{"at": {{ as_timestamp(now()) }}}'


def test_removed_gates_are_cleared_again_for_a_while_not_for_ever(tmp_path: Path) -> None:
    """The cleared topics kept beside the store last KEEP_REMOVED and at most MAX_REMOVED
    of them (the latest); a damaged list is an error to log, not a crash."""
    path = hass.removed_path(tmp_path / "entries.sqlite3")
    now = time.time()
    assert hass.load_removed(path, now) == {}
    hass.save_removed(path, {"old": now - hass.KEEP_REMOVED - 1, "recent": now - 60})
    assert hass.load_removed(path, now) == {"recent": now - 60}
    many = {f"t{n}": now - n for n in range(hass.MAX_REMOVED + 5)}
    hass.save_removed(path, many)
    kept = hass.load_removed(path, now)
    assert len(kept) == hass.MAX_REMOVED and "t0" in kept and f"t{hass.MAX_REMOVED}" not in kept
    path.write_bytes(b"not json")
    with pytest.raises(msgspec.DecodeError):
        hass.load_removed(path, now)
