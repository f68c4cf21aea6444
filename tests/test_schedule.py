"""Schedule parsing and matching, with hypothesis against a brute-force model."""

from __future__ import annotations

import contextlib
import datetime as dt

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gated.core.schedule import DAYS, ScheduleError, parse_schedule, parse_window

MONDAY = dt.datetime(2026, 11, 23)  # a Monday


def model(days: set[int], start: int, end: int, when: dt.datetime) -> bool:
    """Walk back from ``when`` to the last start of the window and see if it still runs."""
    minute = when.hour * 60 + when.minute
    length = (end - start) % (24 * 60) or 24 * 60
    for back_days in (0, 1):
        day = (when.weekday() - back_days) % 7
        since_start = minute + back_days * 24 * 60 - start
        if day in days and 0 <= since_start < length:
            return True
    return False


windows = st.builds(
    lambda first, span, start, end: (first, span, start, end),
    st.integers(0, 6), st.integers(0, 6), st.integers(0, 24 * 60 - 1), st.integers(1, 24 * 60),
).filter(lambda w: w[2] != w[3])


def spec(first: int, span: int, start: int, end: int) -> str:
    last = (first + span) % 7
    days = DAYS[first] if span == 0 else f"{DAYS[first]}-{DAYS[last]}"
    return f"{days} {start // 60:02d}:{start % 60:02d}-{end // 60:02d}:{end % 60:02d}"


@given(windows, st.integers(0, 7 * 24 * 60 - 1))
def test_window_matches_the_model(window: tuple[int, int, int, int], minute: int) -> None:
    """Any window, any minute of the week: parse + contains agrees with the model."""
    first, span, start, end = window
    days = {(first + i) % 7 for i in range(span + 1)}
    when = MONDAY + dt.timedelta(minutes=minute)
    parsed = parse_window(spec(*window))
    assert parsed.contains(when) == model(days, start, end, when)


@given(st.text(max_size=40))
def test_any_text_parses_or_raises_schedule_error(text: str) -> None:
    """Garbage never raises anything but ScheduleError (which the config names)."""
    with contextlib.suppress(ScheduleError):
        parse_window(text)


@pytest.mark.parametrize("text", ["mon-fri 07:00", "funday 07:00-08:00", "mon 25:00-26:00",
                                  "mon 07:00-07:00", "mon 07:60-08:00", "mon 24:00-01:00", ""])
def test_bad_windows_are_refused(text: str) -> None:
    """Typical mistakes are refused with a message."""
    with pytest.raises(ScheduleError):
        parse_window(text)


def test_day_lists_ranges_and_wrap() -> None:
    """Days take lists, ranges, wrapping ranges, long names and daily."""
    assert parse_window("mon,wed,fri 08:00-09:00").days == {0, 2, 4}
    assert parse_window("sat-mon 08:00-09:00").days == {5, 6, 0}
    assert parse_window("Tuesday 08:00-09:00").days == {1}
    assert parse_window("daily 00:00-24:00").days == set(range(7))
    assert parse_schedule(["mon 08:00-09:00", "tue 10:00-11:00"]).contains(
        MONDAY + dt.timedelta(days=1, hours=10, minutes=30))
