"""Bounded guessing: per-caller and site-wide failure limits, growing locks.

Caller ids can be spoofed, so the per-caller limit only slows a careless
guesser down; the site-wide limit is what bounds an attack. Each repeated
lock doubles in length up to a cap, and a quiet period forgets the history.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

SITE = "*site*"
# Bucket for callers that withhold their number: they share one lock.
WITHHELD = "*withheld*"
# Stop remembering callers beyond this many; the oldest quiet ones go first.
MAX_TRACKED = 50_000


@dataclass(frozen=True, slots=True)
class Policy:
    caller_failures: int = 5
    site_failures: int = 30
    site_window: float = 3600.0
    lock_seconds: float = 300.0
    max_lock_seconds: float = 86400.0

    def lock_length(self, locks: int) -> float:
        return float(min(self.lock_seconds * 2 ** max(locks - 1, 0), self.max_lock_seconds))


@dataclass(slots=True)
class Strikes:
    failures: int = 0
    locks: int = 0
    locked_until: float = 0.0
    last: float = 0.0


@dataclass(frozen=True, slots=True)
class LockEvent:
    kind: str  # "caller_locked" or "site_locked"
    key: str  # the caller number, or SITE
    until: float
    seconds: float


@dataclass(slots=True)
class Lockout:
    policy: Policy
    callers: dict[str, Strikes] = field(default_factory=dict)
    site: Strikes = field(default_factory=Strikes)
    # Times of the latest site-wide failures, at most site_failures of them.
    recent: deque[float] = field(default_factory=deque)
    # Keys whose lock was announced and whose end is still to be announced.
    announced: set[str] = field(default_factory=set)

    def caller_locked(self, caller: str | None, now: float) -> bool:
        strikes = self.callers.get(caller or WITHHELD)
        return strikes is not None and strikes.locked_until > now

    def site_locked(self, now: float) -> bool:
        return self.site.locked_until > now

    def failure(self, caller: str | None, now: float) -> tuple[list[str], list[LockEvent]]:
        """Count one failure; return the keys that changed and any locks begun."""
        key = caller or WITHHELD
        changed = [key, SITE]
        events: list[LockEvent] = []
        strikes = self.callers.get(key)
        if strikes is None:
            if len(self.callers) >= MAX_TRACKED:
                # The forgotten keys change too: the store forgets them as well.
                changed += self._forget(now)
            strikes = self.callers[key] = Strikes()
        self._decay(strikes, now)
        strikes.failures += 1
        strikes.last = now
        if strikes.failures >= self.policy.caller_failures:
            events.append(self._lock(strikes, "caller_locked", key, now))

        self._decay(self.site, now)
        self.site.last = now
        self.recent.append(now)
        while self.recent and now - self.recent[0] > self.policy.site_window:
            self.recent.popleft()
        self.site.failures = len(self.recent)
        if len(self.recent) >= self.policy.site_failures:
            self.recent.clear()
            events.append(self._lock(self.site, "site_locked", SITE, now))
        return changed, events

    def success(self, caller: str | None) -> list[str]:
        """A granted code clears the caller's failures (not the site's)."""
        key = caller or WITHHELD
        if key in self.callers and caller is not None:
            del self.callers[key]
            return [key]
        return []

    def clear(self, key: str) -> bool:
        """Staff lifted this lock by hand: forget the key's failures and locks.

        Its next lock starts short again. The end is announced as any other
        (``ended``). False when the key was not locked.
        """
        strikes = self.strikes(key)
        if strikes is None:
            return False
        if key == SITE:
            self.site = Strikes()
            self.recent.clear()
        else:
            del self.callers[key]
        return True

    def _lock(self, strikes: Strikes, kind: str, key: str, now: float) -> LockEvent:
        strikes.locks += 1
        strikes.failures = 0
        seconds = self.policy.lock_length(strikes.locks)
        strikes.locked_until = now + seconds
        self.announced.add(key)
        return LockEvent(kind, key, strikes.locked_until, seconds)

    def ended(self, now: float) -> list[str]:
        """Keys whose lock has run out since the last call (for unlock events)."""
        done = []
        for key in list(self.announced):
            strikes = self.strikes(key)
            if strikes is None or strikes.locked_until <= now:
                self.announced.discard(key)
                done.append(key)
        return done

    def _decay(self, strikes: Strikes, now: float) -> None:
        # A long quiet spell after the last failure and lock forgets the history,
        # the same test the store uses to prune and to skip stale rows at start.
        if max(strikes.last, strikes.locked_until) < now - self.policy.max_lock_seconds:
            strikes.locks = 0
            strikes.failures = 0

    def _forget(self, now: float) -> list[str]:
        quiet = sorted(
            (s.last, k) for k, s in self.callers.items() if s.locked_until <= now
        )
        forgotten = [key for _, key in quiet[: max(len(quiet) // 2, 1)]]
        for key in forgotten:
            del self.callers[key]
        return forgotten

    def strikes(self, key: str) -> Strikes | None:
        return self.site if key == SITE else self.callers.get(key)

    def restore(self, key: str, strikes: Strikes, recent: list[float] | None = None) -> None:
        if strikes.locked_until:
            self.announced.add(key)
        if key == SITE:
            self.site = strikes
            self.recent = deque(recent or ())
        else:
            self.callers[key] = strikes


YEAR = 365 * 86400.0


def guesses_per_year(policy: Policy) -> int:
    """The most wrong codes a guesser gets in a year, however many numbers they spoof.

    Worst case: every site-wide allowance is spent at once, each lock is
    waited out, and the next allowance spent the moment it ends.
    """
    elapsed, guesses, locks = 0.0, 0, 0
    while elapsed < YEAR:
        guesses += policy.site_failures
        locks += 1
        elapsed += policy.lock_length(locks)
    return guesses


def hit_chance(guesses: int, valid_codes: int, digits: int) -> float:
    """Chance that ``guesses`` distinct random guesses find one of ``valid_codes``."""
    space = 10**digits
    miss = 1.0
    for n in range(min(guesses, space)):
        miss *= max(space - valid_codes - n, 0) / (space - n)
        if miss == 0.0:
            break
    return 1.0 - miss
