"""Weekly time windows in the site's time zone: ``"mon-fri 07:00-18:00"``.

Windows are wall-clock times, so they follow DST by construction: a window
that opens at 07:00 opens at 07:00 local time on both sides of a change. An
overnight window (``"fri 22:00-02:00"``) starts on the named day and ends on
the next. ``24:00`` ends a window at midnight.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_WINDOW = re.compile(
    r"^\s*(?P<days>[a-z,\-*]+)\s+(?P<start>\d{1,2}:\d{2})\s*-\s*(?P<end>\d{1,2}:\d{2})\s*$"
)


class ScheduleError(ValueError):
    """A schedule window could not be parsed."""


@dataclass(frozen=True, slots=True)
class Window:
    days: frozenset[int]  # 0 = Monday, as datetime.weekday()
    start: int  # minutes after midnight
    end: int  # minutes after midnight; <= start means it ends the next day

    def contains(self, local: dt.datetime) -> bool:
        minute = local.hour * 60 + local.minute
        day = local.weekday()
        if self.start < self.end:
            return day in self.days and self.start <= minute < self.end
        # Overnight: the evening part on a listed day, the morning part on
        # the day after a listed day.
        return (day in self.days and minute >= self.start) or (
            (day - 1) % 7 in self.days and minute < self.end
        )


@dataclass(frozen=True, slots=True)
class Schedule:
    windows: tuple[Window, ...]

    def contains(self, local: dt.datetime) -> bool:
        return any(window.contains(local) for window in self.windows)


def parse_schedule(specs: list[str] | tuple[str, ...]) -> Schedule:
    return Schedule(tuple(parse_window(spec) for spec in specs))


def parse_window(spec: str) -> Window:
    match = _WINDOW.match(spec.lower())
    if not match:
        raise ScheduleError(f"expected e.g. 'mon-fri 07:00-18:00', got {spec!r}")
    start = _minutes(match["start"], spec)
    end = _minutes(match["end"], spec)
    if start == end:
        raise ScheduleError(f"window {spec!r} is empty")
    if start >= 24 * 60:
        raise ScheduleError(f"window {spec!r} starts after midnight")
    return Window(_days(match["days"], spec), start, end)


def _minutes(text: str, spec: str) -> int:
    hours, minutes = (int(part) for part in text.split(":"))
    if hours > 24 or minutes > 59 or (hours == 24 and minutes):
        raise ScheduleError(f"no such time {text!r} in {spec!r}")
    return hours * 60 + minutes


def _days(text: str, spec: str) -> frozenset[int]:
    if text in ("*", "daily"):
        return frozenset(range(7))
    days: set[int] = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        a = _day(first, spec)
        b = _day(last, spec) if last else a
        # Ranges wrap: "sat-mon" is Saturday, Sunday, Monday.
        days.update((a + step) % 7 for step in range((b - a) % 7 + 1))
    return frozenset(days)


def _day(name: str, spec: str) -> int:
    for index, day in enumerate(DAYS):
        if name in (day, _LONG[index]):
            return index
    raise ScheduleError(f"unknown day {name!r} in {spec!r}; use mon tue wed thu fri sat sun")


_LONG = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
