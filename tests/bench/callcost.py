"""CPU per call, in-process: what one valid call costs gated itself, no HTTP.

    .venv/bin/python tests/bench/callcost.py [--calls N] [--repeats R] [--concurrency C]
                                             [--against DIR ...]

Each run builds a real Gatekeeper: the site's code book, a relay on gpiozero's
MockFactory pins, a real Store (SQLite, WAL) in a temporary folder with its
writer running, and the log configured as the daemon configures it under
systemd (JSON lines, here to /dev/null). It makes N calls with a valid code,
C at a time (32 by default, as many as the wrk load keeps busy; one at a time,
each call waits for a commit of its own), and reports the CPU time per call:
time.process_time over the calls, which counts every thread (the store's
writer too), and apart from it the event loop's thread alone
(time.thread_time: the thread every answer waits for).

Every repeat runs in a fresh process, once for this checkout and once for each
``--against`` tree (a folder holding a ``gated`` package, e.g. an older commit
exported with ``git archive <commit> | tar -x -C DIR``), alternating, so trees
are compared in one run under the same machine noise; medians are reported.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CHECKOUT = HERE.parent.parent

SITE = """
[site]
id = "bench"
timezone = "Europe/Amsterdam"
region = "NL"

[server]
tokens = ["bench-token-0123456789"]
answer_deadline = 3.0

[gates.barrier]
numbers = ["+31501234567"]
actuator = {{ type = "mock", pin = 17, pulse = 1.0 }}

[[codes]]
name = "Demo"
code = "471123"
gates = ["barrier"]
callername = "Welcome"
destination = "201"

[log]
path = "{store}"
"""


async def measure(calls: int, concurrency: int) -> dict[str, float | str]:
    """One tree, one process: CPU and wall time per call over ``calls`` valid calls."""
    from gpiozero.pins.mock import MockFactory

    import gated
    from gated.actuators import build
    from gated.core.clock import SystemClock
    from gated.core.decide import Ledger
    from gated.core.lockout import Policy
    from gated.site import logs
    from gated.site.gatekeeper import Gatekeeper, RawCall
    from gated.site.store import Store

    logs.configure("json", "info")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "gated.toml"
        path.write_text(SITE.format(store=Path(folder) / "entries.sqlite3"))
        try:
            from gated.book.compiler import load
        except ImportError:  # a tree from before the compiled code book
            from gated.book.config import load
        loaded = load(path)
        factory = MockFactory()
        actuators = {name: build(name, gate.actuator, mock_factory=factory)
                     for name, gate in loaded.config.gates.items()}
        store = Store.open(loaded.store_path)
        clock = SystemClock()
        gatekeeper = Gatekeeper(loaded.book, Ledger.fresh(Policy()), actuators, store, clock,
                                deadline=loaded.config.server.answer_deadline)
        writer = asyncio.create_task(store.run())

        async def one() -> None:
            # As the webhook makes it: a RawCall per request, received now.
            answer = await gatekeeper.call(RawCall(
                code="471123", did="+31501234567", callerid="+31612345678",
                received=clock.monotonic()))
            if answer.status.value != "ACK":
                raise SystemExit(f"bench call answered {answer.status.value} {answer.reason}")

        async def rounds(count: int) -> None:
            for _ in range(count // concurrency):
                if concurrency == 1:
                    await one()
                else:
                    await asyncio.gather(*(one() for _ in range(concurrency)))

        await rounds(max(200, concurrency))  # warm up: caches, first-use paths
        done = (calls // concurrency) * concurrency
        cpu, loop, wall = time.process_time(), time.thread_time(), time.perf_counter()
        await rounds(done)
        cpu, loop = time.process_time() - cpu, time.thread_time() - loop
        wall = time.perf_counter() - wall
        await store.flush()
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer
        await gatekeeper.close()
        store.close()
    return {"cpu_us": cpu / done * 1e6, "loop_us": loop / done * 1e6,
            "wall_us": wall / done * 1e6,
            "gated": str(Path(gated.__file__).parent.parent)}


def child(tree: Path, calls: int, concurrency: int) -> dict[str, float | str]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run(
        [sys.executable, __file__, "--child", "--calls", str(calls),
         "--concurrency", str(concurrency)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"callcost: the run on {tree} failed:\n{done.stderr}")
    result: dict[str, float | str] = json.loads(done.stderr.strip().splitlines()[-1])
    if Path(str(result["gated"])).resolve() != tree.resolve():
        raise SystemExit(f"callcost: {tree} ran gated from {result['gated']}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--against", type=Path, action="append", default=[])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = asyncio.run(measure(args.calls, args.concurrency))
        print(json.dumps(result), file=sys.stderr)
        return
    trees = [CHECKOUT, *args.against]
    runs: dict[Path, list[dict[str, float | str]]] = {tree: [] for tree in trees}
    for _ in range(args.repeats):
        for tree in trees:
            runs[tree].append(child(tree, args.calls, args.concurrency))
    print(f"{args.calls} valid calls, {args.concurrency} at a time, median of "
          f"{args.repeats} runs; us per call: CPU of every thread, of the loop's thread, wall")
    for tree in trees:
        cpu, loop, wall = (statistics.median(float(r[key]) for r in runs[tree])
                           for key in ("cpu_us", "loop_us", "wall_us"))
        spread = " ".join(f"{float(r['cpu_us']):.1f}/{float(r['loop_us']):.1f}"
                          for r in runs[tree])
        print(f"{cpu:8.1f} {loop:8.1f} {wall:8.1f}  {tree}\n          runs: {spread}")


if __name__ == "__main__":
    main()
