"""Synthetic sites for the benchmark: a TOML config plus the calls to drive it with.

Deterministic (seeded), so two runs measure the same site. The call list holds
one valid call per line (``code did callerid``), in a shuffled order, for the
load generator to cycle through: every call it makes is one the site answers
ACK, so lockout (which is on, at its usual limits) never trips during the
throughput runs. Guessing is measured on its own, in the flood runs.
"""

from __future__ import annotations

import base64
import random
from dataclasses import dataclass
from pathlib import Path

TOKEN = "bench-token-0123456789abcdef"
BARRIER = "+31501234567"
DOOR = "+31501234568"
# Always-open schedule written as two windows, so the schedule check does real work.
ALWAYS = '["mon-fri 00:00-24:00", "sat-sun 00:00-24:00"]'


@dataclass(frozen=True)
class Site:
    config: Path
    calls: Path  # "code did callerid" per line, every one valid
    callers: list[str]
    codes: int
    totp: int


def _caller(i: int) -> str:
    return f"+316{10_000_000 + i * 7919 % 90_000_000:08d}"


def generate(folder: Path, *, codes: int, totp: int, callers: int, port: int,
             pulse: float = 0.05, seed: int = 7) -> Site:
    """Write ``gated.toml`` and ``calls.txt`` into ``folder``."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    numbers = [_caller(i) for i in range(callers)]
    digits = rng.sample(range(10_000_000, 100_000_000), codes)
    out: list[str] = [f"""\
[site]
id = "bench"
timezone = "Europe/Amsterdam"
region = "NL"

[server]
listen = "127.0.0.1:{port}"
path = "/voipgrid"
tokens = ["{TOKEN}"]
answer_deadline = 3.0

[gates.barrier]
numbers = ["{BARRIER}"]
actuator = {{ type = "mock", pin = 17, pulse = {pulse} }}
callers = [{", ".join(f'"{n}"' for n in numbers)}]

[gates.door]
numbers = ["{DOOR}"]
actuator = {{ type = "mock", pin = 27, active_high = false, pulse = {pulse} }}

[lockout]
caller_failures = 5
site_failures = 30
lock_seconds = 300

[log]
path = "state/entries.sqlite3"
format = "json"
"""]
    for i, code in enumerate(digits):
        caller = numbers[i % callers]
        both = i % 5 != 0
        lines = [
            "[[codes]]",
            f'name = "Code {i:06d}"',
            f'code = "{code}"',
            'gates = ["barrier", "door"]' if both else 'gates = ["barrier"]',
        ]
        # A mix of the optional fields, so every check in refuse() runs.
        if i % 3 == 0:
            lines += ["valid_from = 2020-01-01T00:00:00", "valid_until = 2099-12-31T00:00:00"]
        if i % 4 == 0:
            lines.append(f"schedule = {ALWAYS}")
        if i % 7 == 0:
            lines.append("max_uses = 100000000")
        if i % 10 == 0:
            lines.append(f'callers = ["{caller}"]')
        if i % 2 == 0:
            lines.append(f'callername = "Visitor {i % 100}"')
        out.append("\n".join(lines) + "\n")
    # At least one call per caller, so a small site is called from as many
    # numbers as a large one; a code bound to callers is called from its own.
    calls: list[str] = []
    for j in range(max(codes, callers)):
        i = j % codes
        caller = numbers[i % callers] if i % 10 == 0 else numbers[j % callers]
        door = i % 5 != 0 and j % 2
        calls.append(f"{digits[i]} {DOOR if door else BARRIER} {caller}")
    for i in range(totp):
        # 32 base32 characters: a 160-bit secret, as `gated totp add` makes.
        secret = base64.b32encode(rng.randbytes(20)).decode()
        out.append(f'[[totp]]\nname = "Resident {i:05d}"\nsecret = "{secret}"\n'
                   'gates = ["barrier", "door"]\n')
    rng.shuffle(calls)
    config = folder / "gated.toml"
    config.write_text("\n".join(out), encoding="utf-8")
    call_file = folder / "calls.txt"
    call_file.write_text("\n".join(calls) + "\n", encoding="utf-8")
    return Site(config, call_file, numbers, codes, totp)


LINE = "+31501234500"  # the routing site's general number: a line


def generate_routes(folder: Path, *, rows: int, port: int, seed: int = 11) -> Site:
    """A site that routes callers by a CSV of ``rows`` rows (a CRM export) on its line.

    ``calls.txt`` holds calls without a code ("-") from 1,000 of the rows
    (spread over the file; all of them when there are fewer), each answered
    ACK with its row's destination. 1,000 callers, as the code sites have:
    the comparison is of the lookup, not of phonenumbers reading a number the
    process has not seen before (~30 us, the same on either site).
    """
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    numbers = [f"+316{n}" for n in rng.sample(range(10_000_000, 100_000_000), rows)]
    csv = ["number,destination,callername"]
    csv += [f"{number},+3150{i % 1000:07d},Customer {i:06d}" for i, number in enumerate(numbers)]
    (folder / "routes.csv").write_text("\n".join(csv) + "\n", encoding="utf-8")
    (folder / "gated.toml").write_text(f"""\
[site]
id = "bench-routes"
timezone = "Europe/Amsterdam"
region = "NL"

[server]
listen = "127.0.0.1:{port}"
path = "/voipgrid"
tokens = ["{TOKEN}"]
answer_deadline = 3.0

[gates.barrier]
numbers = ["{BARRIER}"]
actuator = {{ type = "mock", pin = 17, pulse = 0.05 }}

[[routes]]
name = "CRM"
numbers = ["{LINE}"]
file = "routes.csv"
destination = "+31501234500"

[log]
path = "state/entries.sqlite3"
format = "json"
""", encoding="utf-8")
    callers = numbers[::max(1, rows // 1000)][:1000]
    calls = [f"- {LINE} {number}" for number in callers] * max(1, 1000 // len(callers))
    rng.shuffle(calls)
    call_file = folder / "calls.txt"
    call_file.write_text("\n".join(calls) + "\n", encoding="utf-8")
    return Site(folder / "gated.toml", call_file, numbers, 0, 0)
