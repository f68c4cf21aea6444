"""A fleet arriving at its central broker at once: refusals, time to the whole set, disk.

    .venv/bin/python tests/bench/storm.py [--sites 200] [--spread 0] [--nofile 0]
        [--autosave changes:1|seconds:60] [--max-queued-bytes 0] [--persistent]

A real Mosquitto (the one the tests use), started here, under ``prlimit
--nofile`` when ``--nofile`` is given (Debian's mosquitto.service runs with
1,024), holding a fleet's set as retained messages: a manifest and chunks of
256 KiB, 3,490,058 bytes in all (50,000 codes). Then ``--sites`` simulated
sites, one asyncio process, each an MQTT 5 client that subscribes as a gated
site does (its own topics, the fleet's codes and set, Home Assistant's
status), publishes a retained ``online`` and its own set state, and reads
until it holds the whole set. Each site first waits a random moment up to
``--spread`` seconds, as ``[mqtt] connect_spread`` makes it. Reported:

- refused: sites whose connect failed (and what the broker's log says);
- the whole set at every site that connected: seconds from the first
  connect, and the spread of connects;
- what the broker wrote to disk meanwhile (``/proc/<pid>/io`` write_bytes,
  its persistence and log) and its peak memory (VmHWM).

The broker, the sites and this script share the machine: on two cores the
sites' own reading is most of the time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiomqtt

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))

from tests.process import free_port  # noqa: E402

FLEET = "gated/fleet"
SET_BYTES = 3_490_058
CHUNK = 256 * 1024
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def proc_value(pid: int, name: str, key: str) -> int:
    for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1])
    return 0


def start_broker(work: Path, args: argparse.Namespace) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    kind, _, every = args.autosave.partition(":")
    conf = work / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\n"
        f"user {os.environ.get('USER', 'root')}\n"
        f"persistence true\npersistence_location {work}/\n"
        f"autosave_on_changes {'true' if kind == 'changes' else 'false'}\n"
        f"autosave_interval {every}\n"
        f"max_queued_bytes {args.max_queued_bytes}\nset_tcp_nodelay true\n"
        f"log_dest file {work}/mosquitto.log\nlog_type error\nlog_type warning\n"
        "log_type notice\n")
    command = [MOSQUITTO, "-c", str(conf)]
    if args.nofile:
        command = ["prlimit", f"--nofile={args.nofile}", *command]
    broker = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return broker, port
        time.sleep(0.02)
    raise RuntimeError("mosquitto did not start")


async def publish_set(port: int) -> int:
    """The fleet's set as retained messages: chunks, then the manifest; how many chunks."""
    chunks = -(-SET_BYTES // CHUNK)
    async with aiomqtt.Client("127.0.0.1", port, identifier="staff") as staff:
        for n in range(chunks):
            size = min(CHUNK, SET_BYTES - n * CHUNK)
            await staff.publish(f"{FLEET}/set/{n}", random.randbytes(size), qos=1, retain=True)
        await staff.publish(f"{FLEET}/set", b'{"chunks": %d}' % chunks, qos=1, retain=True)
    return chunks


async def site(n: int, port: int, chunks: int, args: argparse.Namespace,
               start: float, connected: list[float], done: list[float],
               refused: list[str]) -> None:
    await asyncio.sleep(random.uniform(0, args.spread))
    prefix = f"gated/site{n}"
    will = aiomqtt.Will(f"{prefix}/status", b"offline", qos=1, retain=True)
    try:
        async with aiomqtt.Client(
                "127.0.0.1", port, identifier=f"gated-site{n}", will=will, keepalive=60,
                protocol=aiomqtt.ProtocolVersion.V5 if not args.persistent else None,
                clean_session=False if args.persistent else None, timeout=60) as client:
            connected.append(time.monotonic() - start)
            await client.subscribe([(f"{prefix}/gates/+/open", 1), (f"{prefix}/codes/+", 1),
                                    (f"{prefix}/set/#", 1), (f"{FLEET}/set/#", 1),
                                    (f"{FLEET}/codes/+", 1), (f"{prefix}/routes/+", 1),
                                    ("homeassistant/status", 0)])
            await client.publish(f"{prefix}/status", b"online", qos=1, retain=True)
            await client.publish(f"{prefix}/fleet", b'{"complete": false}', qos=1, retain=True)
            have: set[str] = set()
            async for message in client.messages:
                if message.topic.matches(f"{FLEET}/set/#") or message.topic.matches(
                        f"{FLEET}/set"):
                    have.add(message.topic.value)
                if len(have) == chunks + 1:
                    done.append(time.monotonic() - start)
                    break
            await client.publish(f"{prefix}/fleet", b'{"complete": true}', qos=1, retain=True)
    except aiomqtt.MqttError as exc:
        refused.append(str(exc))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, default=200)
    parser.add_argument("--spread", type=float, default=0.0,
                        help="each site waits a random moment up to this (seconds)")
    parser.add_argument("--nofile", type=int, default=0,
                        help="the broker's open-file limit (prlimit); 0: this shell's")
    parser.add_argument("--autosave", default="changes:1",
                        help="changes:N (autosave_on_changes true) or seconds:N")
    parser.add_argument("--max-queued-bytes", type=int, default=0)
    parser.add_argument("--persistent", action="store_true",
                        help="MQTT 3.1.1 persistent sessions instead of gated's clean MQTT 5")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gated-storm-") as tmp:
        work = Path(tmp)
        broker, port = start_broker(work, args)
        try:
            chunks = await publish_set(port)
            written = proc_value(broker.pid, "io", "write_bytes")
            connected: list[float] = []
            done: list[float] = []
            refused: list[str] = []
            start = time.monotonic()
            await asyncio.gather(*(site(n, port, chunks, args, start, connected, done, refused)
                                   for n in range(args.sites)))
            took = time.monotonic() - start
            await asyncio.sleep(1.5)  # a seconds-based autosave may follow
            written = proc_value(broker.pid, "io", "write_bytes") - written
            peak = proc_value(broker.pid, "status", "VmHWM:")
        finally:
            broker.terminate()
            broker.wait(10)
        log = (work / "mosquitto.log").read_text(errors="replace")
    print(f"sites {args.sites}, spread {args.spread:g}s, nofile {args.nofile or 'shell'}, "
          f"autosave {args.autosave}, max_queued_bytes {args.max_queued_bytes}, "
          f"{'persistent 3.1.1' if args.persistent else 'clean MQTT 5'} sessions; "
          f"set {SET_BYTES:,} bytes in {chunks} chunks")
    print(f"refused: {len(refused)}"
          + (f" (e.g. {refused[0]!r}; broker log lines with 'tcpd': "
             f"{log.count('tcpd')})" if refused else ""))
    if connected:
        print(f"connects from {min(connected):.2f} to {max(connected):.2f} s")
    if done:
        print(f"whole set at {len(done)} sites: last {max(done):.2f} s after the start "
              f"(median {sorted(done)[len(done) // 2]:.2f} s); all finished in {took:.2f} s")
    print(f"broker wrote {written / 1e6:.1f} MB to disk; peak memory {peak / 1024:.0f} MiB; "
          f"data {SET_BYTES * len(done) / 1e9:.2f} GB sent to sites")


if __name__ == "__main__":
    asyncio.run(main())
