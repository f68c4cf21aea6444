"""The MQTT link itself: last will, TLS and passwords, backoff, and its config."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from gated.book.compiler import parse
from gated.core.errors import BrokerUnavailable, ConfigError
from gated.mqtt.link import MqttLink, backoff

from .broker import Mosquitto, Probe, eventually, lift_gate, mqtt_table
from .helpers import config_text, write_config

DATA = Path(__file__).parent / "data"
PREFIX = "gated/test"


async def test_killed_daemon_goes_offline_by_last_will(broker: Mosquitto, probe: Probe,
                                                       tmp_path: Path) -> None:
    """SIGKILL leaves no chance to say goodbye: the broker's last will says offline."""
    await probe.subscribe(f"{PREFIX}/status")
    path = write_config(tmp_path, mqtt_table(broker))
    daemon = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gated", "-c", str(path), "run",
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        await probe.wait_for(f"{PREFIX}/status", 1, within=20)
        os.kill(daemon.pid, signal.SIGKILL)
        status = await probe.wait_for(f"{PREFIX}/status", 2, within=15)
    finally:
        if daemon.returncode is None:
            daemon.kill()
        await daemon.wait()
    assert [m.payload for m in status] == [b"online", b"offline"]
    late = await Probe(broker.port).connect()
    await late.subscribe(f"{PREFIX}/status")
    (kept,) = await late.wait_for(f"{PREFIX}/status")
    assert (kept.payload, kept.retain) == (b"offline", True)
    await late.disconnect()


async def test_tls_and_password_from_the_config(tmp_path: Path, start_daemon: Any) -> None:
    """[mqtt] tls_ca, username and password reach a broker that demands all three."""
    tls = "".join(f"{key} {DATA / name}\n" for key, name in [
        ("cafile", "ca.pem"), ("certfile", "server.pem"), ("keyfile", "server.key")])
    server = Mosquitto(tmp_path / "tls-broker", listener=tls, users={"gate": "s3cret-pass"})
    server.start()
    try:
        auth = f'tls_ca = "{DATA / "ca.pem"}"\nusername = "gate"\npassword = "s3cret-pass"'
        running = await start_daemon(mqtt_table(server, auth).replace("127.0.0.1", "localhost"))
        assert await running.daemon.link.wait_connected(5)
        await running.stop()
    finally:
        server.stop()


async def test_wrong_password_is_refused_and_said(tmp_path: Path) -> None:
    """A refused login is logged as such and the link stays down, retrying."""
    server = Mosquitto(tmp_path / "auth-broker", users={"gate": "s3cret-pass"})
    server.start()
    config, _ = parse(config_text(tmp_path, mqtt_table(
        server, 'username = "gate"\npassword = "wrong"')))
    assert config.mqtt is not None
    link = MqttLink(config.mqtt, prefix=PREFIX, client_id="gated-test")
    try:
        with capture_logs() as logs:
            task = asyncio.create_task(link.run())
            await eventually(lambda: any(e["event"] == "mqtt broker unreachable" for e in logs))
            assert not link.connected
            with pytest.raises(BrokerUnavailable):
                await link.publish(f"{PREFIX}/x", b"1")
            await link.close()
            await asyncio.wait_for(task, 5)
    finally:
        server.stop()
    refused = next(e for e in logs if e["event"] == "mqtt broker unreachable")
    assert "authori" in refused["error"].lower() or "password" in refused["error"].lower()


async def test_a_cancelled_command_resets_its_connection(broker: Mosquitto,
                                                        tmp_path: Path) -> None:
    """A command whose wait is cancelled (the answer deadline) before its PUBACK ends the
    connection at once, rather than leave it to arrive late; a new one follows."""
    config, _ = parse(config_text(tmp_path, mqtt_table(broker)))
    assert config.mqtt is not None
    link = MqttLink(config.mqtt, prefix=PREFIX, client_id="gated-test")
    task = asyncio.create_task(link.run())
    try:
        assert await link.wait_connected(5)
        broker.freeze()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await link.publish("cmnd/lift/POWER", b"ON", within=5.0, command=True)
        assert not link.connected
        with pytest.raises(BrokerUnavailable):
            await link.publish("cmnd/lift/POWER", b"ON", command=True)
        broker.thaw()
        await eventually(lambda: link.connections == 2)
    finally:
        broker.thaw()
        await link.close()
        await asyncio.wait_for(task, 5)


def test_backoff_doubles_and_is_capped() -> None:
    """Reconnect delays double from the minimum and never exceed the maximum."""
    delays = [backoff(n, 0.5, 30.0) for n in range(12)]
    assert all(0.75 * min(30.0, 0.5 * 2**n) <= d <= min(30.0, 0.5 * 2**n)
               for n, d in enumerate(delays))
    assert max(backoff(n, 0.5, 30.0) for n in range(200)) <= 30.0


@pytest.mark.parametrize(
    ("extra", "path", "message"),
    [
        (lift_gate().replace("cmnd/lift/POWER", "cmnd/+/POWER"),
         "gates.lift.actuator.command_topic", "wildcards"),
        (lift_gate().replace("stat/lift/POWER", "cmnd/lift/POWER"),
         "gates.lift.actuator.state_topic", "must differ"),
        (lift_gate(confirm=3.0), "gates.lift.actuator.confirm", "answer_deadline"),
        (lift_gate(state=False, extra=', state_key = "output"'),
         "gates.lift.actuator.state_key", "needs a state_topic"),
        ('prefix = "gated/#"', "mqtt.prefix", "wildcards"),
        ('prefix = "gated/test/"', "mqtt.prefix", "trailing /"),
        ('fleet_prefix = "gated/test"', "mqtt.fleet_prefix", "must differ"),
        ('password = "x"', "mqtt.password", "needs a username"),
        ('reconnect_min = 5.0\nreconnect_max = 1.0', "mqtt.reconnect_min", "reconnect_max"),
        ('protocol = "4"', "mqtt.protocol", ""),
        ('protocol = "3.1.1"\n' + lift_gate(), "mqtt.protocol", "commands must expire"),
    ],
)
def test_mqtt_config_errors_name_the_key(tmp_path: Path, extra: str, path: str,
                                         message: str) -> None:
    """A wrong [mqtt] table or mqtt actuator stops start-up and names the key."""
    with pytest.raises(ConfigError) as caught:
        parse(config_text(tmp_path, '[mqtt]\nhost = "127.0.0.1"\n' + extra + "\n"))
    assert caught.value.path == path
    assert message in caught.value.detail


def test_unusable_ca_file_fails_at_start(tmp_path: Path) -> None:
    """A tls_ca that cannot be read is a config error at start, not a silent retry loop."""
    config, _ = parse(config_text(tmp_path, '[mqtt]\ntls_ca = "missing.pem"\n'))
    assert config.mqtt is not None
    with pytest.raises(ConfigError, match=r"mqtt\.tls_ca"):
        MqttLink(config.mqtt, prefix=PREFIX, client_id="x", ca_file=tmp_path / "missing.pem")


async def test_mqtt_3_1_1_brokers_still_get_status_and_events(broker: Mosquitto, probe: Probe,
                                                              start_daemon: Any) -> None:
    """protocol = "3.1.1" (no MQTT actuators) connects, goes online and publishes events."""
    from .broker import mqtt_ready
    from .helpers import BARRIER

    await probe.subscribe("gated/test/status", "gated/test/events")
    running = await start_daemon(mqtt_table(broker, 'protocol = "3.1.1"'))
    await mqtt_ready(running)
    assert await running.get(code="5555", did=BARRIER) == (200, "status=ACK")
    (event,) = await probe.wait_for("gated/test/events", 1)
    assert event.json()["reason"] == "granted_code"
    assert [m.payload for m in probe.on("gated/test/status")][-1] == b"online"


async def test_a_fleet_restarting_together_does_not_arrive_at_once(broker: Mosquitto,
                                                                   tmp_path: Path) -> None:
    """Before its first connect each site waits its own random moment, up to [mqtt]
    connect_spread seconds (a few by default), and a stop during that wait ends it."""
    config, _ = parse(config_text(tmp_path, '[mqtt]\nhost = "127.0.0.1"\n'))
    assert config.mqtt is not None and 1.0 <= config.mqtt.connect_spread <= 10.0
    config, _ = parse(config_text(tmp_path, mqtt_table(broker, "connect_spread = 600")))
    assert config.mqtt is not None
    fleet = [MqttLink(config.mqtt, prefix=f"gated/site{n}", client_id=f"gated-site{n}")
             for n in range(20)]
    delays = [link.first_delay for link in fleet]
    assert all(0.0 <= delay <= 600.0 for delay in delays)
    assert len(set(delays)) == len(delays)
    link = fleet[0]
    link.first_delay = 600.0
    task = asyncio.create_task(link.run())
    assert not await link.wait_connected(1.0)
    await link.close()
    await asyncio.wait_for(task, 5)
    assert link.connections == 0

    config, _ = parse(config_text(tmp_path, mqtt_table(broker)))  # connect_spread = 0
    assert config.mqtt is not None
    at_once = MqttLink(config.mqtt, prefix=PREFIX, client_id="gated-test")
    assert at_once.first_delay == 0.0
    task = asyncio.create_task(at_once.run())
    try:
        assert await at_once.wait_connected(5)
    finally:
        await at_once.close()
        await asyncio.wait_for(task, 5)
