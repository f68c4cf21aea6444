"""100,000 site codes through `gated codes import`, as a new user does it:

    .venv/bin/python tests/bench/siteimport.py [--codes 100000]

A real Mosquitto with its default settings (``max_queued_messages 1000``) and
the real daemon (a subprocess, the example's mock pins). Reported: how long
the command takes until the site says it holds the set (the site's word on
``<prefix>/codeset``), the retained messages a connect costs, the daemon's
RSS before and after, and, after a restart, how many codes the site holds.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))

from gated.book.config import MqttConfig  # noqa: E402
from gated.mqtt.link import connect, read_retained  # noqa: E402
from tests.bench.fleet import first_ack, rss_kib, site  # noqa: E402
from tests.broker import Mosquitto  # noqa: E402
from tests.process import DaemonProcess  # noqa: E402


async def retained(port: int) -> int:
    async with connect(MqttConfig(host="127.0.0.1", port=port), "bench-count") as client:
        found, complete = await read_retained(
            client, ["gated/test/set", "gated/test/set/+", "gated/test/codes/+"],
            marker_topic="gated/bench/count", within=30)
    assert complete
    return len(found)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--codes", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        broker = Mosquitto(work / "broker")
        broker.start()
        try:
            config, port = site(work / "site", broker, fleet=False)
            csv = work / "codes.csv"
            csv.write_text("name,code,gates\n" + "".join(
                f"Code {n},{n:08d},barrier\n" for n in range(args.codes)))
            process = DaemonProcess(config)
            process.wait_for("listening")
            rss_before = rss_kib(process.proc.pid)
            started = time.monotonic()
            out = (await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "gated", "-c", str(config), "codes", "import",
                 str(csv), "--wait", "120"], capture_output=True, text=True, check=True)).stdout
            took = time.monotonic() - started
            print(out.strip())
            print(f"import of {args.codes:,} codes until the site's word: {took:.1f} s")
            last = f"{args.codes - 1:08d}"
            print(f"first ACK of the last code after the command: "
                  f"{await first_ack(port, last):.3f} s")
            print(f"retained messages a connect gets: {await retained(broker.port)}")
            print(f"daemon RSS: {rss_before / 1024:.1f} MB before, "
                  f"{rss_kib(process.proc.pid) / 1024:.1f} MB after")
            process.stop()
            process = DaemonProcess(config)
            started = time.monotonic()
            process.wait_for("listening")
            print(f"restart to the last code's ACK: {await first_ack(port, last):.2f} s; "
                  f"RSS {rss_kib(process.proc.pid) / 1024:.1f} MB")
            process.stop()
        finally:
            broker.stop()


if __name__ == "__main__":
    asyncio.run(main())
