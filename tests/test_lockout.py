"""Bounded guessing: the pure lockout, and 10,000 guesses through the real webhook."""

from __future__ import annotations

import asyncio
from typing import Any

from structlog.testing import capture_logs

from gated.core.lockout import SITE, Lockout, Policy, guesses_per_year, hit_chance
from gated.site.store import read_entries

from .helpers import BARRIER, RESIDENT, FakeClock


def test_caller_lock_grows_and_success_clears() -> None:
    """Five failures lock a caller for 300 s, the next lock 600 s; a success forgets them."""
    lockout = Lockout(Policy(caller_failures=5, site_failures=1000, lock_seconds=300))
    caller = "+31600000001"
    for n in range(4):
        _, events = lockout.failure(caller, 1000.0 + n)
        assert not events
    _, events = lockout.failure(caller, 1004.0)
    assert [(e.kind, e.seconds) for e in events] == [("caller_locked", 300.0)]
    assert lockout.caller_locked(caller, 1303.9)
    assert not lockout.caller_locked(caller, 1304.0)
    for n in range(5):
        _, events = lockout.failure(caller, 2000.0 + n)
    assert [(e.kind, e.seconds) for e in events] == [("caller_locked", 600.0)]
    lockout.success(caller)
    assert lockout.strikes(caller) is None


def test_site_lock_counts_within_the_window_only() -> None:
    """The site locks on site_failures within site_window, not on failures spread wider."""
    lockout = Lockout(Policy(caller_failures=1000, site_failures=3, site_window=60))
    lockout.failure("+31600000001", 0.0)
    lockout.failure("+31600000002", 30.0)
    _, events = lockout.failure("+31600000003", 61.0)  # the first has left the window
    assert not events
    _, events = lockout.failure("+31600000004", 62.0)
    assert [e.kind for e in events] == ["site_locked"]
    assert lockout.site_locked(63.0)


def test_lock_length_is_capped_and_history_decays() -> None:
    """Locks double up to max_lock_seconds; a long quiet spell forgets the repeats."""
    policy = Policy(lock_seconds=300, max_lock_seconds=3600)
    assert [policy.lock_length(n) for n in range(1, 7)] == [300, 600, 1200, 2400, 3600, 3600]
    lockout = Lockout(Policy(caller_failures=1, site_failures=1000, lock_seconds=10,
                             max_lock_seconds=100))
    lockout.failure("a", 0.0)
    lockout.failure("a", 20.0)
    assert lockout.strikes("a").locks == 2  # type: ignore[union-attr]
    _, events = lockout.failure("a", 1000.0)  # quiet for longer than the cap
    assert [e.seconds for e in events] == [10.0]


def test_failures_short_of_a_lock_are_forgotten_after_a_quiet_spell() -> None:
    """A quiet spell forgets failures that never locked, as it forgets locks: the lockout
    then agrees with a restart, which no longer loads (or keeps) such stale strikes."""
    lockout = Lockout(Policy(caller_failures=3, site_failures=1000, max_lock_seconds=100))
    lockout.failure("a", 0.0)
    lockout.failure("a", 1.0)
    _, events = lockout.failure("a", 200.0)
    assert not events
    assert lockout.strikes("a").failures == 1  # type: ignore[union-attr]


def test_withheld_callers_share_one_bucket() -> None:
    """Callers without a number cannot dodge the per-caller limit by hiding it."""
    lockout = Lockout(Policy(caller_failures=2, site_failures=1000))
    lockout.failure(None, 0.0)
    lockout.failure(None, 1.0)
    assert lockout.caller_locked(None, 2.0)


def test_unlock_is_reported_once() -> None:
    """ended() reports a lock's end once, for the unlock event."""
    lockout = Lockout(Policy(caller_failures=1, site_failures=1))
    lockout.failure("a", 0.0)
    assert lockout.ended(1.0) == []
    assert sorted(lockout.ended(400.0)) == [SITE, "a"]
    assert lockout.ended(500.0) == []


def test_guessing_bound_for_the_defaults() -> None:
    """docs/security.md's figures: 11,190 guesses a year at the default limits."""
    guesses = guesses_per_year(Policy())
    assert guesses == 11_190
    assert round(hit_chance(guesses, 10, 6), 3) == 0.106
    assert round(hit_chance(guesses, 100, 8), 4) == 0.0111


GUESSING = """
[lockout]
caller_failures = 5
site_failures = 30
site_window = 3600
lock_seconds = 300
"""


async def test_ten_thousand_guesses_from_a_thousand_numbers_open_nothing(
        start_daemon: Any) -> None:
    """10,000 wrong codes from 1,000 numbers: zero opens, the site locked at the 30th."""
    clock = FakeClock()
    running = await start_daemon(GUESSING, clock=clock)
    answers: list[str] = []
    for batch in range(100):
        calls = [running.get(code=f"{(batch * 100 + n) * 7919 % 1000000:06d}", did=BARRIER,
                             callerid=f"+316{(batch * 100 + n) % 1000:08d}")
                 for n in range(100)]
        answers += [body for _, body in await asyncio.gather(*calls)]
    assert len(answers) == 10_000
    assert set(answers) == {"status=NAK"}
    assert [s.state for s in running.pin(17).states] == [False]
    entries = list(reversed(read_entries(running.daemon.gatekeeper.store.path, limit=20_000)))
    reasons = [e.reason for e in entries]
    first_lock = reasons.index("locked_out")
    assert first_lock == 30  # the site-wide limit, not the per-caller one
    assert set(reasons[:30]) == {"unknown_code"}
    assert set(reasons[30:]) == {"locked_out"}

    # A correct code during the lock is refused too, and says why.
    assert await running.get(code="471123", did=BARRIER, callerid="+31699999999") == (
        200, "status=NAK")
    # A resident on the caller list still opens by calling.
    assert await running.get(code="", did=BARRIER, callerid=RESIDENT) == (200, "status=ACK")
    # After the lock runs out, the right code opens again.
    clock.advance(301)
    assert await running.get(code="471123", did=BARRIER, callerid="+31699999999") == (
        200, "status=ACK&callername=Welcome&destination=201")


async def test_lock_survives_a_restart_and_logs_lock_events(start_daemon: Any) -> None:
    """A locked site stays locked across a restart; the lock is an alarm in the log."""
    clock = FakeClock()
    running = await start_daemon(GUESSING, clock=clock)
    with capture_logs() as logs:
        for n in range(30):
            await running.get(code=f"{n:06d}", did=BARRIER, callerid=f"+3161000{n:04d}")
    assert [e["event"] for e in logs if e.get("alarm")] == ["site_locked"]
    await running.stop()
    again = await start_daemon(GUESSING, clock=clock)
    assert await again.get(code="471123", did=BARRIER, callerid="+31699999999") == (
        200, "status=NAK")
    (entry,) = read_entries(again.daemon.gatekeeper.store.path, limit=1)
    assert entry.reason == "locked_out"
