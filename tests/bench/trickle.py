"""How many calls get through while a slowloris holds the webhook's connections.

    .venv/bin/python tests/bench/trickle.py                 # 40 sockets from 40 addresses
    .venv/bin/python tests/bench/trickle.py --one-address   # 40 sockets from one address
    .venv/bin/python tests/bench/trickle.py --body          # slow POST bodies instead
    .venv/bin/python tests/bench/trickle.py --pythonpath /tmp/other-checkout

``gated run`` on config/gated.example.toml (its token and demo code, mock
pins) with ``max_connections`` set to 32, on a free port of 127.0.0.1. 40
sockets each start a request and send one more header line every 3 s, never
ending it, and reconnect at once when the daemon closes or answers them. Once
the cap is full (the sockets past it turned away or made others give way, or
every socket in and on its second line), the PBX makes 200 calls one after
another (a fresh connection each, from 127.0.0.1, one every 50 ms) and the
script counts how many were answered (HTTP 200 with a status) and how many were
refused (503) or lost.

``--pythonpath`` runs the daemon from another source tree, on that tree's
example config, to compare.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT))

from tests.process import free_port  # noqa: E402
from tests.trickle import Trickle  # noqa: E402

EXAMPLE = ROOT / "config" / "gated.example.toml"
TOKEN = "change-me-long-random"
CALL = f"/voipgrid?token={TOKEN}&code=471123&did=%2B31501234567&callerid=%2B31612345678"


def site(folder: Path, port: int, max_connections: int, example: Path = EXAMPLE) -> Path:
    """The example config on ``port`` with ``max_connections``; its state under ``folder``."""
    conf = folder / "conf"
    conf.mkdir()
    text = example.read_text()
    text = text.replace('listen = "127.0.0.1:8080"', f'listen = "127.0.0.1:{port}"', 1)
    text, replaced = re.subn(r"(?m)^max_connections = \d+",
                             f"max_connections = {max_connections}", text)
    assert replaced == 1
    path = conf / "gated.toml"
    path.write_text(text)
    return path


def listening(port: int, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1):
                pass
        except urllib.error.HTTPError:
            return  # a 404: it answers
        except OSError:
            time.sleep(0.1)
    raise SystemExit("the daemon did not start")


def call(port: int) -> tuple[str, float]:
    """One call: what came back (``answered``, ``503``, ``lost``) and how long it took."""
    start = time.monotonic()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{CALL}", timeout=10) as response:
            body = response.read()
            outcome = "answered" if body.startswith(b"status=") else "other"
    except urllib.error.HTTPError as exc:
        exc.close()
        outcome = str(exc.code)
    except OSError:
        outcome = "lost"
    return outcome, time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--interval", type=float, default=0.05, help="seconds between calls")
    parser.add_argument("--sockets", type=int, default=40)
    parser.add_argument("--every", type=float, default=3.0, help="seconds between lines")
    parser.add_argument("--max-connections", type=int, default=32)
    parser.add_argument("--body", action="store_true",
                        help="send whole heads, then the body a byte at a time")
    parser.add_argument("--one-address", action="store_true",
                        help="every socket from 127.0.0.2 (else one address each)")
    parser.add_argument("--pythonpath", help="run the daemon from this source tree")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="gated-trickle-"))
    port = free_port()
    example = (Path(args.pythonpath) / "config" / "gated.example.toml" if args.pythonpath
               else EXAMPLE)
    config = site(folder, port, args.max_connections, example)
    env = dict(os.environ)
    if args.pythonpath:
        env["PYTHONPATH"] = args.pythonpath
    # Run from the state folder: `python -m` puts the working folder first on the path.
    daemon = subprocess.Popen([sys.executable, "-m", "gated", "-c", str(config), "run"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                              cwd=folder)
    sources = (["127.0.0.2"] if args.one_address
               else [f"127.0.{n // 250}.{n % 250 + 2}" for n in range(args.sockets)])
    outcomes: list[str] = []
    took: list[float] = []
    try:
        listening(port)
        with Trickle(port, args.sockets, args.every, sources, body=args.body) as trickle:
            surplus = max(args.sockets - args.max_connections, 1)
            deadline = time.monotonic() + 30
            # Full: the sockets past the cap were turned away or made others give way,
            # or every socket is in and has sent a second piece (one burst of
            # accepts may go past the cap).
            while trickle.tally.refused + trickle.tally.closed < surplus and not (
                    trickle.tally.connects >= args.sockets
                    and trickle.tally.lines >= 2 * args.sockets):
                if time.monotonic() > deadline:
                    raise SystemExit(f"the trickle never filled the cap: {trickle.tally}")
                time.sleep(0.01)
            began = time.monotonic()
            for _ in range(args.calls):
                outcome, seconds = call(port)
                outcomes.append(outcome)
                if outcome == "answered":
                    took.append(seconds)
                time.sleep(args.interval)
            lasted = time.monotonic() - began
            tally = trickle.tally
    finally:
        daemon.terminate()
        daemon.wait(15)
        shutil.rmtree(folder, ignore_errors=True)

    where = "one address" if args.one_address else f"{len(sources)} addresses"
    unit = "body byte" if args.body else "header line"
    print(f"max_connections={args.max_connections}; {args.sockets} sockets from {where}, "
          f"a {unit} every {args.every:g} s; {len(outcomes)} calls over {lasted:.1f} s")
    counts = {o: outcomes.count(o) for o in sorted(set(outcomes))}
    print(f"answered {counts.get('answered', 0)} of {len(outcomes)}; all outcomes: {counts}")
    if took:
        took.sort()
        print(f"answered calls took: median {statistics.median(took) * 1000:.1f} ms, "
              f"slowest {took[-1] * 1000:.1f} ms")
    print(f"trickle: {tally.connects} connections, {tally.lines} pieces sent, "
          f"{tally.refused} told 503, {tally.closed} closed by the daemon")


if __name__ == "__main__":
    main()
