"""The gate-position input: a reed or limit switch that says whether a gate is open.

With a sensor a gate's open is confirmed: the answer waits (at most the
sensor's ``confirm`` seconds) until the switch shows the gate open, and says
``confirmed``, or ERR ``not_moved`` so the dial plan hands the caller to a
person. It also raises two alarms: ``held_open`` when the gate stays open
longer than ``held_open`` seconds, and ``forced_open`` when it opens with no
open command in the ``window`` seconds before.

Pin edges arrive on gpiozero's thread; everything else happens on the event
loop, so the state is only ever changed by one thread.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import structlog
from gpiozero import DigitalInputDevice, GPIOZeroError
from gpiozero.pins.mock import MockFactory

from gated.book.config import GpioSensorConfig, MockSensorConfig, SensorConfig
from gated.core.errors import ActuatorError, NotMoved
from gated.site import alarms
from gated.site.ports import Actuator

log = structlog.get_logger("gated.sensor")

HELD_OPEN = "held_open"
FORCED_OPEN = "forced_open"

# (gate, alarm, seconds the gate has been open)
AlarmHandler = Callable[[str, str, float], None]


class GateSensor:
    def __init__(self, gate: str, button: Any, config: SensorConfig,
                 on_alarm: AlarmHandler) -> None:
        self.gate = gate
        self.config = config
        self._button = button
        self._on_alarm = on_alarm
        self._loop = asyncio.get_running_loop()
        self._expect_until = float("-inf")
        self._opened_at = self._loop.time()
        self._settle: asyncio.TimerHandle | None = None
        self._held: asyncio.TimerHandle | None = None
        self._held_alarmed = False
        self._waiters: list[asyncio.Future[bool]] = []
        self._closed = False
        # Listen before the first read: an edge in between then still reaches
        # _sample (on the loop, after this), which reads the level again.
        button.when_activated = button.when_deactivated = self._edge
        self.is_open = self._read()
        if self.is_open:
            # Nobody knows why it is open: no forced_open, but the clock for
            # held_open starts now.
            log.warning("gate open at start", gate=gate)
            self._start_held_timer()

    @classmethod
    def create(cls, gate: str, config: SensorConfig, *, mock_factory: Any,
               on_alarm: AlarmHandler) -> GateSensor:
        factory: Any = None
        if isinstance(config, MockSensorConfig):
            factory = mock_factory if mock_factory is not None else MockFactory()
        try:
            # DigitalInputDevice is gpiozero's Button without the hold thread,
            # whose close() stalls for a second while the contact is closed.
            # No bounce_time: it drops edges, and a dropped last edge leaves
            # the state wrong; the settle timer below debounces instead.
            button = DigitalInputDevice(config.pin, pull_up=config.pull_up, bounce_time=None,
                                        pin_factory=factory)
        except (GPIOZeroError, OSError, ValueError) as exc:
            raise ActuatorError(
                f"gate {gate!r}: cannot use sensor pin {config.pin}: {exc}") from exc
        if isinstance(config, GpioSensorConfig) and isinstance(button.pin_factory, MockFactory):
            button.close()
            raise ActuatorError(f"gate {gate!r}: sensor type 'gpio' but gpiozero chose mock pins")
        sensor = cls(gate, button, config, on_alarm)
        log.info("sensor ready", gate=gate, pin=str(config.pin), open=sensor.is_open,
                 open_when=config.open_when, backend=type(button.pin_factory).__name__)
        return sensor

    def _read(self) -> bool:
        closed_contact = bool(self._button.is_active)
        return closed_contact if self.config.open_when == "contact_closed" else not closed_contact

    def _edge(self) -> None:
        # gpiozero's thread (or the caller's, for mock pins): hand over to the loop.
        with contextlib.suppress(RuntimeError):  # the loop is closing: nothing to do
            self._loop.call_soon_threadsafe(self._sample)

    def _sample(self) -> None:
        if self._closed:
            return
        if self.config.bounce == 0:
            self._update()
            return
        # Act only on a level that held for the bounce time.
        if self._settle is not None:
            self._settle.cancel()
        self._settle = self._loop.call_later(self.config.bounce, self._update)

    def _update(self) -> None:
        self._settle = None
        if self._closed:
            return
        now_open = self._read()
        if now_open == self.is_open:
            return
        self.is_open = now_open
        now = self._loop.time()
        if now_open:
            self._opened_at = now
            commanded = now <= self._expect_until
            log.info("gate opened", gate=self.gate, commanded=commanded)
            for waiter in self._waiters:
                if not waiter.done():
                    waiter.set_result(True)
            self._start_held_timer()
            if not commanded and self.config.forced_open:
                self._alarm(FORCED_OPEN, 0.0)
        else:
            if self._held is not None:
                self._held.cancel()
                self._held = None
            log.info("gate closed", gate=self.gate, open_seconds=round(now - self._opened_at, 1),
                     after_alarm=self._held_alarmed)
            self._held_alarmed = False

    def _start_held_timer(self) -> None:
        if self.config.held_open > 0:
            self._held = self._loop.call_later(self.config.held_open, self._held_too_long)

    def _held_too_long(self) -> None:
        self._held = None
        if self.is_open and not self._closed:
            self._held_alarmed = True
            self._alarm(HELD_OPEN, self._loop.time() - self._opened_at)

    def _alarm(self, kind: str, seconds: float) -> None:
        alarms.alarm(log, kind, gate=self.gate, open_seconds=round(seconds, 1))
        try:
            self._on_alarm(self.gate, kind, seconds)
        except Exception:  # recording is best effort; the log line above stands
            log.exception("alarm handler failed", gate=self.gate, alarm=kind)

    def expect(self) -> None:
        """An open command is going out: an opening in the next ``window`` s is ours."""
        self._expect_until = self._loop.time() + self.config.window

    async def wait_open(self, within: float) -> bool:
        """True as soon as the gate is open; False after ``within`` seconds."""
        if self.is_open:
            return True
        waiter: asyncio.Future[bool] = self._loop.create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(within):
                return await waiter
        except TimeoutError:
            return False
        finally:
            self._waiters.remove(waiter)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for handle in (self._settle, self._held):
            if handle is not None:
                handle.cancel()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(False)
        self._button.when_activated = self._button.when_deactivated = None
        self._button.close()


class ConfirmingActuator:
    """Wraps a gate's actuator: the open counts once the sensor shows it open."""

    def __init__(self, inner: Actuator, sensor: GateSensor) -> None:
        self.gate = inner.gate
        self.tones = inner.tones
        self.inner = inner
        self.sensor = sensor

    async def open(self) -> str:
        # Before the command: a gate that moves the instant the relay closes
        # must not read as forced open.
        self.sensor.expect()
        result = await self.inner.open()
        confirm = self.sensor.config.confirm
        if confirm == 0:
            return result
        if await self.sensor.wait_open(confirm):
            return "confirmed"
        raise NotMoved(f"gate {self.gate!r}: {result}, but the sensor saw no movement "
                       f"within {confirm}s")

    async def close(self) -> None:
        try:
            await self.inner.close()
        finally:
            self.sensor.close()
