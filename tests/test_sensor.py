from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from gpiozero.pins.mock import MockFactory

from gated.book import compiler
from gated.cli import main
from gated.core.errors import ConfigError
from gated.site.store import Entry, read_entries

from .helpers import BARRIER, RESIDENT, config_text, write_config

# A limit switch that closes when the barrier is open: the mock pin idles
# high (pulled up, contact open, gate shut) and the test drives it low to
# move the gate.
SENSOR = """
[gates.barrier.sensor]
type = "mock"
pin = 22
open_when = "contact_closed"
confirm = {confirm}
held_open = {held_open}
bounce = {bounce}
"""


def sensor(confirm: float = 1.0, held_open: float = 0, bounce: float = 0) -> str:
    return SENSOR.format(confirm=confirm, held_open=held_open, bounce=bounce)


def states(pin: Any) -> list[bool]:
    return [bool(s.state) for s in pin.states]


def entries(running: Any) -> list[Entry]:
    return list(reversed(read_entries(running.daemon.gatekeeper.store.path, limit=1000)))


async def alarms(running: Any, count: int, within: float = 3.0) -> list[Entry]:
    """The sensor's entries, once ``count`` of them are stored."""
    deadline = time.monotonic() + within
    while True:
        await running.daemon.gatekeeper.store.flush()
        found = [e for e in entries(running) if e.source == "sensor"]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.02)


async def open_barrier(running: Any) -> tuple[int, str]:
    return await running.get(code="", did=BARRIER, callerid=RESIDENT)


async def test_open_is_confirmed_when_the_gate_moves(start_daemon: Any) -> None:
    """The answer waits for the switch, then says ACK and the entry says confirmed."""
    running = await start_daemon(sensor(confirm=1.0), pulse=0.1)
    switch, relay = running.pin(22), running.pin(17)
    asyncio.get_running_loop().call_later(0.15, switch.drive_low)
    started = time.monotonic()
    assert await open_barrier(running) == (200, "status=ACK")
    assert 0.1 <= time.monotonic() - started < 1.0
    await running.daemon.gatekeeper.store.flush()
    (entry,) = entries(running)
    assert (entry.status, entry.reason, entry.actuator) == ("ACK", "granted_caller", "confirmed")
    await asyncio.sleep(0.2)
    assert states(relay) == [False, True, False]
    assert states(switch) == [False, True, False]  # floating, pulled up, the gate moved
    assert await alarms(running, 0, within=0) == []  # commanded: no forced_open


async def test_gate_that_does_not_move_answers_err_not_moved(start_daemon: Any) -> None:
    """The relay pulsed but the switch never changed: ERR, so the caller reaches a person."""
    running = await start_daemon(sensor(confirm=0.3), pulse=0.1)
    assert await open_barrier(running) == (200, "status=ERR")
    await running.daemon.gatekeeper.store.flush()
    (entry,) = entries(running)
    assert (entry.status, entry.reason, entry.actuator) == ("ERR", "granted_caller", "not_moved")
    assert states(running.pin(17)) == [False, True, False]
    assert states(running.pin(22)) == [False, True]


async def test_gate_already_open_confirms_at_once(start_daemon: Any) -> None:
    """A second car while the barrier is still up is confirmed without waiting."""
    running = await start_daemon(sensor(confirm=2.0), pulse=0.1)
    switch = running.pin(22)
    asyncio.get_running_loop().call_later(0.05, switch.drive_low)
    assert await open_barrier(running) == (200, "status=ACK")
    started = time.monotonic()
    assert await open_barrier(running) == (200, "status=ACK")
    assert time.monotonic() - started < 0.5
    await running.daemon.gatekeeper.store.flush()
    assert [e.actuator for e in entries(running)] == ["confirmed", "confirmed"]


async def test_opening_without_a_command_is_forced_open(start_daemon: Any) -> None:
    """The gate opening with no open command is recorded as a forced_open alarm."""
    running = await start_daemon(sensor())
    running.pin(22).drive_low()
    (alarm,) = await alarms(running, 1)
    assert (alarm.gate, alarm.status, alarm.reason, alarm.source) == (
        "barrier", "ALARM", "forced_open", "sensor")
    assert (alarm.caller, alarm.credential, alarm.actuator) == (None, "", "")
    assert states(running.pin(17)) == [False]


async def test_gate_left_open_raises_held_open_once(start_daemon: Any) -> None:
    """Open past held_open seconds: one held_open alarm, none after it closes."""
    running = await start_daemon(sensor(confirm=1.0, held_open=0.2), pulse=0.1)
    switch = running.pin(22)
    asyncio.get_running_loop().call_later(0.05, switch.drive_low)
    assert await open_barrier(running) == (200, "status=ACK")
    (alarm,) = await alarms(running, 1)
    assert (alarm.reason, alarm.status) == ("held_open", "ALARM")
    assert 180 <= alarm.latency_ms < 1000  # how long it had been open
    switch.drive_high()
    await asyncio.sleep(0.3)
    assert [e.reason for e in entries(running)] == ["granted_caller", "held_open"]
    assert states(switch) == [False, True, False, True]


async def test_gate_open_at_start_is_not_forced(start_daemon: Any) -> None:
    """A gate already open when gated starts raises no forced_open, and can close."""
    # Default wiring: a door contact closed while the gate is shut. Nothing
    # drives the mock pin, so it reads pulled up: contact open, gate open.
    running = await start_daemon("""
        [gates.barrier.sensor]
        type = "mock"
        pin = 22
        bounce = 0
        """)
    sensor_ = running.daemon.sensors["barrier"]
    assert sensor_.is_open
    running.pin(22).drive_low()
    await asyncio.sleep(0.05)
    assert not sensor_.is_open
    assert await alarms(running, 0, within=0) == []


async def test_contact_bounce_is_one_opening(start_daemon: Any) -> None:
    """A chattering contact settles into one opening: one forced_open, not three."""
    running = await start_daemon(sensor(bounce=0.05))
    switch = running.pin(22)
    for _ in range(3):
        switch.drive_low()
        switch.drive_high()
    switch.drive_low()
    await asyncio.sleep(0.2)
    assert await alarms(running, 1) == await alarms(running, 2, within=0.3)
    assert [a.reason for a in await alarms(running, 1)] == ["forced_open"]
    assert running.daemon.sensors["barrier"].is_open
    assert states(switch) == [False, True, False, True, False, True, False, True, False]


@pytest.mark.parametrize(
    ("extra", "path", "message"),
    [
        (sensor().replace('"mock"', '"gpio"'), "gates.barrier.sensor.type", "must be 'mock'"),
        (sensor(confirm=3.0), "gates.barrier.sensor.confirm", "answer_deadline"),
        (sensor().replace("pin = 22", "pin = 17"), "gates.barrier.sensor.pin",
         "already gate 'barrier''s relay"),
        (sensor() + "window = 0.5\n", "gates.barrier.sensor.window", "at least sensor.confirm"),
        (sensor(confirm=0.5, bounce=0.5), "gates.barrier.sensor.bounce",
         "shorter than sensor.confirm"),
        (sensor() + "colour = 'red'\n", "gates.barrier.sensor.colour", "unknown key"),
        (sensor().replace('"contact_closed"', '"sometimes"'), "gates.barrier.sensor.open_when",
         "Invalid enum value"),
    ],
)
def test_sensor_config_errors_name_the_key(tmp_path: Path, extra: str, path: str,
                                           message: str) -> None:
    """A sensor config mistake stops gated at start with its key path."""
    with pytest.raises(ConfigError) as error:
        compiler.parse(config_text(tmp_path, extra))
    assert error.value.path == path
    assert message in str(error.value)


def test_metrics_never_share_the_webhook_port(tmp_path: Path) -> None:
    """[metrics] listen on the webhook's port is refused."""
    text = config_text(tmp_path, '[metrics]\nlisten = "127.0.0.1:8080"\n').replace(
        'listen = "127.0.0.1:0"', 'listen = "0.0.0.0:8080"')
    with pytest.raises(ConfigError, match="another port") as error:
        compiler.parse(text)
    assert error.value.path == "metrics.listen"


def test_bench_pulse_reports_what_the_sensor_saw(
        tmp_path: Path, mock_factory: MockFactory, capsys: pytest.CaptureFixture[str]) -> None:
    """`gated pulse` on a gate with a sensor says confirmed, or that the gate did not move."""
    still = write_config(tmp_path, sensor(confirm=0.2), pulse=0.1)
    assert main(["--config", str(still), "pulse", "barrier"]) == 2
    assert "pulsed, but the sensor saw no movement within 0.2s" in capsys.readouterr().err
    mock_factory.reset()
    # Nothing drives the mock input: pulled up, the default wiring reads "open".
    moved = write_config(tmp_path, sensor(confirm=0.2).replace(
        'open_when = "contact_closed"\n', ""), pulse=0.1)
    assert main(["--config", str(moved), "pulse", "barrier"]) == 0
    assert capsys.readouterr().out.endswith("\ngate barrier: confirmed\n")
