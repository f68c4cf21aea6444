"""gated against the aiohttp floor, side by side on one machine.

    ./dev bench            # the full run, a few minutes; updates docs/benchmark.md
    ./dev bench --quick    # under a minute, a smoke test of the numbers

What runs, all on 127.0.0.1 and each in its own process:

- the floor: a bare aiohttp app answering a constant ``status=ACK``;
- gated on a synthetic site of 100,000 static codes, 10,000 TOTP users and
  1,000 caller numbers (lockout on, durable entry log, mock relays);
- gated on a site with 10 codes, to show the code count does not matter;
- gated routing calls without a code by a CSV of 100,000 rows, and of 10.

One load generator (wrk, with calls.lua varying the codes and callers) drives
each in turn, with the same concurrency, in alternating rounds; medians are
reported. Then two floods against the large site: junk without the token while
a legitimate caller calls once a second, and guesses with the token, which lock
the site, while a resident calls once a second. Each server's resident memory
is read once it has started and stood idle for a second (steady) and at the end
(its peak). Copies of the code sites are started on a fresh state folder, then
restarted on the same one, timed to the first valid call answered ACK; the
large copy then reloads its edited file under a steady load of calls. Results
go to bench-results/ as JSON and Markdown.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import gc
import http.client
import json
import os
import platform
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode

import sitegen

from gated.book import files

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
LUA = HERE / "calls.lua"
# The servers' interpreter: ``--site-python``, a virtual environment with gated's
# own dependencies only, as a site installs it (./dev bench makes one); the test
# tools would load into the daemon (structlog imports rich when it is there).
PYTHON = sys.executable
DEADLINE = 3.0  # the sites' answer_deadline
READY_TIMEOUT = 120.0


@dataclass(frozen=True)
class Plan:
    """How long and how often; ``--quick`` shrinks every part of it."""

    rounds: int
    seconds: float
    warmup: float
    starts: int
    fixed_rate: int  # requests/s of the latency-at-a-fixed-rate runs (0: skip)
    flood_seconds: float
    connections: int
    tracemalloc: bool
    reload_baseline: float  # seconds of calls before the file changes, the reload's yardstick
    # Back-to-back runs of the 100k and the 10-code site, for their ratio: the
    # rounds put other servers (and up to a minute of machine noise) between them.
    pairs: int = 6
    pair_seconds: float = 4


FULL = Plan(rounds=3, seconds=10, warmup=2, starts=2, fixed_rate=1000, flood_seconds=20,
            connections=32, tracemalloc=True, reload_baseline=8)
QUICK = Plan(rounds=2, seconds=3, warmup=1, starts=1, fixed_rate=1000, flood_seconds=6,
             connections=32, tracemalloc=False, reload_baseline=3, pairs=2, pair_seconds=2)
# Calls a second during the reload, each on a new connection as the PBX makes
# them: far above a gate's real rate, low enough that the reload, not the
# load, is what the latencies show.
RELOAD_RATE = 100
SETTLE = 1.0  # idle seconds after start before the steady RSS is read


# --- processes ----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def proc_status(pid: int, key: str) -> int:
    """A ``/proc/<pid>/status`` figure in bytes (VmHWM, VmRSS)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


_TICK = os.sysconf("SC_CLK_TCK")


def _cpu_of(stat: str) -> float:
    """utime + stime, in seconds, of a /proc/.../stat line."""
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def cpu_seconds(pid: int) -> tuple[float, float]:
    """CPU time a process has used, all its threads (those ended too), and its main
    thread's alone: for gated, the event loop's, the thread every answer waits for."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        total = _cpu_of(stat.read())
    with open(f"/proc/{pid}/task/{pid}/stat", encoding="ascii") as stat:
        loop = _cpu_of(stat.read())
    return total, loop


def answers(port: int, path: str = "/voipgrid") -> bool:
    """True once anything answers HTTP on ``port`` (a 403 counts: it is up)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1.0)
    try:
        conn.request("GET", path)
        conn.getresponse().read()
        return True
    except OSError:
        return False
    finally:
        conn.close()


@dataclass
class Server:
    name: str
    argv: list[str]
    port: int
    cwd: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    ready_s: float = 0.0

    def spawn(self) -> float:
        """Exec the server; the perf_counter just before."""
        with self.log.open("ab") as out:
            started = time.perf_counter()
            self.proc = subprocess.Popen(self.argv, cwd=self.cwd, stdout=out,
                                         stderr=subprocess.STDOUT)
        return started

    def start(self) -> float:
        """Start and wait until the port answers; the start-to-ready seconds."""
        started = self.spawn()
        assert self.proc is not None
        limit = started + READY_TIMEOUT
        while not answers(self.port):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}); see {self.log}")
            if time.perf_counter() > limit:
                raise RuntimeError(f"{self.name} not ready after {READY_TIMEOUT:.0f} s")
            time.sleep(0.005)
        self.ready_s = time.perf_counter() - started
        return self.ready_s

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def peak_rss(self) -> int:
        return proc_status(self.pid, "VmHWM")

    def memory(self) -> dict[str, int]:
        """Resident memory now (all, anonymous, file-backed) and the peak so far."""
        return {"rss": proc_status(self.pid, "VmRSS"), "anon": proc_status(self.pid, "RssAnon"),
                "file": proc_status(self.pid, "RssFile"), "hwm": self.peak_rss()}

    def stop(self) -> float:
        """SIGTERM, and wait for the exit; the seconds that took."""
        if self.proc is None or self.proc.poll() is not None:
            return 0.0
        started = time.perf_counter()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        return time.perf_counter() - started


# --- load -------------------------------------------------------------------


def wrk(port: int, mode: str, seconds: float, *, connections: int, calls: Path | None = None,
        rate: int = 0) -> dict[str, Any]:
    """One wrk run; its summary from calls.lua's done()."""
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{max(round(seconds), 1)}s", "--timeout", "5s",
            "-s", str(LUA), f"http://127.0.0.1:{port}", "--", mode,
            str(calls or "-"), sitegen.TOKEN, str(rate), str(connections)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30,
                          check=True)
    for line in done.stdout.splitlines():
        if line.startswith("BENCH "):
            result: dict[str, Any] = json.loads(line.removeprefix("BENCH "))
            result["rps"] = result["requests"] / result["seconds"]
            return result
    raise RuntimeError(f"wrk printed no summary:\n{done.stdout}\n{done.stderr}")


@dataclass
class Caller:
    """Calls once a second in a thread of its own, each time on a new connection
    (as the PBX does), and records latency and whether the answer was right."""

    port: int
    queries: Iterator[str]
    expect: str  # the status word a right answer carries
    latencies_ms: list[float] = field(default_factory=list)
    right: int = 0
    wrong: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self, count: int) -> None:
        self._thread = threading.Thread(target=self._run, args=(count,), daemon=True)
        self._thread.start()

    def _run(self, count: int) -> None:
        begin = time.perf_counter() + 0.5
        for n in range(count):
            delay = begin + n - time.perf_counter()
            if self._stop.wait(max(delay, 0)):
                return
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=DEADLINE + 2)
            started = time.perf_counter()
            try:
                conn.request("GET", "/voipgrid?" + next(self.queries))
                response = conn.getresponse()
                body = response.read().decode()
                self.latencies_ms.append((time.perf_counter() - started) * 1000)
                if response.status == 200 and parse_qs(body).get("status") == [self.expect]:
                    self.right += 1
                else:
                    self.wrong.append(f"{response.status} {body}")
            except OSError as exc:
                self.wrong.append(f"no answer: {exc}")
            finally:
                conn.close()

    def join(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(DEADLINE + 5)

    def summary(self) -> dict[str, Any]:
        calls = self.right + len(self.wrong)
        lat = sorted(self.latencies_ms)
        return {
            "calls": calls, "right": self.right, "wrong": self.wrong[:5],
            "success": self.right / calls if calls else 0.0,
            "p50_ms": percentile(lat, 50), "p99_ms": percentile(lat, 99),
            "max_ms": lat[-1] if lat else 0.0,
        }


def percentile(ordered: list[float], pct: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not ordered:
        return 0.0
    rank = max(round(pct / 100 * len(ordered) + 0.5) - 1, 0)
    return ordered[min(rank, len(ordered) - 1)]


def valid_queries(site: sitegen.Site) -> Iterator[str]:
    lines = site.calls.read_text().splitlines()
    for n in range(len(lines)):
        code, did, caller = lines[(n * 7919) % len(lines)].split()
        yield urlencode({"token": sitegen.TOKEN, "code": code, "did": did, "callerid": caller,
                         "callername": ""})


def resident_queries(site: sitegen.Site) -> Iterator[str]:
    for n in range(10_000):
        yield urlencode({"token": sitegen.TOKEN, "code": "", "did": sitegen.BARRIER,
                         "callerid": site.callers[n % len(site.callers)]})


# --- measurements without load ----------------------------------------------

LOAD_PROBE = """
import gc, json, sys, time
def status(key):
    for line in open('/proc/self/status'):
        if line.startswith(key + ':'):
            return int(line.split()[1]) * 1024
t0 = time.perf_counter()
from gated.book import compiler
t1 = time.perf_counter()
gc.collect()
before = status('VmRSS')
if sys.argv[2] == 'trace':
    import tracemalloc
    tracemalloc.start()
t2 = time.perf_counter()
loaded = compiler.load(sys.argv[1])  # parsed and compiled here, as before the book file
t3 = time.perf_counter()
gc.collect()
traced = book_only = 0
if sys.argv[2] == 'trace':
    traced = tracemalloc.get_traced_memory()[0]
    book = loaded.book
    del loaded  # what the code book holds without the parsed config kept beside it
    gc.collect()
    book_only = tracemalloc.get_traced_memory()[0]
    credentials = book.credential_count
else:
    credentials = loaded.book.credential_count
print(json.dumps({'import_s': t1 - t0, 'load_s': t3 - t2, 'rss_before': before,
                  'rss_after': status('VmRSS'), 'hwm': status('VmHWM'), 'traced': traced,
                  'book_traced': book_only, 'credentials': credentials}))
"""


def probe_load(config: Path, *, trace: bool = False) -> dict[str, Any]:
    """Import and config load time, and memory, in a fresh interpreter."""
    done = subprocess.run([PYTHON, "-c", LOAD_PROBE, str(config), "trace" if trace else "-"],
                          capture_output=True, text=True, timeout=300, check=True, cwd=ROOT)
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def fsync_ms(folder: Path, count: int = 1000) -> tuple[float, float]:
    """Median and p99 fsync of a 4 KiB append here: what one durable commit costs at
    least (a call whose use must be durable before the gate opens waits for two)."""
    path = folder / "fsync-probe"
    times = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for _ in range(count):
            os.write(fd, b"x" * 4096)
            started = time.perf_counter()
            os.fsync(fd)
            times.append((time.perf_counter() - started) * 1000)
    finally:
        os.close(fd)
        path.unlink()
    return statistics.median(times), percentile(sorted(times), 99)


def count_entries(store: Path) -> int:
    conn = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
    try:
        (count,) = conn.execute("SELECT count(*) FROM entries").fetchone()
        return int(count)
    finally:
        conn.close()


def not_durable(log: Path) -> tuple[int, int]:
    """Entry log lines, and how many of them were answered before being durable."""
    entries = late = 0
    with log.open(encoding="utf-8", errors="replace") as lines:
        for line in lines:
            if "entry" not in line:
                continue
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if event.get("event") == "entry":
                    entries += 1
                    late += event.get("durable") is not True
    return entries, late


# --- the run ----------------------------------------------------------------


def median_of(runs: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(run[key] for run in runs))


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run(plan: Plan, work: Path) -> dict[str, Any]:
    results: dict[str, Any] = {"plan": plan.__dict__, "environment": environment(work)}
    say(f"fsync here: {results['environment']['fsync_ms']:.3f} ms (median), "
        f"{results['environment']['fsync_p99_ms']:.3f} ms (p99)")

    say("generating sites")
    big_port, small_port, floor_port = free_port(), free_port(), free_port()
    big = sitegen.generate(work / "big", codes=100_000, totp=10_000, callers=1_000,
                           port=big_port)
    # The comparison: 10 vs 100,000 static codes, both beside 10,000
    # TOTP users, so the ratio shows what the number of codes costs.
    small = sitegen.generate(work / "small", codes=10, totp=10_000, callers=1_000,
                             port=small_port)
    # Memory per code is measured without TOTP users on either side.
    bare = sitegen.generate(work / "bare", codes=10, totp=0, callers=1_000, port=free_port())
    codes_only = sitegen.generate(work / "codes-only", codes=100_000, totp=0, callers=1_000,
                                  port=free_port())
    # Smart routing: a CRM export of 100,000 rows against one of 10, same calls.
    routed_port, routed_small_port = free_port(), free_port()
    routed = sitegen.generate_routes(work / "routed-100k", rows=100_000, port=routed_port)
    routed_small = sitegen.generate_routes(work / "routed-10", rows=10, port=routed_small_port)

    say("config load time and memory")
    load = results["load"] = {
        "big": probe_load(big.config), "small": probe_load(small.config),
        "bare": probe_load(bare.config), "codes_only": probe_load(codes_only.config),
    }
    if plan.tracemalloc:
        small_t, codes_t = probe_load(bare.config, trace=True), probe_load(
            codes_only.config, trace=True)
        load["traced"] = {"small": small_t, "codes_only": codes_t}
        load["bytes_per_code_traced"] = (codes_t["traced"] - small_t["traced"]) / 99_990
        load["bytes_per_code_book"] = (codes_t["book_traced"] - small_t["book_traced"]) / 99_990
    load["routed"] = probe_load(routed.config)
    load["routed_small"] = probe_load(routed_small.config)
    load["bytes_per_row_rss"] = (
        (load["routed"]["rss_after"] - load["routed"]["rss_before"])
        - (load["routed_small"]["rss_after"] - load["routed_small"]["rss_before"])) / 99_990
    if plan.tracemalloc:
        rows_t = probe_load(routed.config, trace=True)
        few_t = probe_load(routed_small.config, trace=True)
        load["bytes_per_row_book"] = (rows_t["book_traced"] - few_t["book_traced"]) / 99_990
    load["bytes_per_code_rss"] = (
        (load["codes_only"]["rss_after"] - load["codes_only"]["rss_before"])
        - (load["bare"]["rss_after"] - load["bare"]["rss_before"])) / 99_990

    def gated(site: sitegen.Site, name: str, port: int) -> Server:
        folder = site.config.parent
        return Server(name, [PYTHON, "-m", "gated", "-c", str(site.config), "run"], port,
                      folder, folder / "gated.log")

    floor = Server("floor", [PYTHON, str(HERE / "floor.py"), "--port", str(floor_port)],
                   floor_port, work, work / "floor.log")
    servers = {"floor": floor, "gated_100k": gated(big, "gated_100k", big_port),
               "gated_10": gated(small, "gated_10", small_port),
               "routed_100k": gated(routed, "routed_100k", routed_port),
               "routed_10": gated(routed_small, "routed_10", routed_small_port)}
    calls = {"floor": big.calls, "gated_100k": big.calls, "gated_10": small.calls,
             "routed_100k": routed.calls, "routed_10": routed_small.calls}

    say("start-to-ready")
    ready: dict[str, list[float]] = {name: [] for name in servers}
    for _ in range(plan.starts):
        for name, server in servers.items():
            ready[name].append(server.start())
            server.stop()
    results["ready_s"] = {name: statistics.median(times) for name, times in ready.items()}

    results["restarts"] = restarts(plan, work, servers, {"gated_10": small, "gated_100k": big})

    try:
        for server in servers.values():
            server.start()
        # Side by side: every server idle a second after the last one came up.
        time.sleep(SETTLE)
        results["steady_rss"] = {name: server.memory() for name, server in servers.items()}
        say("warm-up")
        for name, server in servers.items():
            wrk(server.port, "calls", plan.warmup, connections=plan.connections,
                calls=calls[name])
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in servers}
        order = list(servers)
        for round_ in range(plan.rounds):
            for name in order:
                before = cpu_seconds(servers[name].pid)
                result = wrk(servers[name].port, "calls", plan.seconds,
                             connections=plan.connections, calls=calls[name])
                after = cpu_seconds(servers[name].pid)
                # CPU per answered call: every thread's, and the event loop's.
                result["cpu_us"] = (after[0] - before[0]) / max(result["requests"], 1) * 1e6
                result["loop_cpu_us"] = (after[1] - before[1]) / max(result["requests"], 1) * 1e6
                runs[name].append(result)
                say(f"round {round_ + 1} {name}: {result['rps']:.0f} req/s, "
                    f"p99 {result['p99_ms']:.2f} ms")
                time.sleep(0.5)
            order = order[1:] + order[:1]  # rotate: nobody always goes first
        results["throughput"] = {name: {"runs": r, **{key: median_of(r, key) for key in (
            "rps", "p50_ms", "p99_ms", "p999_ms", "max_ms", "cpu_us", "loop_cpu_us")}}
            for name, r in runs.items()}
        say("100k against 10 codes, back to back")
        ratios = []
        for pair in range(plan.pairs):
            # Alternating which goes first, so neither always gets the fresher machine.
            names = ("gated_100k", "gated_10") if pair % 2 == 0 else ("gated_10", "gated_100k")
            rps = {name: wrk(servers[name].port, "calls", plan.pair_seconds,
                             connections=plan.connections, calls=calls[name])["rps"]
                   for name in names}
            ratios.append(rps["gated_100k"] / rps["gated_10"])
        results["size_ratio"] = {"pairs": ratios, "median": statistics.median(ratios)}
        for name in servers:
            t = results["throughput"][name]
            t["answered_wrong"] = sum(r["NAK"] + r["ERR"] + r["forbidden"] + r["other"]
                                      for r in runs[name])
            t["socket_errors"] = sum(r["errors"] for r in runs[name])

        if plan.fixed_rate:
            results["fixed_rate"] = {}
            for name in order:
                before = cpu_seconds(servers[name].pid)
                result = wrk(servers[name].port, "calls", plan.seconds, connections=16,
                             calls=calls[name], rate=plan.fixed_rate)
                after = cpu_seconds(servers[name].pid)
                result["cpu_us"] = (after[0] - before[0]) / max(result["requests"], 1) * 1e6
                result["loop_cpu_us"] = (after[1] - before[1]) / max(result["requests"], 1) * 1e6
                results["fixed_rate"][name] = result
                say(f"{plan.fixed_rate} req/s {name}: {result['rps']:.0f} req/s, "
                    f"p99 {result['p99_ms']:.2f} ms")

        results["floods"] = floods(plan, servers["gated_100k"], big)

        for name, server in servers.items():
            results.setdefault("peak_rss", {})[name] = server.peak_rss()
    finally:
        for server in servers.values():
            server.stop()

    durability: dict[str, Any] = {}
    for name in ("gated_100k", "gated_10"):
        server = servers[name]
        logged, late = not_durable(server.log)
        answered = sum(r["requests"] for r in results["throughput"][name]["runs"])
        durability[name] = {
            "stored": count_entries(server.cwd / "state" / "entries.sqlite3"),
            "logged": logged, "answered_before_durable": late,
            "measured_answers": answered,
        }
    results["durability"] = durability
    return results


def floods(plan: Plan, server: Server, site: sitegen.Site) -> dict[str, Any]:
    out: dict[str, Any] = {}
    seconds = plan.flood_seconds

    def flood_beside(script: str, legit: Iterator[str]) -> dict[str, Any]:
        """1,000 req/s of ``script`` while a legitimate caller calls once a second."""
        caller = Caller(server.port, legit, "ACK")
        caller.start(int(seconds) - 1)
        flood = wrk(server.port, script, seconds, connections=20, rate=1000)
        caller.join()
        return {"flood": flood, "legit": caller.summary()}

    say("junk flood: 1,000 req/s without the token, a legitimate call every second")
    out["junk"] = flood_beside("junk", valid_queries(site))
    say("guess flood: 1,000 req/s of wrong codes with the token, a resident every second")
    out["guess"] = flood_beside("guess", resident_queries(site))

    say("guess flood as fast as it goes (the site is locked by now)")
    out["guess_max"] = wrk(server.port, "guess", max(seconds / 3, 2),
                           connections=plan.connections)
    return out


# --- restarts and reloads -----------------------------------------------------


def answer_word(status: int, body: str) -> str:
    """The status word of a 200 answer; otherwise the HTTP status."""
    if status != 200:
        return str(status)
    return parse_qs(body).get("status", ["?"])[0]


def call_once(port: int, query: str) -> str | None:
    """One call on a new connection; its status word, or None if nothing answered."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE + 2)
    try:
        conn.request("GET", "/voipgrid?" + query)
        response = conn.getresponse()
        return answer_word(response.status, response.read().decode())
    except OSError:
        return None
    finally:
        conn.close()


def start_to_ack(server: Server, query: str) -> dict[str, Any]:
    """Exec the server and call it with a real valid call until one is answered ACK.

    The port being open is not enough: a daemon that answered before its code
    book was in place would answer wrong, and that would count against it.
    """
    started = server.spawn()
    assert server.proc is not None
    limit = started + READY_TIMEOUT
    answering: float | None = None
    wrong: list[str] = []
    # A start may build its code book in a child: its memory counts too.
    with RssSampler(server.pid) as sampler:
        while True:
            word = call_once(server.port, query)
            now = time.perf_counter()
            if word is not None:
                if answering is None:
                    answering = now - started
                if word == "ACK":
                    break
                wrong.append(word)
            if server.proc.poll() is not None:
                raise RuntimeError(f"{server.name} exited ({server.proc.returncode}); "
                                   f"see {server.log}")
            if now > limit:
                raise RuntimeError(f"{server.name} answered no ACK after "
                                   f"{READY_TIMEOUT:.0f} s ({len(wrong)} other answers)")
            time.sleep(0.005)
    server.ready_s = now - started
    return {"ack_s": now - started, "answering_s": answering, "not_ack_first": len(wrong),
            "wrong": wrong[:5], "rss": sampler.between(started, now)}


def restarts(plan: Plan, work: Path, servers: dict[str, Server],
             sites: dict[str, sitegen.Site]) -> dict[str, Any]:
    """First start on a fresh state folder, then a restart on the same one, each
    timed from the exec to the first valid call answered ACK.

    Each start runs a copy of the site's config in a folder of its own, so the
    state it makes (whatever the daemon keeps there) is this run's alone and
    the sites the other runs use stay as they were (a copy listens on its
    site's port: the site is not running meanwhile). The last large copy goes
    on to the reload under load.
    """
    out: dict[str, Any] = {}
    big = sites["gated_100k"]
    for name in ("floor", *sites):
        site = sites.get(name)
        # The floor answers any call ACK; it gets the large site's.
        query = next(valid_queries(site or big))
        runs: list[dict[str, Any]] = []
        for n in range(plan.starts):
            folder = work / f"restart-{name}-{n}"
            folder.mkdir()
            argv = servers[name].argv
            if site is not None:
                shutil.copyfile(site.config, folder / "gated.toml")
                argv = [PYTHON, "-m", "gated", "-c", str(folder / "gated.toml"), "run"]
            server = Server(name, argv, servers[name].port, folder, folder / "server.log")
            say(f"{name}: first start on a fresh state folder, then a restart ({n + 1}/"
                f"{plan.starts})")
            # The floor's steady memory is read beside the others, later.
            settle = 0.0 if site is None else SETTLE
            try:
                first = start_to_ack(server, query)
                time.sleep(settle)
                first["memory"] = server.memory()
                first["stop_s"] = server.stop()
                again = start_to_ack(server, query)
                time.sleep(settle)
                again["memory"] = server.memory()
                if site is big and n == plan.starts - 1:
                    say("reload of the 100,000-code file under "
                        f"{RELOAD_RATE} calls/s")
                    out["reload"] = reload_under_load(plan, server, big, folder / "gated.toml")
                again["stop_s"] = server.stop()
            finally:
                server.stop()
            runs.append({"first": first, "restart": again})
            say(f"{name}: first start {first['ack_s']:.2f} s, restart {again['ack_s']:.2f} s "
                "to the first ACK")
        out[name] = {
            "runs": runs,
            "first_s": statistics.median(r["first"]["ack_s"] for r in runs),
            "restart_s": statistics.median(r["restart"]["ack_s"] for r in runs),
            "stop_s": statistics.median(r["restart"]["stop_s"] for r in runs),
            "not_ack_first": sum(r[k]["not_ack_first"] for r in runs for k in ("first",
                                                                               "restart")),
            "first_peak_with_children": max(r["first"]["rss"]["peak_with_children"]
                                            for r in runs),
            "first_child_hwm": max(r["first"]["rss"]["child_hwm"] for r in runs),
        }
    return out


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children of any of its threads, and theirs)."""
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{parent}/task"):
                with contextlib.suppress(OSError), open(
                        f"/proc/{parent}/task/{tid}/children", encoding="ascii") as children:
                    for child in children.read().split():
                        found.append(int(child))
                        todo.append(int(child))
    return found


class RssSampler:
    """VmRSS of a process and of all its descendants, every ``every`` seconds, in
    a thread: a reload may build its book in a child process."""

    def __init__(self, pid: int, every: float = 0.02) -> None:
        self.pid = pid
        self.every = every
        # (perf_counter, the process's RSS, its descendants' RSS, how many
        # descendants, the largest VmHWM among them: a child's own peak, even
        # one that fell between two samples)
        self.samples: list[tuple[float, int, int, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            children = child_peak = 0
            kids = descendants(self.pid)
            for kid in kids:
                # Gone already, or a zombie without memory: nothing to count.
                with contextlib.suppress(OSError, KeyError):
                    children += proc_status(kid, "VmRSS")
                    child_peak = max(child_peak, proc_status(kid, "VmHWM"))
            with contextlib.suppress(OSError, KeyError):
                self.samples.append((time.perf_counter(), proc_status(self.pid, "VmRSS"),
                                     children, len(kids), child_peak))
            self._stop.wait(self.every)

    def between(self, start: float, end: float) -> dict[str, Any]:
        inside = [s for s in self.samples if start <= s[0] <= end]
        if not inside:
            return {"samples": 0, "peak": 0, "peak_with_children": 0, "children_max": 0,
                    "child_hwm": 0}
        return {"samples": len(inside), "peak": max(s[1] for s in inside),
                "peak_with_children": max(s[1] + s[2] for s in inside),
                "children_max": max(s[3] for s in inside),
                "child_hwm": max(s[4] for s in inside)}


async def call_async(port: int, query: str) -> str:
    """One call on a new connection (``Connection: close``, as the PBX makes it)."""
    try:
        async with asyncio.timeout(DEADLINE + 2):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(f"GET /voipgrid?{query} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                             "Connection: close\r\n\r\n".encode())
                data = await reader.read()
            finally:
                writer.close()
    except (OSError, TimeoutError) as exc:
        return f"no answer ({type(exc).__name__})"
    head, _, body = data.partition(b"\r\n\r\n")
    parts = head.split(b" ", 2)
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    return answer_word(status, body.decode(errors="replace"))


def log_event(log: Path, offset: int, names: tuple[str, ...]) -> tuple[dict[str, Any], int]:
    """The first JSON log line after ``offset`` whose event is one of ``names``."""
    with log.open("rb") as lines:
        lines.seek(offset)
        while line := lines.readline():
            if not line.endswith(b"\n"):
                break  # being written: read it whole next time
            offset += len(line)
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict) and event.get("event") in names:
                    return event, offset
    return {}, offset


def reload_under_load(plan: Plan, server: Server, site: sitegen.Site,
                      config: Path) -> dict[str, Any]:
    """Edit the running daemon's config file while valid calls come in at a fixed rate.

    As staff would: one code added, the file replaced atomically, and the
    daemon left to notice (it polls the file). Every call's latency and answer
    is kept; the calls before the change are the yardstick for those during it.
    """
    text = config.read_text(encoding="utf-8")
    taken = set(re.findall(r'^code = "(\d+)"', text, re.MULTILINE))
    added = next(c for c in map(str, range(10_000_000, 100_000_000)) if c not in taken)
    edited = (text + f'\n[[codes]]\nname = "Added by staff"\ncode = "{added}"\n'
              'gates = ["barrier"]\n').encode()
    # Not on the call list and bound to no caller: lockout cannot touch the load.
    check = urlencode({"token": sitegen.TOKEN, "code": added, "did": sitegen.BARRIER,
                       "callerid": "+31699999999", "callername": ""})
    before = call_once(server.port, check)
    queries = valid_queries(site)
    calls: list[tuple[float, float, str]] = []  # (started, latency ms, status word)
    marks: dict[str, float] = {}
    event: dict[str, Any] = {}

    async def one(query: str) -> None:
        started = time.perf_counter()
        word = await call_async(server.port, query)
        calls.append((started, (time.perf_counter() - started) * 1000, word))

    async def load() -> None:
        began = marks["began"] = time.perf_counter()
        pending: set[asyncio.Task[None]] = set()
        n = 0
        # Open loop: a call is made on time even while earlier ones wait.
        while "until" not in marks or began + n / RELOAD_RATE < marks["until"]:
            delay = began + n / RELOAD_RATE - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one(next(queries)))
            pending.add(task)
            task.add_done_callback(pending.discard)
            n += 1
        await asyncio.gather(*pending)

    async def edit_and_wait() -> None:
        nonlocal event
        await asyncio.sleep(plan.reload_baseline)
        offset = server.log.stat().st_size
        marks["writing"] = time.perf_counter()
        await asyncio.to_thread(files.replace, config, edited)
        marks["changed"], changed_wall = time.perf_counter(), time.time()
        limit = marks["changed"] + READY_TIMEOUT
        while not event and time.perf_counter() < limit:
            await asyncio.sleep(0.02)
            event, offset = log_event(server.log, offset, (
                "config reloaded", "config reload refused; the old config keeps serving",
                "config reload refused: restart gated to apply these changes; "
                "the old config keeps serving"))
        marks["seen"] = time.perf_counter()
        # The log's own time of the line, where it can be read; else when it was seen.
        marks["reloaded"] = marks["seen"]
        with contextlib.suppress(KeyError, ValueError, TypeError):
            logged = dt.datetime.fromisoformat(event["timestamp"]).timestamp()
            if changed_wall <= logged <= changed_wall + (marks["seen"] - marks["changed"]):
                marks["reloaded"] = marks["changed"] + logged - changed_wall
        marks["until"] = marks["seen"] + 1.0  # and a second after, for the tail

    async def both() -> None:
        await asyncio.gather(load(), edit_and_wait())

    with RssSampler(server.pid) as sampler:
        asyncio.run(both())
    after = call_once(server.port, check)

    def window(start: float, end: float) -> dict[str, Any]:
        inside = [c for c in calls if start <= c[0] < end]
        lat = sorted(c[1] for c in inside)
        wrong = [c[2] for c in inside if c[2] != "ACK"]
        return {"calls": len(inside), "ack": len(inside) - len(wrong), "wrong": wrong[:5],
                "p50_ms": percentile(lat, 50), "p99_ms": percentile(lat, 99),
                "max_ms": lat[-1] if lat else 0.0, "seconds": end - start,
                "rss": sampler.between(start, end)}

    # The reload's window runs from the start of the write (a 14 MB file and
    # its fsync are part of an edit) to the line that says it is done.
    reloaded = event.get("event") == "config reloaded"
    return {
        "rate": RELOAD_RATE, "connection": "new per call",
        "outcome": event.get("event", "no reload logged"),
        "reload_s": marks["reloaded"] - marks["changed"],
        "seen_s": marks["seen"] - marks["changed"],
        "write_s": marks["changed"] - marks["writing"],
        "credentials": event.get("credentials"),
        "without": window(marks["began"], marks["writing"]),
        "during": window(marks["writing"], marks["seen"]),
        "after": window(marks["seen"], marks["until"] + DEADLINE),
        "all": window(marks["began"], marks["until"] + DEADLINE),
        "added_code_before": before, "added_code_after": after,
        "takes_effect": reloaded and before != "ACK" and after == "ACK",
        "hwm_after": proc_status(server.pid, "VmHWM"),
        "samples": len(sampler.samples),
    }


def environment(work: Path) -> dict[str, Any]:
    import aiohttp

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=ROOT, check=False).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, cwd=ROOT, check=False).stdout.strip()
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="ascii") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True,
                                 check=False).stdout.split("[")[0].strip()
    parser = subprocess.run(
        [PYTHON, "-c", "from gated.book import config as c; import importlib.metadata as m; "
         "n = c.toml.__name__; print(n if n == 'tomllib' else f'{n} {m.version(n)}')"],
        capture_output=True, text=True, check=False, cwd=ROOT).stdout.strip()
    fsync = fsync_ms(work)
    return {
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "commit": commit + ("+changes" if dirty else ""),
        "python": platform.python_version(), "aiohttp": aiohttp.__version__,
        "cpus": os.cpu_count(), "cpu": cpu, "kernel": platform.release(),
        "load_generator": wrk_version, "toml_parser": parser,
        "fsync_ms": fsync[0], "fsync_p99_ms": fsync[1],
    }


# --- the report -------------------------------------------------------------

TARGETS = "docs/benchmark.md"


def verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def report(r: dict[str, Any], command: str) -> str:
    env, t, plan = r["environment"], r["throughput"], r["plan"]
    floor, big, small = t["floor"], t["gated_100k"], t["gated_10"]
    rss, ready, load = r["peak_rss"], r["ready_s"], r["load"]
    pairs, size_ratio = r["size_ratio"]["pairs"], r["size_ratio"]["median"]
    mib = 1024 * 1024

    def row(name: str, label: str) -> str:
        x = t[name]
        cfg = "-" if name == "floor" else (
            f"{load['big' if name == 'gated_100k' else 'small']['load_s']:.2f} s")
        return (f"| {label} | {x['rps']:,.0f} | {x['p50_ms']:.2f} | {x['p99_ms']:.2f} | "
                f"{x['p999_ms']:.2f} | {rss[name] / mib:.1f} MiB | {ready[name]:.2f} s | {cfg} |")

    lines = [
        "| | requests/s | p50 ms | p99 ms | p99.9 ms | peak RSS | start-to-ready | config load |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        row("floor", "aiohttp floor (constant `status=ACK`)"),
        row("gated_100k", "gated, 100,000 codes + 10,000 TOTP"),
        row("gated_10", "gated, 10 codes + 10,000 TOTP"),
        f"| gated 100k / floor | {big['rps'] / floor['rps']:.2f}x | "
        f"{big['p50_ms'] / floor['p50_ms']:.2f}x | {big['p99_ms'] / floor['p99_ms']:.2f}x | "
        f"{big['p999_ms'] / floor['p999_ms']:.2f}x | {rss['gated_100k'] / rss['floor']:.2f}x "
        f"| | |",
        f"| gated 100k / gated 10 (median of {len(pairs)} back-to-back pairs; "
        f"of the rounds' medians: {big['rps'] / small['rps']:.2f}x) | {size_ratio:.2f}x "
        f"| | | | | | |",
    ]
    table = "\n".join(lines)

    def cpu_row(name: str, label: str) -> str:
        x = t[name]
        return (f"| {label} | {x['cpu_us']:.0f} | {x['loop_cpu_us']:.0f} | "
                f"{x['cpu_us'] / floor['cpu_us']:.2f}x |")

    cpu_lines = [
        "| CPU per answered call, flat out (medians of the rounds) | all threads µs | "
        "event loop's thread µs | all threads / floor |",
        "|---|---:|---:|---:|",
        cpu_row("floor", "aiohttp floor"),
        cpu_row("gated_100k", "gated, 100,000 codes + 10,000 TOTP"),
        cpu_row("gated_10", "gated, 10 codes + 10,000 TOTP"),
    ]
    steady_lines: list[str] = []
    if "fixed_rate" in r:
        fr = r["fixed_rate"]

        def steady_row(name: str, label: str) -> str:
            x = fr[name]
            return (f"| {label} | {x['rps']:,.0f} | {x['p50_ms']:.2f} | {x['p99_ms']:.2f} | "
                    f"{x['p999_ms']:.2f} | {x['max_ms']:.2f} | {x['cpu_us']:.0f} |")

        steady_lines = [
            f"| steady ~{plan['fixed_rate']:,} calls/s (16 connections, {plan['seconds']:.0f} s) "
            "| calls/s | p50 ms | p99 ms | p99.9 ms | max ms | CPU µs a call, all threads |",
            "|---|---:|---:|---:|---:|---:|---:|",
            steady_row("floor", "aiohttp floor"),
            steady_row("gated_100k", "gated, 100,000 codes + 10,000 TOTP"),
            steady_row("gated_10", "gated, 10 codes + 10,000 TOTP"),
            f"| gated 100k / floor | | {fr['gated_100k']['p50_ms'] / fr['floor']['p50_ms']:.2f}x "
            f"| {fr['gated_100k']['p99_ms'] / fr['floor']['p99_ms']:.2f}x | "
            f"{fr['gated_100k']['p999_ms'] / fr['floor']['p999_ms']:.2f}x | | |",
        ]

    routed, routed_small = t["routed_100k"], t["routed_10"]

    def routed_row(name: str, label: str, config: str = "") -> str:
        x = t[name]
        cfg = f"{load[config]['load_s']:.2f} s" if config else ""
        return (f"| {label} | {x['rps']:,.0f} | {x['p50_ms']:.2f} | {x['p99_ms']:.2f} | "
                f"{x['p999_ms']:.2f} | {x['answered_wrong']} | {rss[name] / mib:.1f} MiB | "
                f"{cfg} |")

    routed_lines = [
        "| calls without a code, routed by caller | requests/s | p50 ms | p99 ms | p99.9 ms | "
        "not ACK | peak RSS | config load |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        routed_row("routed_100k", "routed, CSV of 100,000 rows", "routed"),
        routed_row("routed_10", "routed, CSV of 10 rows", "routed_small"),
        routed_row("gated_10", "(a code call, 10 codes + 10,000 TOTP)"),
        f"| routed 100k / routed 10 | {routed['rps'] / routed_small['rps']:.2f}x | "
        f"{routed['p50_ms'] / routed_small['p50_ms']:.2f}x | "
        f"{routed['p99_ms'] / routed_small['p99_ms']:.2f}x | | | | |",
    ]

    fl = r["floods"]
    junk, guess, gmax = fl["junk"], fl["guess"], fl["guess_max"]
    flood_lines = [
        "| flood | rate | flood p50 / p99 ms | legitimate calls | right | "
        "legit p50 / p99 / max ms |",
        "|---|---:|---:|---:|---:|---:|",
        f"| junk (no token or a wrong one) | {junk['flood']['rps']:,.0f} req/s "
        f"({junk['flood']['forbidden']:,} x 403) | {junk['flood']['p50_ms']:.2f} / "
        f"{junk['flood']['p99_ms']:.2f} | {junk['legit']['calls']} codes | "
        f"{junk['legit']['success']:.0%} | {junk['legit']['p50_ms']:.1f} / "
        f"{junk['legit']['p99_ms']:.1f} / {junk['legit']['max_ms']:.1f} |",
        f"| guesses with the token (site locks) | {guess['flood']['rps']:,.0f} req/s "
        f"({guess['flood']['NAK']:,} x NAK) | {guess['flood']['p50_ms']:.2f} / "
        f"{guess['flood']['p99_ms']:.2f} | {guess['legit']['calls']} residents | "
        f"{guess['legit']['success']:.0%} | {guess['legit']['p50_ms']:.1f} / "
        f"{guess['legit']['p99_ms']:.1f} / {guess['legit']['max_ms']:.1f} |",
        f"| guesses, as fast as they are answered | {gmax['rps']:,.0f} req/s "
        f"({gmax['NAK']:,} x NAK) | {gmax['p50_ms']:.2f} / {gmax['p99_ms']:.2f} | | | |",
    ]

    steady, rs = r["steady_rss"], r["restarts"]
    floor_steady = steady["floor"]["rss"]
    per_code = (steady["gated_100k"]["rss"] - steady["gated_10"]["rss"]) / 99_990

    def memory_row(name: str, label: str) -> str:
        ratios = ("| | |" if name == "floor" else
                  f"| {steady[name]['rss'] / floor_steady:.2f}x | "
                  f"{rss[name] / rss['floor']:.2f}x |")
        return (f"| {label} | {steady[name]['rss'] / mib:.1f} MiB "
                f"({steady[name]['anon'] / mib:.1f} / {steady[name]['file'] / mib:.1f}) | "
                f"{rss[name] / mib:.1f} MiB {ratios}")

    memory_lines = [
        "| resident memory | steady: idle after start (anonymous / file-backed) | "
        "peak (VmHWM), whole run | steady / floor | peak / floor |",
        "|---|---:|---:|---:|---:|",
        memory_row("floor", "aiohttp floor"),
        memory_row("gated_100k", "gated, 100,000 codes + 10,000 TOTP"),
        memory_row("gated_10", "gated, 10 codes + 10,000 TOTP"),
        f"| bytes per static code (running daemon) | {per_code:,.0f} | | | |",
    ]

    def first_answer(name: str) -> str:
        wrong = rs[name]["not_ack_first"]
        return "ACK" if not wrong else f"**{wrong} not ACK first**"

    def start_row(name: str, label: str) -> str:
        x = rs[name]
        return (f"| {label} | {x['first_s']:.2f} s | {x['restart_s']:.2f} s | "
                f"{first_answer(name)} | {x['stop_s']:.2f} s | "
                f"{x['first_peak_with_children'] / mib:.1f} MiB "
                f"({x['first_peak_with_children'] / floor_steady:.2f}x) |")

    restart_lines = [
        "| exec to the first valid call answered ACK | first start, fresh state | "
        "restart, same config and state | first answer | stop (SIGTERM to exit) | "
        "first start: peak RSS, server + children (/ floor steady) |",
        "|---|---:|---:|---:|---:|---:|",
        start_row("floor", "aiohttp floor"),
        start_row("gated_100k", "gated, 100,000 codes + 10,000 TOTP"),
        start_row("gated_10", "gated, 10 codes + 10,000 TOTP"),
    ]

    rl = rs["reload"]

    def reload_row(key: str, label: str) -> str:
        x = rl[key]
        return (f"| {label} | {x['calls']:,} | {x['ack']:,} | {x['p50_ms']:.1f} | "
                f"{x['p99_ms']:.1f} | {x['max_ms']:.1f} | "
                f"{x['rss']['peak'] / mib:.1f} MiB ({x['rss']['peak'] / floor_steady:.2f}x) | "
                f"{x['rss']['peak_with_children'] / mib:.1f} MiB "
                f"({x['rss']['peak_with_children'] / floor_steady:.2f}x) |")

    reload_lines = [
        f"| gated 100k, {rl['rate']} valid calls/s, a new connection each | calls | ACK | "
        "p50 ms | p99 ms | max ms | daemon RSS, peak (/ floor steady) | "
        "daemon + children, peak |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        reload_row("without", f"without a reload (the {rl['without']['seconds']:.0f} s before)"),
        reload_row("during", f"during the reload (from writing the file to "
                             f"`config reloaded`: {rl['during']['seconds']:.1f} s)"),
        reload_row("after", "after it"),
    ]

    legit_p99 = junk["legit"]["p99_ms"]
    targets = [
        "| target | measured | |",
        "|---|---:|---|",
        f"| requests/s ≥ 0.5x floor, every entry durable | {big['rps'] / floor['rps']:.2f}x | "
        f"{verdict(big['rps'] >= 0.5 * floor['rps'])} |",
        f"| CPU per answered call, all threads, ≤ 80 µs (flat out) | "
        f"{big['cpu_us']:.0f} µs | {verdict(big['cpu_us'] <= 80)} |",
        f"| p99 ≤ 2x floor | {big['p99_ms'] / floor['p99_ms']:.2f}x | "
        f"{verdict(big['p99_ms'] <= 2 * floor['p99_ms'])} |",
        f"| 100k codes ≥ 0.95x of 10 codes (back-to-back pairs) | {size_ratio:.2f}x | "
        f"{verdict(size_ratio >= 0.95)} |",
        f"| peak RSS, 100k codes ≤ 1.6x floor | {rss['gated_100k'] / rss['floor']:.2f}x | "
        f"{verdict(rss['gated_100k'] <= 1.6 * rss['floor'])} |",
        f"| legitimate calls during the junk flood: all right | "
        f"{junk['legit']['right']}/{junk['legit']['calls']} | "
        f"{verdict(junk['legit']['success'] == 1.0)} |",
        f"| ... and their p99 < 10% of the {DEADLINE:.0f} s deadline | {legit_p99:.1f} ms | "
        f"{verdict(legit_p99 < DEADLINE * 100)} |",
    ]
    big_steady = steady["gated_100k"]["rss"] / floor_steady
    big_restart = rs["gated_100k"]
    restart_ok = big_restart["restart_s"] <= 2 and big_restart["not_ack_first"] == 0
    everything = rl["all"]
    all_ack = everything["ack"] == everything["calls"] and rl["outcome"] == "config reloaded"
    targets += [
        f"| RSS with 100k codes + 10k TOTP ≤ 1.6x floor (steady) | {big_steady:.2f}x | "
        f"{verdict(big_steady <= 1.6)} |",
        f"| peak ≤ 2x floor (VmHWM, each over the whole run) | "
        f"{rss['gated_100k'] / rss['floor']:.2f}x | "
        f"{verdict(rss['gated_100k'] <= 2 * rss['floor'])} |",
        f"| (peak with the children that build the book, 100k: first start / reload, "
        f"over the floor's steady RSS) | "
        f"{big_restart['first_peak_with_children'] / floor_steady:.2f}x / "
        f"{rl['during']['rss']['peak_with_children'] / floor_steady:.2f}x | |",
        f"| bytes per static code above a 10-code site ≤ 70 (running daemon) | "
        f"{per_code:,.0f} | {verdict(per_code <= 70)} |",
        f"| restart to answering with 100k codes + 10k TOTP ≤ 2 s, right at once | "
        f"{big_restart['restart_s']:.2f} s | {verdict(restart_ok)} |",
        f"| every call answered ACK while the 100k file reloads (and before, after) | "
        f"{everything['ack']:,}/{everything['calls']:,} | "
        f"{verdict(all_ack)} |",
        f"| the changed code takes effect after the reload | {rl['added_code_before']} → "
        f"{rl['added_code_after']} | {verdict(rl['takes_effect'])} |",
        f"| (worst call during the reload vs without, {rl['rate']} calls/s) | "
        f"{rl['during']['max_ms'] / max(rl['without']['max_ms'], 1e-9):.2f}x | |",
    ]
    if "fixed_rate" in r:
        fr = r["fixed_rate"]
        ratio = fr["gated_100k"]["p99_ms"] / fr["floor"]["p99_ms"]
        worst = fr["gated_100k"]["max_ms"]
        targets.append(f"| at a steady ~{plan['fixed_rate']:,} calls/s: p99 ≤ 2x the floor's at "
                       f"the same rate | {ratio:.2f}x | {verdict(ratio <= 2)} |")
        targets.append(f"| ... and no call over 50 ms | {worst:.1f} ms | "
                       f"{verdict(worst <= 50)} |")
    targets.append(f"| (refusals stay cheap: locked-out guesses vs valid calls, req/s) | "
                   f"{gmax['rps'] / big['rps']:.2f}x | |")

    dur = r["durability"]
    memory = [
        f"- Compiling the book in one process (what the daemon's child process does at a "
        f"first start and a reload, and `gated check-config` does), "
        f"100,000 codes + 10,000 TOTP: {load['big']['load_s']:.2f} s, "
        f"peak RSS while loading {load['big']['hwm'] / mib:.0f} MiB; "
        f"10 codes + 10,000 TOTP: {load['small']['load_s'] * 1000:.0f} ms; "
        f"10 codes alone: {load['bare']['load_s'] * 1000:.0f} ms. "
        f"Importing gated: {load['bare']['import_s'] * 1000:.0f} ms.",
        f"- Memory per static code in that process (100,000 codes, RSS after the compile "
        f"minus the 10-code site's; the parsed TOML and what compiling leaves behind, "
        f"none of it in the daemon): {load['bytes_per_code_rss']:.0f} bytes"
        + (f"; held by Python objects (tracemalloc): {load['bytes_per_code_traced']:.0f} "
           f"bytes, of which the code book {load['bytes_per_code_book']:.0f} and the parsed "
           f"config the rest (the daemon drops that once the book is built)."
           if "bytes_per_code_traced" in load else "."),
        f"- Bytes per static code (running daemon): {per_code:,.0f} (steady RSS of the "
        f"100,000-code site minus the 10-code site's, both with 10,000 TOTP users, each "
        f"idle {SETTLE:.0f} s after start; anonymous "
        f"{(steady['gated_100k']['anon'] - steady['gated_10']['anon']) / 99_990:,.0f}, "
        f"file-backed "
        f"{(steady['gated_100k']['file'] - steady['gated_10']['file']) / 99_990:,.0f}).",
        f"- Reload of the 100,000-code file (one code added, the file replaced atomically, "
        f"the daemon polling it every 2 s): `{rl['outcome']}` {rl['reload_s']:.2f} s after "
        f"the rename; {rl['rate']} calls/s throughout, each on a new connection, "
        f"{everything['ack']:,} of {everything['calls']:,} answered ACK; the added code "
        f"answered {rl['added_code_before']} before and {rl['added_code_after']} after; "
        f"VmHWM after it {rl['hwm_after'] / mib:.0f} MiB; child processes at once: at most "
        f"{rl['during']['rss']['children_max']}, the largest one's own peak (VmHWM) "
        f"{rl['during']['rss']['child_hwm'] / mib:.0f} MiB. "
        f"A first start's children peaked at "
        f"{rs['gated_100k']['first_child_hwm'] / mib:.0f} MiB (100,000 codes) and "
        f"{rs['gated_10']['first_child_hwm'] / mib:.0f} MiB (10 codes).",
    ]
    memory.append(
        f"- Routes: a CSV of 100,000 rows loads in {load['routed']['load_s']:.2f} s "
        f"(10 rows: {load['routed_small']['load_s'] * 1000:.0f} ms); memory per row (RSS after "
        f"load minus the 10-row site's): {load['bytes_per_row_rss']:.0f} bytes"
        + (f", held by the route table (tracemalloc): {load['bytes_per_row_book']:.0f} bytes."
           if "bytes_per_row_book" in load else "."))
    for name in ("gated_100k", "gated_10"):
        d = dur[name]
        memory.append(
            f"- Durability, {name.replace('_', ' ')}: {d['stored']:,} entries in SQLite, "
            f"{d['logged']:,} logged, {d['answered_before_durable']} answered before their "
            f"entry was durable (WAL, synchronous=FULL, group commit).")
    if "fixed_rate" in r:
        fr = r["fixed_rate"]
        memory.append(
            f"- At a fixed {plan['fixed_rate']:,} req/s (16 connections), p50 / p99 / p99.9 ms: "
            + "; ".join(f"{label} {fr[n]['p50_ms']:.2f} / {fr[n]['p99_ms']:.2f} / "
                        f"{fr[n]['p999_ms']:.2f}" for n, label in (
                            ("floor", "floor"), ("gated_100k", "gated 100k"),
                            ("gated_10", "gated 10"))) + ".")
    mode = "quick" if plan["rounds"] < FULL.rounds else "full"
    return "\n".join([
        f"Command: `{command}` ({mode} run, {env['when']}, commit {env['commit']})",
        "",
        f"Machine: {env['cpus']} x {env['cpu']}, Linux {env['kernel']}, Python {env['python']}, "
        f"aiohttp {env['aiohttp']}, TOML parser {env['toml_parser']}, "
        f"{env['load_generator']}; fsync here (4 KiB appended) "
        f"{env['fsync_ms']:.3f} ms median, {env['fsync_p99_ms']:.3f} ms p99.",
        f"Load: wrk, 1 thread, {plan['connections']} keep-alive connections, "
        f"{plan['rounds']} alternating rounds of {plan['seconds']:.0f} s per server "
        f"(medians shown); every gated request is a valid code from one of 1,000 callers.",
        "",
        table, "", *cpu_lines, "", *([*steady_lines, ""] if steady_lines else []),
        *routed_lines, "", *flood_lines, "", *memory_lines, "", *restart_lines, "",
        *reload_lines, "", *targets, "", *memory,
        f"- The whole run took {r['bench_seconds']:.0f} s.", "",
    ])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smaller run, under a minute")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results",
                        help="where the JSON and Markdown go (default: bench-results/)")
    parser.add_argument("--no-docs", action="store_true",
                        help=f"do not update {TARGETS} after a full run")
    parser.add_argument("--keep", action="store_true", help="keep the temporary site folder")
    parser.add_argument("--site-python", default=sys.executable,
                        help="the interpreter the servers run with (default: this one)")
    args = parser.parse_args()
    global PYTHON
    # Absolute, not resolved: the servers start elsewhere, and a venv's python is a link.
    PYTHON = str(Path(args.site_python).absolute())
    if shutil.which("wrk") is None:
        print("bench: wrk is needed (apt-get install wrk; ./dev bench installs it)",
              file=sys.stderr)
        return 2
    plan = QUICK if args.quick else FULL
    command = "./dev bench" + (" --quick" if args.quick else "")
    work = Path(tempfile.mkdtemp(prefix="gated-bench-"))
    started = time.perf_counter()
    gc.disable()  # the driver's own pauses must not show up as server latency
    try:
        results = run(plan, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            say(f"kept {work}")
    results["bench_seconds"] = time.perf_counter() - started
    markdown = report(results, command)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (args.out / f"bench-{stamp}.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / f"bench-{stamp}.md").write_text(markdown)
    (args.out / "latest.md").write_text(markdown)
    if not args.quick and not args.no_docs:
        publish(markdown)
    print(markdown)
    say(f"done in {results['bench_seconds']:.0f} s; results in {args.out}")
    return 0


def publish(markdown: str) -> None:
    """Replace the generated parts of docs/benchmark.md (all of it) and of the
    README (the tables), keep the prose around them."""
    _replace(ROOT / TARGETS, "<!-- bench:begin -->", "<!-- bench:end -->", markdown)
    _replace(ROOT / "README.md", "<!-- bench:tables:begin -->", "<!-- bench:tables:end -->",
             "\n\n".join(_table(markdown, head) for head in README_TABLES))


# The tables the README shows: throughput against the floor, and the targets.
README_TABLES = ("| | requests/s", "| target |")


def _table(markdown: str, head: str) -> str:
    """The Markdown table whose first line starts with ``head``."""
    start = markdown.index(head)
    end = markdown.find("\n\n", start)
    return markdown[start:end if end >= 0 else len(markdown)].strip()


def _replace(path: Path, begin: str, end: str, content: str) -> None:
    text = path.read_text() if path.exists() else f"# Benchmark\n\n{begin}\n{end}\n"
    if begin not in text:
        return
    head, _, rest = text.partition(begin)
    _, _, tail = rest.partition(end)
    path.write_text(f"{head}{begin}\n{content}\n{end}{tail}")


if __name__ == "__main__":
    sys.exit(main())
