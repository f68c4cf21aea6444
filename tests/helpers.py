"""Test helpers: hand-written fakes and config builders (no unittest.mock)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import textwrap
import zoneinfo
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gated.core.errors import ActuatorError

TOKEN = "test-token-0123456789"
BARRIER = "+31501234567"
DOOR = "+31501234568"
RESIDENT = "+31612345678"
AMS = zoneinfo.ZoneInfo("Europe/Amsterdam")

# A single-use code on the barrier: "111111".
SINGLE_USE = """
[[codes]]
name = "Once"
code = "111111"
gates = ["barrier"]
max_uses = 1
"""

BASE = """
[site]
id = "test"
timezone = "Europe/Amsterdam"
region = "NL"

[server]
listen = "127.0.0.1:0"
path = "/voipgrid"
tokens = ["{token}", "second-token-abcdefgh"]
answer_deadline = {deadline}
allow_from = {allow_from}

[gates.barrier]
numbers = ["+31501234567"]
actuator = {{ type = "mock", pin = 17, active_high = true, pulse = {pulse} }}
callers = ["+31612345678"]

[gates.door]
numbers = ["0501234568"]
actuator = {{ type = "mock", pin = 27, active_high = false, pulse = {pulse} }}

[[codes]]
name = "Demo"
code = "471123"
gates = ["barrier", "door"]
callername = "Welcome"
destination = "201"

[[codes]]
name = "Barrier only"
code = "5555"
gates = ["barrier"]

[[codes]]
name = "Sales"
code = "9000"
callername = "Sales desk"
destination = "+31501234599"

[log]
path = "{store}"
"""


def config_text(tmp_path: Path, extra: str = "", *, pulse: float = 0.2,
                deadline: float = 3.0, allow_from: tuple[str, ...] = (),
                server: str = "") -> str:
    """The test site; ``server``: lines added to its [server] table."""
    store = tmp_path / "state" / "entries.sqlite3"
    base = BASE.format(token=TOKEN, pulse=pulse, deadline=deadline, store=store,
                       allow_from=json.dumps(list(allow_from)))
    if server:
        base = base.replace("[gates.barrier]", f"{server}\n\n[gates.barrier]", 1)
    return base + textwrap.dedent(extra)


def write_config(tmp_path: Path, extra: str = "", **kwargs: Any) -> Path:
    path = tmp_path / "gated.toml"
    path.write_text(config_text(tmp_path, extra, **kwargs))
    return path


def local(*args: int) -> float:
    """Epoch seconds of a wall-clock time in Amsterdam."""
    return dt.datetime(*args, tzinfo=AMS).timestamp()


@dataclass
class FakeClock:
    """A clock the test moves by hand."""

    wall: float = 1_790_000_000.0
    mono: float = 1000.0

    def now(self) -> float:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds


@dataclass
class FakeActuator:
    """An actuator that records opens and can be told to fail or to hang."""

    gate: str
    fail: bool = False
    delay: float = 0.0
    opened: list[float] = field(default_factory=list)
    closed: bool = False

    async def open(self) -> str:
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail:
            raise ActuatorError(f"gate {self.gate!r}: told to fail")
        self.opened.append(asyncio.get_running_loop().time())
        return "faked"

    async def close(self) -> None:
        self.closed = True


class TimerCountingLoop(asyncio.SelectorEventLoop):
    """An event loop that counts the timers put on it (call_later goes through call_at)."""

    timers = 0

    def call_at(self, when: float, callback: Callable[..., object], *args: Any,
                context: Any = None) -> asyncio.TimerHandle:
        self.timers += 1
        return super().call_at(when, callback, *args, context=context)
