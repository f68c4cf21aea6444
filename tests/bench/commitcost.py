"""What one durable entry costs when calls come one at a time: the store's round trip.

    .venv/bin/python tests/bench/commitcost.py [--entries N] [--gap SECONDS]

A real Store (SQLite, WAL, synchronous=FULL) in a temporary folder, its writer
running, entries submitted one at a time ``--gap`` apart, as calls at a steady
rate arrive. For each entry: the time from ``submit`` until the store's thread
starts the commit (the hand-over), the commit itself (its fsync), and from the
commit's end until the caller's future is done (the hand-back); percentiles of
each. At a steady rate a call's answer waits for all three, and a call whose
use must be durable before the gate opens waits for them twice.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gated.site import logs
from gated.site.store import Entry, Store


def percentiles(name: str, values: list[float]) -> str:
    ordered = sorted(values)
    pick = [ordered[min(int(len(ordered) * q), len(ordered) - 1)] * 1000
            for q in (0.5, 0.9, 0.99)]
    return (f"{name:22s} p50 {pick[0]:6.3f}  p90 {pick[1]:6.3f}  p99 {pick[2]:6.3f}  "
            f"max {ordered[-1] * 1000:7.3f} ms")


async def measure(entries: int, gap: float) -> list[str]:
    logs.configure("json", "info")
    with tempfile.TemporaryDirectory(prefix="gated-commitcost-") as folder:
        store = Store.open(Path(folder) / "entries.sqlite3")
        writer = asyncio.create_task(store.run())
        commits: list[tuple[float, float]] = []
        write = store._write

        def timed(batch: Sequence[Any]) -> set[str]:
            started = time.perf_counter()
            forwarded = write(batch)
            commits.append((started, time.perf_counter()))
            return forwarded

        store._write = timed  # type: ignore[method-assign]
        handover, commit, handback, total = [], [], [], []
        for n in range(entries):
            entry = Entry(time=time.time(), gate="barrier", caller="+31612345678",
                          did="+31501234567", status="ACK", reason="granted_code",
                          credential="Demo")
            submitted = time.perf_counter()
            await store.submit(entry, None, None)
            done = time.perf_counter()
            started, ended = commits[-1]
            if n >= entries // 10:  # the first tenth warms up
                handover.append(started - submitted)
                commit.append(ended - started)
                handback.append(done - ended)
                total.append(done - submitted)
            await asyncio.sleep(gap)
        writer.cancel()
        store.close()
    return [percentiles("to the store's thread", handover),
            percentiles("the commit (fsync)", commit),
            percentiles("back to the call", handback),
            percentiles("durable, in all", total)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=2000)
    parser.add_argument("--gap", type=float, default=0.001)
    args = parser.parse_args()
    # Each entry's log line goes where the daemon's would; here, nowhere.
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        lines = asyncio.run(measure(args.entries, args.gap))
    print(f"{args.entries} entries, one at a time, {args.gap * 1000:g} ms apart:")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
