"""A fake call engine: the test rings, presses keys and hangs up; it records what gated says."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from gated.pbx.engine import Digit, Ended, Event, Incoming, Sound

from .broker import eventually


class FakeEngine:
    """The engine's side of the port, played by the test."""

    plays_tones = True

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Event | None] = asyncio.Queue()
        # What gated told the engine, in order: (command, call, argument).
        self.said: list[tuple[str, str, str]] = []

    # -- the caller's side, as the test plays it ----------------------------------------

    def ring(self, call: str, caller: str, called: str, source: str | None = "127.0.0.1:5070"
             ) -> None:
        self.queue.put_nowait(Incoming(call, caller, called, source))

    def press(self, call: str, keys: str) -> None:
        for key in keys:
            self.queue.put_nowait(Digit(call, key))

    def end(self, call: str) -> None:
        self.queue.put_nowait(Ended(call))

    def stop(self) -> None:
        self.queue.put_nowait(None)

    def commands(self, call: str) -> list[tuple[str, str]]:
        return [(command, arg) for command, c, arg in self.said if c == call]

    async def until(self, check: Callable[[FakeEngine], bool], within: float = 5.0) -> None:
        await eventually(lambda: check(self), within=within)

    async def said_last(self, call: str, command: str) -> None:
        """Wait until the call's last command is ``command`` (hang_up, transfer)."""
        await self.until(lambda e: bool(e.commands(call)) and e.commands(call)[-1][0] == command)

    # -- the port -----------------------------------------------------------------------

    async def events(self) -> AsyncIterator[Event]:
        while (event := await self.queue.get()) is not None:
            yield event

    async def answer(self, call: str) -> None:
        self.said.append(("answer", call, ""))

    async def play(self, call: str, sound: Sound) -> None:
        self.said.append(("play", call, sound))

    async def send_tones(self, call: str, digits: str) -> None:
        self.said.append(("tones", call, digits))

    async def transfer(self, call: str, number: str) -> None:
        self.said.append(("transfer", call, number))

    async def hang_up(self, call: str) -> None:
        self.said.append(("hang_up", call, ""))
