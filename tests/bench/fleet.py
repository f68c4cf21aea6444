"""The fleet's code set at one site: publish, a fresh site, restart, memory, messages, a change.

    .venv/bin/python tests/bench/fleet.py [--codes 50000] [--calls-per-second 100]

A real Mosquitto with its default settings (``max_queued_messages 1000``),
started here; the real daemon (a subprocess); the set published as ``gated
codes import --fleet`` publishes it. Reported:

- publish: compiling and publishing the whole set (chunks and manifest);
- messages per connect: the retained messages a site's subscriptions get;
- fresh site: from the daemon's start (and from its broker connection) until
  the whole set is applied and a fleet code opens;
- restart: from the daemon's start to the first ACK of a fleet code, with the
  set in the local copy (the broker up);
- steady RSS after calls, against the bare aiohttp floor (tests/bench/floor.py)
  and the same site with no fleet codes;
- a changed set (every code new) published while calls arrive at a steady
  rate: the worst answer while it applies against the p99 of the quiet
  seconds before;
- the same codes the way they travelled before there were sets (``--per-code``):
  one retained message each, with digits, through a broker whose queue was
  raised to hold them all: a fresh site, a restart, RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))

from gated.book import (  # noqa: E402
    codeset,
    signing,
    sitekey,
)
from gated.book.codeset import Entry, SetPolicy  # noqa: E402
from gated.book.config import MqttConfig  # noqa: E402
from gated.commands import sets as setstaff  # noqa: E402
from gated.mqtt.link import connect, read_retained  # noqa: E402
from tests.broker import Mosquitto  # noqa: E402
from tests.fleet import publish_retained  # noqa: E402
from tests.helpers import BARRIER, TOKEN, write_config  # noqa: E402
from tests.process import DaemonProcess, free_port  # noqa: E402

FLEET = "gated/fleet"


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def staff_keys(hmac_path: Path) -> setstaff.SetKeys:
    """The fleet's keys at ``hmac_path`` (made where missing), as staff hold them."""
    key = sitekey.ensure_key(hmac_path, "fleet key")
    signer, _ = signing.make_keys(hmac_path)
    return setstaff.SetKeys("fleet", FLEET, key, signer,
                            signing.Trust(signing.public_path(hmac_path)),
                            signing.private_path(hmac_path).with_suffix(".serial"))


def entries(key: bytes, count: int, salt: int) -> list[Entry]:
    return [Entry(sitekey.digest(key, f"{salt}{n:08d}"), SetPolicy(gates=("barrier",)),
                  f"Code {n}", f"c{n}") for n in range(count)]


async def publish(port: int, key: setstaff.SetKeys,
                  codes: list[Entry]) -> tuple[float, codeset.Manifest]:
    started = time.perf_counter()
    async with connect(MqttConfig(host="127.0.0.1", port=port), "bench-staff") as client:
        manifest, _ = await setstaff.replace_all(client, key, "gated/bench/sync", codes)
    return time.perf_counter() - started, manifest


async def publish_when_told(port: int, key: setstaff.SetKeys, count: int) -> None:
    """Compile a changed set, say ``ready``, publish it on a line from stdin: the
    compiling (staff's CPU) stays out of the time the calls are measured in."""
    settings = MqttConfig(host="127.0.0.1", port=port)
    async with connect(settings, "bench-staff-2") as client:
        broker = await setstaff.read(client, key, "gated/bench/sync")
        chunks, manifest = setstaff.compile_set(entries(key.hmac, count, 2), broker, key)
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        await setstaff.send_set(client, key, chunks, manifest, broker, broker.deltas)


async def retained_count(port: int) -> int:
    async with connect(MqttConfig(host="127.0.0.1", port=port), "bench-count") as client:
        found, complete = await read_retained(
            client, ["gated/test/codes/+/error", "gated/test/codes/+", f"{FLEET}/set/+",
                     f"{FLEET}/set", f"{FLEET}/codes/+/error/test", f"{FLEET}/codes/+",
                     "gated/test/routes/+", f"{FLEET}/routes/+"],
            marker_topic="gated/bench/count", within=30)
    assert complete
    return len(found)


def site(folder: Path, broker: Mosquitto, *, fleet: bool,
         quiet: bool = False) -> tuple[Path, int]:
    """``quiet``: log warnings only (one info line per code applied would be the cost
    measured, through a pipe)."""
    port = free_port()
    folder.mkdir(parents=True)
    extra = (f'\n[mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\nconnect_spread = 0\n'
             + (f'fleet_prefix = "{FLEET}"\n' if fleet else "") + "discovery = false\n")
    config = write_config(folder, extra)
    text = config.read_text().replace("127.0.0.1:0", f"127.0.0.1:{port}")
    if quiet:
        text = text.replace("\n[log]\n", '\n[log]\nlevel = "warning"\n')
    config.write_text(text)
    return config, port


async def call(session: aiohttp.ClientSession, port: int, code: str) -> tuple[str, float]:
    started = time.perf_counter()
    async with session.get(f"http://127.0.0.1:{port}/voipgrid", params={
            "token": TOKEN, "code": code, "did": BARRIER, "caller": "+31612345678"}) as r:
        text = await r.text()
    return text, time.perf_counter() - started


async def first_ack(port: int, code: str, within: float = 60.0) -> float:
    """Seconds until ``code`` is answered ACK (polled every 10 ms)."""
    started = time.monotonic()
    async with aiohttp.ClientSession() as session:
        while time.monotonic() - started < within:
            try:
                text, _ = await call(session, port, code)
                if text == "status=ACK":
                    return time.monotonic() - started
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.01)
    raise RuntimeError(f"no ACK within {within}s")


async def steady_rss(process: DaemonProcess, port: int, code: str) -> int:
    async with aiohttp.ClientSession() as session:
        for _ in range(200):
            await call(session, port, code)
    await asyncio.sleep(1)
    return rss_kib(process.proc.pid)


async def under_calls(port: int, rate: float, seconds: float, code: str,
                      change: asyncio.Event) -> tuple[list[float], list[float]]:
    """Calls at ``rate`` a second; answer times before and after ``change`` is set."""
    before: list[float] = []
    after: list[float] = []
    async with aiohttp.ClientSession() as session:
        async def one() -> None:
            into = after if change.is_set() else before
            _, took = await call(session, port, code)
            into.append(took)

        tasks = []
        started = time.monotonic()
        n = 0
        while time.monotonic() - started < seconds:
            tasks.append(asyncio.create_task(one()))
            n += 1
            await asyncio.sleep(max(0.0, started + n / rate - time.monotonic()))
        await asyncio.gather(*tasks)
    return before, after


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))]


def kept_codes(store: Path) -> int:
    """Codes in a site's local copy (it keeps each as it applies it)."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{store}?mode=ro", uri=True)) as conn:
            return int(conn.execute("SELECT count(*) FROM managed_codes").fetchone()[0])
    except sqlite3.Error:
        return 0


async def per_code(work: Path, count: int, floor_rss: int, empty_rss: int) -> None:
    """The codes as one retained message each, digits in clear (the way before sets)."""
    broker = Mosquitto(work / "per-code-broker", listener=f"max_queued_messages {count * 2}\n")
    broker.start()
    try:
        started = time.perf_counter()
        await asyncio.to_thread(publish_retained, broker.port, (
            (f"{FLEET}/codes/c{n}", json.dumps({"code": f"3{n:08d}", "gates": ["barrier"]})
             .encode()) for n in range(count)))
        print(f"per code: publish {count:,} retained messages: "
              f"{time.perf_counter() - started:.2f} s")
        print(f"per code: messages per connect: {await retained_count(broker.port)}")
        config, port = site(work / "per-code-site", broker, fleet=True, quiet=True)
        store = work / "per-code-site" / "state" / "entries.sqlite3"
        last = f"3{count - 1:08d}"
        started = time.monotonic()
        process = DaemonProcess(config)
        held, peak = 0, 0
        while time.monotonic() - started < 240 and held < count:
            await asyncio.sleep(1)
            held = kept_codes(store)
            peak = max(peak, rss_kib(process.proc.pid))
        took = time.monotonic() - started
        print(f"per code: fresh site, {held:,} of {count:,} codes applied after {took:.0f} s "
              f"({held / took:.0f} a second); peak RSS meanwhile {peak / 1024:.0f} MiB")
        process.stop()
        if held == count:
            started = time.monotonic()
            process = DaemonProcess(config)
            await first_ack(port, last, within=120)
            print(f"per code: restart to the last code's ACK: "
                  f"{time.monotonic() - started:.2f} s")
            rss = await steady_rss(process, port, last)
            process.stop()
            print(f"per code: steady RSS after a restart: {rss / 1024:.1f} MiB = "
                  f"{rss / floor_rss:.2f}x the floor; {(rss - empty_rss) * 1024 / count:.0f} "
                  "bytes a code above the site with no fleet")
    finally:
        broker.stop()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--codes", type=int, default=50_000)
    parser.add_argument("--calls-per-second", type=float, default=100.0)
    parser.add_argument("--per-code", action="store_true",
                        help="also measure one retained message per code, as before sets")
    parser.add_argument("--publish", nargs=2, metavar=("PORT", "KEY"),
                        help=argparse.SUPPRESS)  # the changed set, from another process
    args = parser.parse_args()
    if args.publish:
        await publish_when_told(int(args.publish[0]), staff_keys(Path(args.publish[1])),
                                args.codes)
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        broker = Mosquitto(work / "broker")
        broker.start()
        floor_port = free_port()
        floor = subprocess.Popen([sys.executable, str(ROOT / "tests/bench/floor.py"), "--port",  # noqa: ASYNC220
                                  str(floor_port)])
        try:
            config, port = site(work / "site", broker, fleet=True)
            key_path = work / "site" / "state" / "fleet.key"
            key = staff_keys(key_path)
            took, manifest = await publish(broker.port, key, entries(key.hmac, args.codes, 1))
            print(f"publish {args.codes:,} codes: {took:.2f} s; {manifest.chunks} chunks, "
                  f"{manifest.size / 1e6:.1f} MB ({manifest.size / args.codes:.0f} bytes a code)")
            print(f"messages per connect (retained, all the site's code filters): "
                  f"{await retained_count(broker.port)}")

            code = "100000042"
            started = time.monotonic()
            process = DaemonProcess(config)
            await asyncio.to_thread(process.wait_for, "mqtt connected", 30)
            connected = time.monotonic()
            await first_ack(port, code)
            print(f"fresh site, whole set applied and a fleet code ACK: "
                  f"{time.monotonic() - started:.2f} s from start, "
                  f"{time.monotonic() - connected:.2f} s from connecting")
            site_rss = await steady_rss(process, port, code)
            process.stop()

            restarts = []
            for _ in range(3):
                started = time.monotonic()
                process = DaemonProcess(config)
                await first_ack(port, code)
                restarts.append(time.monotonic() - started)
                await asyncio.to_thread(process.wait_for, "fleet code set loaded from the "
                                        "local copy", 5)
                if len(restarts) < 3:
                    process.stop()
            restarted_rss = await steady_rss(process, port, code)
            print(f"restart to the first fleet-code ACK: "
                  f"{', '.join(f'{r:.2f}' for r in restarts)} s "
                  f"(median {statistics.median(restarts):.2f} s)")

            change = asyncio.Event()

            publisher = await asyncio.create_subprocess_exec(
                sys.executable, __file__, "--publish", str(broker.port), str(key_path),
                "--codes", str(args.codes), stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE)
            assert publisher.stdin is not None and publisher.stdout is not None
            assert (await publisher.stdout.readline()).strip() == b"ready"

            async def publish_changed() -> float:
                # From another process, as staff would, compiled before the calls
                # start: only sending it and gated taking it in are measured.
                await asyncio.sleep(5)
                change.set()
                started = time.monotonic()
                assert publisher.stdin is not None
                publisher.stdin.write(b"go\n")
                await publisher.wait()
                return time.monotonic() - started

            calls, published = await asyncio.gather(
                under_calls(port, args.calls_per_second, 12, "200000042", change),
                publish_changed())
            before, after = calls
            await asyncio.to_thread(process.wait_for, "fleet code set applied", 30)
            print(f"a changed set under {args.calls_per_second:.0f} calls/s: quiet p99 "
                  f"{pct(before, 99) * 1000:.1f} ms (worst {max(before) * 1000:.1f} ms), "
                  f"while it was sent and applied p99 {pct(after, 99) * 1000:.1f} ms, worst "
                  f"{max(after) * 1000:.1f} ms ({len(after)} calls; publishing took "
                  f"{published:.2f} s)")
            process.stop()

            empty_config, empty_port = site(work / "empty", broker, fleet=False)
            process = DaemonProcess(empty_config)
            await asyncio.to_thread(process.wait_for, "listening", 30)
            empty_rss = await steady_rss(process, empty_port, "12345678")
            process.stop()
            async with aiohttp.ClientSession() as session:
                for _ in range(200):
                    async with session.get(f"http://127.0.0.1:{floor_port}/voipgrid") as r:
                        await r.text()
            await asyncio.sleep(1)
            floor_rss = rss_kib(floor.pid)
            for what, rss in (("fresh site, after taking the set in", site_rss),
                              ("restarted site", restarted_rss)):
                print(f"steady RSS, {what}, {args.codes:,} fleet codes: {rss / 1024:.1f} MiB "
                      f"= {rss / floor_rss:.2f}x the floor ({floor_rss / 1024:.1f} MiB); "
                      f"{(rss - empty_rss) * 1024 / args.codes:.0f} bytes a fleet code above "
                      f"the same site with no fleet ({empty_rss / 1024:.1f} MiB)")
            if args.per_code:
                await per_code(work, args.codes, floor_rss, empty_rss)
        finally:
            floor.terminate()
            floor.wait()
            broker.stop()


if __name__ == "__main__":
    asyncio.run(main())
