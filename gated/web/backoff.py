"""Login backoff: per account and per address, growing, and forgotten after a quiet hour.

Never a permanent ban: the owner whose name a guesser types waits at most
``MAX_WAIT`` after a failure, never longer.
"""

from __future__ import annotations

from dataclasses import dataclass

FREE_FAILURES = 5
FIRST_WAIT = 1.0
MAX_WAIT = 300.0
QUIET = 3600.0
# Addresses remembered at most: past it the quietest are forgotten first.
MAX_KEYS = 10_000


@dataclass(slots=True)
class _Strikes:
    count: int
    last: float
    until: float


class Backoff:
    def __init__(self) -> None:
        self._keys: dict[str, _Strikes] = {}

    def wait(self, keys: list[str], now: float) -> float:
        """Seconds before any of ``keys`` may try again (0: now)."""
        longest = 0.0
        for key in keys:
            strikes = self._keys.get(key)
            if strikes is None:
                continue
            if now - strikes.last >= QUIET:
                del self._keys[key]
                continue
            longest = max(longest, strikes.until - now)
        return longest

    def failed(self, keys: list[str], now: float) -> None:
        for key in keys:
            strikes = self._keys.get(key)
            if strikes is None or now - strikes.last >= QUIET:
                strikes = self._keys[key] = _Strikes(0, now, now)
            strikes.count += 1
            strikes.last = now
            over = strikes.count - FREE_FAILURES
            if over >= 0:
                strikes.until = now + min(MAX_WAIT, FIRST_WAIT * 2 ** min(over, 20))
        if len(self._keys) > MAX_KEYS:
            for key, _ in sorted(self._keys.items(), key=lambda kv: kv[1].last)[
                    :len(self._keys) - MAX_KEYS]:
                del self._keys[key]

    def succeeded(self, keys: list[str]) -> None:
        for key in keys:
            self._keys.pop(key, None)
