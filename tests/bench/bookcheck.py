"""What checking a book's insides costs, against what else mapping it costs.

    .venv/bin/python tests/bench/bookcheck.py [--codes 50000 100000] [--totp 10000]

For each size: a fleet set of that many codes (as staff build it) and a site
book of that many codes and ``--totp`` TOTP users (as the compiler builds it,
from generated rows rather than TOML, which would take minutes). Each is
written to a file and timed, best of ``--repeats``: ``bookfile.check`` alone,
the SHA-256 a mapped site book is checked with, and ``bookfile.map_file``
whole (map, checksum, check).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))

from gated.book import (  # noqa: E402
    bookfile,
    codeset,
    compiler,
    sitekey,
)
from gated.book import config as config_mod  # noqa: E402
from gated.book.codeset import Entry, SetPolicy  # noqa: E402
from tests.helpers import config_text  # noqa: E402


def fleet_set(count: int) -> bytes:
    key = os.urandom(32)
    policies = [SetPolicy(gates=(f"gate-{n}",)) for n in range(50)]
    return codeset.build([Entry(sitekey.digest(key, f"{n:08d}"), policies[n % 50],
                                f"Person {n}", f"person-{n}" if n % 4 else f"Person {n}")
                          for n in range(count)])


def site_book(count: int, users: int) -> bytes:
    config, _ = config_mod.parse(config_text(Path(tempfile.gettempdir())))
    key = os.urandom(32)
    compiled = compiler._Compiled({}, [], [])
    policies = [compiler.Policy("code", (f"gate-{n}",), None, None, (), None, (), "", "")
                for n in range(50)]
    for policy in policies:
        compiled.policies[policy] = len(compiled.policies)
    compiled.codes = [(sitekey.digest(key, f"{n:08d}"), n % 50, f"Person {n}",
                       f"person-{n}" if n % 4 else f"Person {n}") for n in range(count)]
    compiled.totp = [compiler.TotpRow(f"Flat {n}", f"Flat {n}", n % 50, os.urandom(20), 6,
                                      "sha1", 30 if n % 3 else 60) for n in range(users)]
    return bookfile.build(compiled.sections(config), codes=count, sources={})


def best(repeats: int, run: Callable[[], object]) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times) * 1000


def measure(name: str, data: bytes, folder: Path, repeats: int) -> None:
    path = folder / name
    path.write_bytes(data)
    image = bookfile.map_file(path)
    _, body = bookfile.read_header(data)
    checked = best(repeats, lambda: bookfile.check(image))
    hashed = best(repeats, lambda: bookfile.sha256(image.buffer[body:]))
    mapped = best(repeats, lambda: bookfile.map_file(path))
    print(f"{name:>26}: {len(data) / 1e6:6.1f} MB  check {checked:6.1f} ms  "
          f"sha256 {hashed:6.1f} ms  map_file {mapped:6.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--codes", type=int, nargs="+", default=[50_000, 100_000])
    parser.add_argument("--totp", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        for count in args.codes:
            measure(f"fleet set, {count} codes", fleet_set(count), Path(folder), args.repeats)
            measure(f"site book, {count} + {args.totp} TOTP", site_book(count, args.totp),
                    Path(folder), args.repeats)


if __name__ == "__main__":
    main()
