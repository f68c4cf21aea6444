"""Where a call's time goes under load: the event loop's CPU per call, by part.

    .venv/bin/pip install py-spy       # once: a sampling profiler, not gated's
    .venv/bin/python tests/bench/breakdown.py [--against DIR ...] [--seconds S]

For the floor (``floor.py``), this checkout and each ``--against`` tree (a
folder holding a ``gated`` package, e.g. ``git archive <commit> gated | tar -x
-C DIR``): gated on the bench's large site (100,000 codes, 10,000 TOTP users,
1,000 callers), wrk at 32 connections as ``./dev bench`` drives it, and py-spy
sampling the daemon meanwhile. Each sample of the event loop's thread goes to
one part of the call: that of its innermost frame in gated (the gated code the
work is done for), else that of its innermost library frame (aiohttp's own
work, the loop's). The loop's CPU per answered call, read from /proc over the
same seconds, is shared out by those counts. Trees run alternately,
``--rounds`` times, so they share the machine's noise; the counts of all
rounds are summed.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench
import sitegen

# (part, path fragments of a frame's file), the first that matches names it.
GATED_PARTS = (
    ("the store, loop side (batch, statements, hand-over)", ("gated/site/store.py",)),
    ("the entry's log line", ("gated/site/logs.py",)),
    ("the call's deadline", ("gated/core/deadline.py",)),
    ("numbers, decide, ledger", ("gated/core/", "gated/book/")),
    ("the relay", ("gated/actuators/",)),
    ("the call: parse, entry, answer", ("gated/site/gatekeeper.py",)),
    ("the handler: query, RawCall, response, TCP_INFO, sockets",
     ("gated/pbx/", "gated/site/sockets.py")),
)
LIBRARY_PARTS = (
    ("the entry's log line", ("structlog/", "msgspec")),
    ("numbers, decide, ledger", ("phonenumbers/",)),
    ("the store, loop side (batch, statements, hand-over)", ("sqlite3",)),
    ("aiohttp: read, parse, respond, send", ("aiohttp/", "multidict/", "yarl/")),
    ("the loop: select, callbacks, tasks", ("asyncio/", "selectors.py")),
)


def part_of(frames: list[str]) -> str:
    """The part one sample (outermost frame first) is spent on."""
    for table in (GATED_PARTS, LIBRARY_PARTS):
        for frame in reversed(frames):
            for part, fragments in table:
                if any(fragment in frame for fragment in fragments):
                    return part
    return "other"


def sample_counts(raw: Path) -> collections.Counter[str]:
    """py-spy's raw (collapsed) stacks: the loop thread's samples, by part."""
    counts: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, number = line.rpartition(" ")
        frames = stack.split(";")
        if "MainThread" not in frames[0]:
            continue  # the store's, the relays', the checkpoints' threads
        counts[part_of(frames[1:])] += int(number)
    return counts


def one_round(tree: Path | None, site: sitegen.Site, port: int, seconds: float, pyspy: str,
              work: Path) -> tuple[collections.Counter[str], float, float, float]:
    """(samples by part, loop CPU us per call, all threads' CPU us per call, calls/s);
    ``tree`` None: the floor."""
    folder = site.config.parent
    shutil.rmtree(folder / "state", ignore_errors=True)
    argv = (["env", f"PYTHONPATH={tree}", bench.PYTHON, "-m", "gated", "-c", str(site.config),
             "run"] if tree is not None
            else [bench.PYTHON, str(bench.HERE / "floor.py"), "--port", str(port)])
    server = bench.Server("gated" if tree is not None else "floor", argv, port, folder,
                          folder / "gated.log")
    raw = work / "samples.txt"
    server.start()
    try:
        bench.wrk(port, "calls", 2, connections=32, calls=site.calls)  # warm up
        before = bench.cpu_seconds(server.pid)
        spy = subprocess.Popen(
            [pyspy, "record", "--format", "raw", "--nonblocking", "--threads", "--rate", "500",
             "--duration", str(round(seconds)), "--output", str(raw), "--pid", str(server.pid)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        result = bench.wrk(port, "calls", seconds, connections=32, calls=site.calls)
        after = bench.cpu_seconds(server.pid)
        spy.wait(60)
    finally:
        server.stop()
    calls = max(result["requests"], 1)
    return (sample_counts(raw), (after[1] - before[1]) / calls * 1e6,
            (after[0] - before[0]) / calls * 1e6, result["rps"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", type=Path, action="append", default=[])
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    pyspy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which(
        "py-spy")
    if pyspy is None:
        raise SystemExit("breakdown: needs py-spy (.venv/bin/pip install py-spy)")
    trees: list[Path | None] = [None, bench.ROOT, *args.against]  # None: the floor
    with tempfile.TemporaryDirectory(prefix="gated-breakdown-") as folder:
        work = Path(folder)
        port = bench.free_port()
        site = sitegen.generate(work / "site", codes=100_000, totp=10_000, callers=1_000,
                                port=port)
        counts = {tree: collections.Counter[str]() for tree in trees}
        loop_us: dict[Path | None, list[float]] = {tree: [] for tree in trees}
        all_us: dict[Path | None, list[float]] = {tree: [] for tree in trees}
        rps: dict[Path | None, list[float]] = {tree: [] for tree in trees}
        for _ in range(args.rounds):
            for tree in trees:
                samples, loop, every, rate = one_round(tree, site, port, args.seconds, pyspy,
                                                       work)
                counts[tree].update(samples)
                loop_us[tree].append(loop)
                all_us[tree].append(every)
                rps[tree].append(rate)
                time.sleep(0.5)
    parts = [part for part, _ in GATED_PARTS] + [
        part for part, _ in LIBRARY_PARTS if part not in dict(GATED_PARTS)] + ["other"]
    names = ["the floor" if tree is None else str(tree) for tree in trees]
    print("us of the loop's CPU per answered call, by part (share of its samples)")
    print("| part | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(trees))
    for part in dict.fromkeys(parts):
        cells = []
        for tree in trees:
            total = sum(counts[tree].values()) or 1
            share = counts[tree][part] / total
            cells.append(f"{share * statistics.median(loop_us[tree]):.1f} ({share:.0%})")
        print(f"| {part} | " + " | ".join(cells) + " |")
    print("| **the loop's thread, per call** | " + " | ".join(
        f"{statistics.median(loop_us[tree]):.1f}" for tree in trees) + " |")
    print("| **every thread, per call** | " + " | ".join(
        f"{statistics.median(all_us[tree]):.1f}" for tree in trees) + " |")
    floor = statistics.median(rps[None])
    print("| **calls/s (x the floor's)** | " + " | ".join(
        f"{statistics.median(rps[tree]):.0f} ({statistics.median(rps[tree]) / floor:.2f}x)"
        for tree in trees) + " |")


if __name__ == "__main__":
    main()
