"""Forward delivery latency, and the PBX answer's latency beside a hanging endpoint.

    .venv/bin/python tests/bench/forward.py [--calls 200] [--outage 20]

The real daemon (a subprocess, production backoff) forwards to a real aiohttp
receiver in this process. Reported, in milliseconds, p50/p99:

- delivery: from a call's answer to its forward arriving, endpoint up;
- after an outage: calls made while the endpoint is down for --outage
  seconds, then from the endpoint coming back to each forward arriving;
- answer latency with no [[forward]], and with an endpoint that hangs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))

from tests.forwarding import Receiver, forward_table  # noqa: E402
from tests.helpers import BARRIER, TOKEN, write_config  # noqa: E402
from tests.process import DaemonProcess, free_port  # noqa: E402


def spread(values: list[float]) -> str:
    ordered = sorted(v * 1000 for v in values)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return f"p50 {statistics.median(ordered):.1f} ms, p99 {p99:.1f} ms (n={len(ordered)})"


async def calls(url: str, count: int, tag: str, gap: float = 0.0) -> dict[str, float]:
    """``count`` calls one after another; each caller's number -> when it was answered."""
    answered: dict[str, float] = {}
    async with aiohttp.ClientSession() as session:
        for index in range(count):
            caller = f"+3161{tag}{index:05d}"
            params = {"token": TOKEN, "code": "5555", "did": BARRIER, "callerid": caller}
            async with session.get(url, params=params) as response:
                assert (await response.text()).startswith("status=ACK")
            answered[caller] = time.monotonic()
            await asyncio.sleep(gap)
    return answered


async def answer_times(url: str, count: int) -> list[float]:
    took = []
    async with aiohttp.ClientSession() as session:
        for index in range(count):
            params = {"token": TOKEN, "code": "5555", "did": BARRIER,
                      "callerid": f"+316130{index:05d}"}
            started = time.monotonic()
            async with session.get(url, params=params) as response:
                await response.read()
            took.append(time.monotonic() - started)
    return took


def arrivals(receiver: Receiver) -> dict[str, float]:
    return {json.loads(r.body)["caller"]: r.at for r in receiver.requests}


async def daemon(folder: Path, extra: str) -> tuple[DaemonProcess, str]:
    port = free_port()
    folder.mkdir()  # noqa: ASYNC240 (a benchmark, before anything runs)
    config = write_config(folder, extra)
    config.write_text(config.read_text().replace("127.0.0.1:0", f"127.0.0.1:{port}"))
    process = DaemonProcess(config)
    await asyncio.to_thread(process.wait_for, "listening")
    return process, f"http://127.0.0.1:{port}/voipgrid"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--outage", type=float, default=20.0)
    parser.add_argument("--gap", type=float, default=0.05,
                        help="seconds between calls while the endpoint is up")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        receiver = await Receiver().start()
        process, url = await daemon(folder / "up", forward_table(receiver.url, caller="number"))
        try:
            answered = await calls(url, args.calls, "1", args.gap)
            await receiver.wait_for(args.calls, within=60)
            got = arrivals(receiver)
            print(f"delivery, endpoint up, a call every {args.gap * 1000:.0f} ms: "
                  f"{spread([got[c] - t for c, t in answered.items()])}")

            await receiver.stop()
            receiver.requests.clear()
            answered = await calls(url, args.calls, "2")
            await asyncio.sleep(args.outage)
            await receiver.start()
            back = time.monotonic()
            await receiver.wait_for(args.calls, within=300)
            got = arrivals(receiver)
            print(f"after a {args.outage:.0f} s outage ({args.calls} calls queued), "
                  "from the endpoint's return: "
                  f"{spread([got[c] - back for c in answered])}")
        finally:
            process.stop()
            await receiver.stop()

        process, url = await daemon(folder / "none", "")
        try:
            print(f"answer, no [[forward]]:      {spread(await answer_times(url, args.calls))}")
        finally:
            process.stop()
        hanging = Receiver(hang=True)
        await hanging.start()
        process, url = await daemon(folder / "hang", forward_table(
            hanging.url, caller="number", extra="timeout = 60.0"))
        try:
            print(f"answer, endpoint hanging:    {spread(await answer_times(url, args.calls))}")
        finally:
            process.stop()
            await hanging.stop()


if __name__ == "__main__":
    asyncio.run(main())
