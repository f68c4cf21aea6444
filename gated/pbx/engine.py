"""The call-engine port: what gated needs of a SIP engine, and what it hears from it.

The engine (baresip, driven over its control port) does the SIP: registration,
NAT, codecs, RTP and the digits. It tells of calls as events and takes a few
commands; every decision stays with ``gated.pbx.sip``, which speaks only this
port. A fake engine in the tests plays the engine's part.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal, Protocol

# What a call can be played besides a call box's tone: the site's prompt (or a
# short tone when it has none), and the prompt after a refused code.
Sound = Literal["prompt", "wrong", "quiet"]


@dataclass(frozen=True, slots=True)
class Incoming:
    """A call rings. ``call`` is the engine's id of it (the SIP Call-ID)."""

    call: str
    caller: str  # the caller's URI, as the engine saw it (From)
    called: str  # the URI of the account or number that was called
    # Where the INVITE came from, when the engine can say; a trunk's allowlist
    # refuses a call whose source it cannot tell.
    source: str | None = None


@dataclass(frozen=True, slots=True)
class Digit:
    """A key pressed in a call (RFC 4733 telephone-event or SIP INFO)."""

    call: str
    digit: str


@dataclass(frozen=True, slots=True)
class Ended:
    """The call is gone: hung up by either side, or lost with the engine."""

    call: str


Event = Incoming | Digit | Ended


class CallEngine(Protocol):
    """A SIP engine as gated drives it; each command acts on one call by its id."""

    # Whether send_tones works: a call box's gate opens only from an engine that can.
    plays_tones: bool

    def events(self) -> AsyncIterator[Event]: ...

    async def answer(self, call: str) -> None: ...

    async def play(self, call: str, sound: Sound) -> None: ...

    async def send_tones(self, call: str, digits: str) -> None:
        """Play DTMF ``digits`` into the call (a call box opens on them)."""

    async def transfer(self, call: str, number: str) -> None: ...

    async def hang_up(self, call: str) -> None: ...
