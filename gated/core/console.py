"""What the command line reads and prints: durations, times, name lists, tables.

Every subcommand parses these the same way, in the site's time zone, and
turns bad input into an ArgumentTypeError that ``gated`` prints as one line.
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TextIO

from gated.core.printable import printable

_DURATION = re.compile(r"(\d+)([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str, option: str = "duration") -> float:
    """``90m``, ``4h``, ``2d``, ``1w`` or combinations like ``1d12h`` -> seconds."""
    compact = text.replace(" ", "")
    parts = _DURATION.findall(compact)
    if not parts or "".join(n + u for n, u in parts) != compact:
        raise argparse.ArgumentTypeError(f"{option}: expected e.g. 90m, 4h or 2d, got {text!r}")
    return float(sum(int(n) * _UNITS[u] for n, u in parts))


def parse_time(text: str, tz: dt.tzinfo, option: str = "time") -> dt.datetime:
    """An ISO date and time; without an offset it is site-local, like the config file."""
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{option}: not an ISO time: {text!r}") from None
    if "T" not in text and " " not in text:
        raise argparse.ArgumentTypeError(f"{option}: give a time too, e.g. {text}T18:00")
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=tz)


def parse_since(text: str, now: float, tz: dt.tzinfo) -> float:
    """``10m``, ``2h``, ``3d``, ``today`` or an ISO date/time -> epoch seconds."""
    if text == "today":
        local = dt.datetime.fromtimestamp(now, tz)
        return local.replace(hour=0, minute=0, second=0, microsecond=0).timestamp()
    if re.fullmatch(r"(\d+[smhdw])+", text.replace(" ", "")):
        return now - parse_duration(text, "--since")
    try:
        return parse_time(text if "T" in text or " " in text else f"{text}T00:00", tz,
                          "--since").timestamp()
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"--since: expected 10m, 2h, 3d, today or an ISO time, got {text!r}") from None


def split_names(items: Iterable[str]) -> list[str]:
    """``["barrier,door", "gate3"]`` -> ``["barrier", "door", "gate3"]``."""
    return [name.strip() for item in items for name in item.split(",") if name.strip()]


def print_table(rows: Sequence[Sequence[object]]) -> None:
    """Left-aligned columns, two spaces apart; the first row is the header."""
    # Cells hold names and numbers from outside (stored entries, managed codes).
    cells = [[printable(str(cell)) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def counted(count: int, noun: str) -> str:
    """``1 chunk``, ``2 chunks``: a count with its noun."""
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


class Progress:
    """A count on one line of a terminal, for work that lasts more than a second.

    Silent when ``stream`` is not a terminal (a pipe, a log, a test) and for
    work done within ``after`` seconds; redrawn at most ten times a second.
    """

    def __init__(self, what: str, total: int | None = None, *, stream: TextIO | None = None,
                 after: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.what = what
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.on = self.stream.isatty()
        self.after = after
        self.clock = clock
        self.started = clock()
        self.last = 0.0
        self.shown = False

    def __call__(self, done: int) -> None:
        if not self.on:
            return
        now = self.clock()
        if now - self.started < self.after or now - self.last < 0.1:
            return
        self.last = now
        text = f"{self.what}: {done:,}"
        if self.total:
            text += f" of {self.total:,} ({done * 100 // self.total}%)"
        self.stream.write(f"\r{text}\x1b[K")
        self.stream.flush()
        self.shown = True

    def done(self) -> None:
        """Clear the line (the command's own words follow)."""
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.shown = False
