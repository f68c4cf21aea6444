"""A call's one timer: every wait of a call ends at the call's answer deadline.

A call waits up to three times (for its use to be durable, for the actuator,
for its entry to be durable) and all three end at the same instant. One timer,
armed when the call starts waiting and cancelled when it is done, bounds them
all; an ``asyncio.timeout`` per wait put three timers on the loop per call.
"""

from __future__ import annotations

import asyncio
from types import TracebackType


class Deadline:
    """The instant ``when`` (loop time) and the one timer that enforces it.

    ``with deadline:`` bounds one wait as ``async with asyncio.timeout_at(when)``
    does: TimeoutError when the time runs out during the wait, and at once,
    before the wait starts, when it has already. ``close()`` it when the call is
    done. The timer cancels the task whatever it is waiting for, so a wait
    outside ``with`` is ended too: ``overran()`` then tells that cancellation
    from anyone else's.
    """

    __slots__ = ("_base", "_cancelled", "_handle", "_loop", "_task", "when")

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
        self._handle: asyncio.TimerHandle | None = self._loop.call_at(when, self._expire)

    def _expire(self) -> None:
        # A timer runs only while its task is suspended: the task is waiting.
        self._handle = None
        self._cancelled = True
        self._task.cancel()

    def __enter__(self) -> Deadline:
        if self._handle is None or self._loop.time() >= self.when:
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
        """The call is done: disarm the timer."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
