"""A relay on a GPIO pin (or a gpiozero mock pin), pulsed for a fixed time.

The pin is switched off by a thread of its own, not by the event loop: a
stalled loop must never leave a relay energised. One such thread per relay,
for the relay's life, waits for each pulse's end; a thread started per pulse
(threading.Timer) made the loop wait for it to start, and every start and end
handed the interpreter lock to and fro. A second open during a pulse joins
the running pulse: no new edge (a step-by-step barrier controller reads a
second edge as "stop") and no extension (the pulse length is a hard cap).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import structlog
from gpiozero import GPIOZeroError, OutputDevice
from gpiozero.pins.mock import MockFactory

from gated.book.config import GpioActuatorConfig, MockActuatorConfig
from gated.core.errors import ActuatorError
from gated.site import alarms

log = structlog.get_logger("gated.relay")

OFF_ATTEMPTS = 5


class RelayActuator:
    def __init__(self, gate: str, device: OutputDevice, pulse: float) -> None:
        self.gate = gate
        self.tones = ""
        self.pulse = pulse
        self._device = device
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        # When (time.monotonic) the running pulse ends; None: no pulse.
        self._ends: float | None = None
        self._closed = False
        # Started with the first pulse (a gate that never opens needs none),
        # then kept for the relay's life.
        self._releaser: threading.Thread | None = None

    @classmethod
    def create(cls, gate: str, config: GpioActuatorConfig | MockActuatorConfig,
               *, pin_factory: Any) -> RelayActuator:
        try:
            device = OutputDevice(config.pin, active_high=config.active_high,
                                  initial_value=False, pin_factory=pin_factory)
        except (GPIOZeroError, OSError, ValueError) as exc:
            raise ActuatorError(f"gate {gate!r}: cannot use pin {config.pin}: {exc}") from exc
        if isinstance(config, GpioActuatorConfig) and isinstance(device.pin_factory, MockFactory):
            device.close()
            raise ActuatorError(
                f"gate {gate!r}: type 'gpio' but gpiozero chose mock pins "
                "(GPIOZERO_PIN_FACTORY=mock?); use type = \"mock\" to mean that"
            )
        log.info("relay ready", gate=gate, pin=str(config.pin), active_high=config.active_high,
                 pulse=config.pulse, backend=type(device.pin_factory).__name__)
        return cls(gate, device, config.pulse)

    @property
    def energised(self) -> bool:
        return bool(self._device.value)

    async def open(self) -> str:
        return self.trigger()

    def trigger(self) -> str:
        """Energise the relay now and schedule its release; "joined" if already on."""
        with self._lock:
            if self._closed:
                raise ActuatorError(f"gate {self.gate!r}: relay is shut down")
            if self._ends is not None:
                return "joined"
            try:
                self._device.on()
            except (GPIOZeroError, OSError) as exc:
                self._safe_off()
                raise ActuatorError(f"gate {self.gate!r}: relay did not switch: {exc}") from exc
            self._ends = time.monotonic() + self.pulse
            if self._releaser is None:
                self._releaser = threading.Thread(target=self._release, daemon=True,
                                                  name=f"gated-relay-{self.gate}")
                self._releaser.start()
            self._changed.notify()
        log.info("relay on", gate=self.gate, pulse=self.pulse)
        return "pulsed"

    def _release(self) -> None:
        """The releaser thread: each pulse off at its end, until the relay shuts down."""
        while True:
            with self._lock:
                while not self._closed and (self._ends is None
                                            or self._ends > time.monotonic()):
                    self._changed.wait(None if self._ends is None
                                       else self._ends - time.monotonic())
                if self._closed:
                    return  # shutdown() switched it off
                self._ends = None
                self._safe_off()
            log.info("relay off", gate=self.gate)

    def _safe_off(self) -> None:
        # A relay left on is the one failure that must not happen: retry, and
        # if the pin still refuses, raise the alarm loudly.
        for attempt in range(1, OFF_ATTEMPTS + 1):
            try:
                self._device.off()
            except (GPIOZeroError, OSError) as exc:
                log.error("relay did not release", gate=self.gate, attempt=attempt,
                          error=str(exc))
                time.sleep(0.01 * attempt)
            else:
                return
        alarms.alarm(log, "relay_stuck", "relay did not release after retries",
                     level="critical", gate=self.gate)

    async def close(self) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        """Relay off and pin released; safe to call more than once."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._ends = None
            self._changed.notify()
            self._safe_off()
            pin = self._device.pin
            if isinstance(self._device.pin_factory, MockFactory) and pin is not None:
                # Mock pins are the only way to see what a relay did in a
                # daemon with no hardware: log the whole history at exit.
                log.info("mock pin history", gate=self.gate, pin=str(pin.info.name),
                         states=[bool(s.state) for s in pin.states])
            self._device.close()
