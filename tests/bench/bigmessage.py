"""Peak memory of a site sent one very large MQTT message on homeassistant/status.

    .venv/bin/python tests/bench/bigmessage.py [--mb 100] [--protocol 5] [--src DIR]

A real Mosquitto with its default settings (no ``message_size_limit``),
started here; ``gated run`` on config/gated.example.toml with an ``[mqtt]``
table for it (a subprocess). Once the site is connected and has applied a
code sent as a marker, its peak RSS is reset to what it holds; then ``--mb``
megabytes go to ``homeassistant/status`` (which Home Assistant's user may
write), then a second marker code, and the peak is read once the site has
applied that one (the broker delivers a client's messages in order, so the
large one was delivered or dropped before it).

``--src DIR`` runs gated from another tree (e.g. ``git archive main`` unpacked
there) to compare with it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))

from tests.broker import Mosquitto  # noqa: E402
from tests.process import DaemonProcess, free_port  # noqa: E402


def status(pid: int, field: str) -> int:
    """A VmRSS/VmHWM figure of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field}")


def publish(port: int, topic: str, payload: bytes, *, retain: bool = False) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(120)
    finally:
        client.disconnect()
        client.loop_stop()


def marker(daemon: DaemonProcess, port: int, n: int) -> None:
    body = json.dumps({"code": f"86420{n}", "gates": ["*"]}).encode()
    publish(port, f"gated/noord/codes/marker-{n}", body, retain=True)
    daemon.wait_for("managed code applied", 120, id=f"marker-{n}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--protocol", choices=["5", "3.1.1"], default="5")
    parser.add_argument("--src", type=Path, help="run gated from this tree")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        broker = Mosquitto(folder / "broker")
        broker.start()
        site = folder / "site"
        site.mkdir()
        config = site / "gated.toml"
        example = (ROOT / "config" / "gated.example.toml").read_text()
        config.write_text(example.replace('listen = "127.0.0.1:8080"',
                                          f'listen = "127.0.0.1:{free_port()}"')
                          + f'\n[mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\n'
                          f'connect_spread = 0\nprotocol = "{args.protocol}"\n')
        env = {"PYTHONPATH": str(args.src.resolve())} if args.src else {}
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        # `python -m` puts the working directory first on the import path: the
        # tree this script runs from would win over --src.
        os.chdir(folder)
        daemon = DaemonProcess(config, env=env)
        try:
            daemon.wait_for("mqtt connected", 60)
            marker(daemon, broker.port, 1)
            pid = daemon.proc.pid
            started_peak = status(pid, "VmHWM")
            Path(f"/proc/{pid}/clear_refs").write_text("5")  # the peak from here on
            before = status(pid, "VmRSS")
            publish(broker.port, "homeassistant/status", b"x" * (args.mb * 1024 * 1024))
            marker(daemon, broker.port, 2)
            peak = status(pid, "VmHWM")
            after = status(pid, "VmRSS")
            lost = sum(1 for e in daemon.events if e.get("event") == "mqtt connection lost")
        finally:
            daemon.stop()
            broker.stop()
    source = str(args.src) if args.src else "this tree"
    print(f"gated from {source}, MQTT {args.protocol}, {args.mb} MB on homeassistant/status")
    print(f"  peak RSS at start-up     {started_peak / 1024:8.1f} MiB")
    print(f"  RSS before the message   {before / 1024:8.1f} MiB")
    print(f"  peak RSS with it         {peak / 1024:8.1f} MiB  (+{(peak - before) / 1024:.1f})")
    print(f"  RSS after                {after / 1024:8.1f} MiB")
    print(f"  connections lost         {lost}")


if __name__ == "__main__":
    main()
