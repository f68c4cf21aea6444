"""No MQTT message larger than the largest a site needs is ever taken into its memory."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from gated.mqtt.link import MAX_PACKET, MAX_PAYLOAD

from .broker import Mosquitto, Probe, mqtt_ready, mqtt_table
from .helpers import write_config
from .process import DaemonProcess

PREFIX = "gated/test"
BIG = 20 * 1024 * 1024  # far past the largest message a site needs, and cheap to send
MARKER = json.dumps({"code": "864209", "gates": ["barrier"]}).encode()


def rss(pid: int, field: str) -> int:
    """A VmRSS/VmHWM figure of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for process {pid}")


def peak_from_now(pid: int) -> int:
    """Reset the process's peak RSS to what it holds now, and return that."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return rss(pid, "VmRSS")


async def marker_applied(probe: Probe, daemon: DaemonProcess, n: int) -> None:
    """Publish a good code and wait until gated applied it: the broker delivers a
    client's messages in order, so everything published before it was delivered or
    dropped (or, on 3.1.1, it came with the retained codes of the next connection)."""
    await probe.publish(f"{PREFIX}/codes/marker-{n}", MARKER.replace(b"864209", b"86420%d" % n),
                        retain=True)
    await asyncio.to_thread(daemon.wait_for, "managed code applied", 20, id=f"marker-{n}")


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_an_oversized_message_never_reaches_a_sites_memory(
        broker: Mosquitto, probe: Probe, tmp_path: Path, protocol: str) -> None:
    """20 MB on homeassistant/status (Home Assistant's user may write it) and on a code's
    topic: the site's peak memory grows by far less than one of them, the site never
    reads either, and it keeps taking codes."""
    await probe.subscribe(f"{PREFIX}/codes/+/error")
    config = write_config(tmp_path, f"""
        [mqtt]
        host = "127.0.0.1"
        port = {broker.port}
        protocol = "{protocol}"
        reconnect_min = 0.05
        reconnect_max = 0.3
        connect_spread = 0
        """)
    daemon = DaemonProcess(config)
    try:
        await asyncio.to_thread(daemon.wait_for, "mqtt connected")
        await marker_applied(probe, daemon, 1)  # subscribed, and past what it does at connect
        before = peak_from_now(daemon.proc.pid)
        await probe.publish("homeassistant/status", b"x" * BIG)
        if protocol == "5":
            # 3.1.1 has no way to tell the broker; a retained one would be sent at
            # every connect there (the docs ask for the broker's message_size_limit).
            await probe.publish(f"{PREFIX}/codes/big", b"{" + b" " * BIG + b"}", retain=True)
        await marker_applied(probe, daemon, 2)
        grown = rss(daemon.proc.pid, "VmHWM") - before
    finally:
        daemon.stop()
    assert grown < BIG, f"peak RSS grew by {grown / 2**20:.1f} MiB"
    assert probe.on(f"{PREFIX}/codes/big/error") == []  # never read, so never refused
    # MQTT 5: the broker drops it for this client. 3.1.1: gated ends that
    # connection before the message's body is read, and connects again.
    lost = [e for e in daemon.events if e.get("event") == "mqtt connection lost"]
    ended = [e for e in daemon.events
             if str(e.get("event")).startswith("mqtt message larger than any gated takes")]
    assert (len(lost), len(ended)) == ((0, 0) if protocol == "5" else (1, 1))


async def test_the_largest_message_a_site_needs_still_arrives(
        broker: Mosquitto, probe: Probe, start_daemon: Any) -> None:
    """A message as large as the largest set chunk or manifest (with room for a
    signature) reaches the site: here a code's topic, which answers that it is too big."""
    await probe.subscribe(f"{PREFIX}/codes/+/error")
    running = await start_daemon(mqtt_table(broker))
    await mqtt_ready(running)
    await probe.publish(f"{PREFIX}/codes/huge", b"{" + b" " * (MAX_PAYLOAD - 2) + b"}")
    (verdict,) = await probe.wait_for(f"{PREFIX}/codes/huge/error")
    assert "too large" in verdict.json()["error"]
    assert MAX_PAYLOAD < MAX_PACKET < 2 * MAX_PAYLOAD  # room for the topic, not for another


def test_the_docs_give_the_broker_limit_gated_needs() -> None:
    """docs/mqtt.md and docs/fleet.md name the message_size_limit gated's own figure gives."""
    docs = Path(__file__).resolve().parent.parent / "docs"
    for page in ("mqtt.md", "fleet.md"):
        assert f"message_size_limit {MAX_PAYLOAD}" in (docs / page).read_text(), page
