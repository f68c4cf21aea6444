"""The real daemon as a subprocess: signals, shutdown order, the relay."""

from __future__ import annotations

import asyncio
import signal
import urllib.request
from pathlib import Path

import pytest

from .broker import Mosquitto, Probe, mqtt_table
from .helpers import BARRIER, TOKEN, write_config
from .process import DaemonProcess, free_port

STATUS = "gated/test/status"


def call(port: int, code: str) -> str:
    url = (f"http://127.0.0.1:{port}/voipgrid?token={TOKEN}&code={code}"
           f"&did=%2B{BARRIER[1:]}&callerid=0612345678")
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_pulse_leaves_the_relay_off(tmp_path: Path, signum: int) -> None:
    """SIGTERM or SIGINT during a 5 s pulse: the pin goes off at once and gated exits 0."""
    port = free_port()
    config = write_config(tmp_path, pulse=5.0)
    config.write_text(config.read_text().replace("127.0.0.1:0", f"127.0.0.1:{port}"))
    daemon = DaemonProcess(config)
    try:
        daemon.wait_for("listening")
        assert call(port, "471123").startswith("status=ACK")
        daemon.wait_for("relay on", gate="barrier")
        daemon.signal(signum)
        assert daemon.proc.wait(10) == 0
        events = daemon.drain()
    finally:
        daemon.stop()
    names = [e["event"] for e in events]
    assert "relay off" not in names  # the pulse never ran its course...
    history = next(e for e in events if e["event"] == "mock pin history" and e["gate"] == "barrier")
    assert history["states"] == [False, True, False]  # ...yet the pin ended off
    assert names.index("stopping") < names.index("mock pin history") < names.index("stopped")
    entry = next(e for e in events if e["event"] == "entry")
    assert entry["durable"] is True and entry["status"] == "ACK"
    assert "471123" not in repr(events)


def test_bad_config_exits_nonzero_naming_the_key(tmp_path: Path) -> None:
    """A daemon started on a bad file refuses to run and says which key is wrong."""
    config = write_config(tmp_path)
    config.write_text(config.read_text().replace("pulse = 0.2 }", "pulse = 0.2, colour = 1 }", 1))
    daemon = DaemonProcess(config)
    daemon.proc.wait(20)
    code = daemon.stop()
    events = daemon.events
    assert code == 2
    text = " ".join(e.get("line", "") for e in events)
    assert "gates.barrier.actuator.colour: unknown key" in text


def test_unusable_state_directory_is_a_clear_start_error(tmp_path: Path) -> None:
    """A store that cannot be created stops the start with the path and the reason."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    config = write_config(tmp_path)
    config.write_text(config.read_text().replace(
        str(tmp_path / "state" / "entries.sqlite3"), str(blocker / "entries.sqlite3")))
    daemon = DaemonProcess(config)
    daemon.proc.wait(20)
    assert daemon.stop() == 2
    text = " ".join(e.get("line", "") for e in daemon.events)
    assert "not-a-dir" in text and "Not a directory" in text
    assert "Traceback" not in text
    assert not [e for e in daemon.events if e.get("event") == "relay ready"]  # nothing touched


def _output(daemon: DaemonProcess) -> list[str]:
    """What a daemon wrote that was not a JSON log line (its start-up error)."""
    return [e["line"] for e in daemon.events if e.get("event") == "non-json" and e["line"]]


async def _refused(config: Path) -> tuple[int, DaemonProcess]:
    second = DaemonProcess(config)
    await asyncio.to_thread(second.proc.wait, 20)
    return await asyncio.to_thread(second.stop), second


async def test_second_daemon_on_the_same_state_refuses_before_touching_anything(
        broker: Mosquitto, probe: Probe, tmp_path: Path) -> None:
    """A second gated on the same store exits non-zero with one line naming the lock and
    the first one's pid, before any pin or the broker: the first keeps serving and online."""
    await probe.subscribe(STATUS, "gated/test/marker")
    port = free_port()
    config = write_config(tmp_path, mqtt_table(broker))
    config.write_text(config.read_text().replace("127.0.0.1:0", f"127.0.0.1:{port}"))
    first = DaemonProcess(config)
    try:
        await asyncio.to_thread(first.wait_for, "mqtt connected")
        await probe.wait_for(STATUS)
        code, second = await _refused(config)
        assert code != 0
        lock = tmp_path / "state" / "entries.sqlite3.lock"
        (line,) = _output(second)
        assert str(lock) in line and f"pid {first.proc.pid}" in line
        started = [e.get("event") for e in second.events if e.get("event") != "non-json"]
        assert started == []  # no relay readied, no broker connection, nothing listening
        # The first was never knocked off the broker nor declared offline, and still answers.
        assert await asyncio.to_thread(call, port, "471123") == (
            "status=ACK&callername=Welcome&destination=201")
        await probe.publish("gated/test/marker", b"after")  # everything before it has arrived
        await probe.wait_for("gated/test/marker")
        assert [m.payload for m in probe.on(STATUS)] == [b"online"]
        assert broker.log().count(" as gated-test ") == 1  # the second never connected
        assert first.proc.poll() is None
    finally:
        assert first.stop() == 0
    assert "mqtt connection lost" not in [e.get("event") for e in first.events]


async def test_second_daemon_on_the_same_port_never_says_the_first_is_offline(
        broker: Mosquitto, probe: Probe, tmp_path: Path) -> None:
    """Another state directory but the same port and site: it fails to listen, says so in
    one line, and never reaches the broker, so the running one stays online."""
    await probe.subscribe(STATUS, "gated/test/marker")
    port = free_port()
    config = write_config(tmp_path, mqtt_table(broker))
    text = config.read_text().replace("127.0.0.1:0", f"127.0.0.1:{port}")
    config.write_text(text)
    other = tmp_path / "other.toml"
    other.write_text(text.replace(str(tmp_path / "state"), str(tmp_path / "other")))
    first = DaemonProcess(config)
    try:
        await asyncio.to_thread(first.wait_for, "mqtt connected")
        await probe.wait_for(STATUS)
        code, second = await _refused(other)
        assert code != 0
        (line,) = _output(second)
        assert f"127.0.0.1:{port}" in line and "in use" in line
        assert "mqtt connected" not in [e.get("event") for e in second.events]
        await probe.publish("gated/test/marker", b"after")
        await probe.wait_for("gated/test/marker")
        assert [m.payload for m in probe.on(STATUS)] == [b"online"]
        assert broker.log().count(" as gated-test ") == 1  # the second never connected
        assert await asyncio.to_thread(call, port, "5555") == "status=ACK"
    finally:
        assert first.stop() == 0
    assert "mqtt connection lost" not in [e.get("event") for e in first.events]


SHOW_EXCEPTION = """
import structlog
from gated.site import logs
logs.configure("{fmt}", "info")

def handler(code="471123", token="test-token-0123456789"):
    raise RuntimeError("boom")

try:
    handler()
except RuntimeError:
    structlog.get_logger().exception("call failed")
"""


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_tracebacks_never_show_locals(fmt: str) -> None:
    """A logged exception shows the traceback but no frame locals (the code, the token)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", SHOW_EXCEPTION.format(fmt=fmt)],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    assert "RuntimeError" in out and "boom" in out
    assert "471123" not in out and "test-token" not in out
