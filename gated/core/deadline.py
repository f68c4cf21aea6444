"""A call's one deadline: every wait of a call ends at the call's answer deadline.

A call waits up to three times (for its use to be durable, for the actuator,
for its entry to be durable) and all three end at the same instant. One
deadline, armed when the call starts waiting and closed when it is done,
bounds them all; an ``asyncio.timeout`` per wait put three timers on the loop
per call.

Nor does each call arm a timer of its own: deadlines that end within the same
``SLOT`` share one. Under load a timer per call meant thousands on the loop's
heap, each armed, cancelled and left there until its time came; now a slot's
timer is armed once and never cancelled, and a deadline is a set insertion.
A deadline fires at most one slot late.
"""

from __future__ import annotations

import asyncio
import math
import weakref
from types import TracebackType

SLOT = 0.005  # seconds


class _Slots:
    """The shared timers of one loop: open deadlines by the slot they end in."""

    __slots__ = ("open",)

    def __init__(self) -> None:
        self.open: dict[int, set[Deadline]] = {}

    def add(self, deadline: Deadline) -> int:
        slot = math.ceil(deadline.when / SLOT)
        members = self.open.get(slot)
        if members is None:
            members = self.open[slot] = set()
            # Never before ``when``: the slot's end is at or after it.
            deadline._loop.call_at(max(slot * SLOT, deadline.when), self._fire, slot)
        members.add(deadline)
        return slot

    def discard(self, deadline: Deadline, slot: int) -> None:
        members = self.open.get(slot)
        if members is not None:
            members.discard(deadline)

    def _fire(self, slot: int) -> None:
        for deadline in self.open.pop(slot, ()):
            deadline._expire()


_by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Slots] = (
    weakref.WeakKeyDictionary())
# The last loop's, asked for on every call.
_last: tuple[weakref.ref[asyncio.AbstractEventLoop], _Slots] | None = None


def _slots(loop: asyncio.AbstractEventLoop) -> _Slots:
    global _last
    if _last is not None and _last[0]() is loop:
        return _last[1]
    slots = _by_loop.get(loop)
    if slots is None:
        slots = _by_loop[loop] = _Slots()
    _last = (weakref.ref(loop), slots)
    return slots


class Deadline:
    """The instant ``when`` (loop time), enforced by its slot's shared timer.

    ``with deadline:`` bounds one wait as ``async with asyncio.timeout_at(when)``
    does: TimeoutError when the time runs out during the wait, and at once,
    before the wait starts, when it has already. ``close()`` it when the call is
    done. The timer cancels the task whatever it is waiting for, so a wait
    outside ``with`` is ended too: ``overran()`` then tells that cancellation
    from anyone else's.
    """

    __slots__ = ("_base", "_cancelled", "_loop", "_slot", "_slots", "_task", "when")

    def __init__(self, when: float) -> None:
        self._loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("a Deadline bounds the waits of a task")
        self._task = task
        self.when = when
        # Cancellations asked of the task before now are not this deadline's.
        self._base = task.cancelling()
        self._cancelled = False
        self._slots = _slots(self._loop)
        # None once it has fired or the call is done.
        self._slot: int | None = self._slots.add(self)

    def _expire(self) -> None:
        # A timer runs only while its task is suspended: the task is waiting.
        self._slot = None
        self._cancelled = True
        self._task.cancel()

    def __enter__(self) -> Deadline:
        if self._slot is None or self._loop.time() >= self.when:
            raise TimeoutError
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.overran() and exc_type is asyncio.CancelledError:
            raise TimeoutError from exc

    def overran(self) -> bool:
        """Whether the timer cancelled the task and no one else did; the cancel is taken back."""
        if not self._cancelled:
            return False
        self._cancelled = False
        return self._task.uncancel() <= self._base

    def close(self) -> None:
        """The call is done: it leaves its slot."""
        if self._slot is not None:
            self._slots.discard(self, self._slot)
            self._slot = None
