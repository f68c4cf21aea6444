from __future__ import annotations

import asyncio
import time

import pytest
from gpiozero.pins.mock import MockFactory, MockPin
from structlog.testing import capture_logs

from gated.actuators import build
from gated.actuators.relay import RelayActuator
from gated.book.config import GpioActuatorConfig, MockActuatorConfig
from gated.core.errors import ActuatorError


def states(pin: object) -> list[bool]:
    return [bool(s.state) for s in pin.states]  # type: ignore[attr-defined]


async def wait_released(relay: RelayActuator, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while relay.energised and time.monotonic() < deadline:  # noqa: ASYNC110 (a pin has no event)
        await asyncio.sleep(0.005)


async def test_active_high_pulse_history_and_length(mock_factory: MockFactory) -> None:
    """An active-high relay goes exactly off, on, off, for the configured pulse."""
    pin = mock_factory.pin(17)
    relay = build("barrier", MockActuatorConfig(pin=17, active_high=True, pulse=0.2),
                  mock_factory=mock_factory)
    assert isinstance(relay, RelayActuator)
    assert await relay.open() == "pulsed"
    assert pin.state  # energised when open() returns: the ACK goes out now
    await wait_released(relay)
    assert states(pin) == [False, True, False]
    # A mock pin's timestamp is the time since its previous change.
    assert 0.18 <= pin.states[2].timestamp <= 0.6
    await relay.close()


async def test_active_low_pulse_is_the_inverse(mock_factory: MockFactory) -> None:
    """An active-low relay idles high and pulses low."""
    pin = mock_factory.pin(27)
    relay = build("door", MockActuatorConfig(pin=27, active_high=False, pulse=0.1),
                  mock_factory=mock_factory)
    # The mock pin starts low before gpiozero drives it to the idle (high) level.
    assert states(pin) == [False, True]
    await relay.open()
    await wait_released(relay)
    assert states(pin)[1:] == [True, False, True]
    await relay.close()


async def test_second_open_during_a_pulse_joins_it(mock_factory: MockFactory) -> None:
    """A second open mid-pulse makes no new edge and does not extend the pulse."""
    pin = mock_factory.pin(17)
    relay = build("barrier", MockActuatorConfig(pin=17, pulse=0.3), mock_factory=mock_factory)
    assert await relay.open() == "pulsed"
    await asyncio.sleep(0.1)
    assert await relay.open() == "joined"
    await wait_released(relay)
    assert states(pin) == [False, True, False]
    assert pin.states[2].timestamp < 0.3 + 0.15  # on for one pulse, not two
    # After the pulse, a new open is a new pulse.
    assert await relay.open() == "pulsed"
    await wait_released(relay)
    assert states(pin) == [False, True, False, True, False]
    await relay.close()


async def test_close_mid_pulse_turns_the_relay_off(mock_factory: MockFactory) -> None:
    """Shutting down during a pulse releases the relay at once."""
    pin = mock_factory.pin(17)
    relay = build("barrier", MockActuatorConfig(pin=17, pulse=5.0), mock_factory=mock_factory)
    await relay.open()
    await relay.close()
    assert states(pin) == [False, True, False]
    with pytest.raises(ActuatorError):
        await relay.open()


def test_gpio_type_refuses_mock_pins(mock_factory: MockFactory) -> None:
    """type = "gpio" never runs on mock pins, even if gpiozero would pick them."""
    with pytest.raises(ActuatorError, match="mock"):
        RelayActuator.create("barrier", GpioActuatorConfig(pin=17), pin_factory=mock_factory)


def test_pin_in_use_is_a_clear_error(mock_factory: MockFactory) -> None:
    """Two gates on one pin fail at start with the gate and pin named."""
    first = build("barrier", MockActuatorConfig(pin=17), mock_factory=mock_factory)
    with pytest.raises(ActuatorError, match=r"gate 'door': cannot use pin 17"):
        build("door", MockActuatorConfig(pin=17), mock_factory=mock_factory)
    assert isinstance(first, RelayActuator)
    first.shutdown()


class FlakyPin(MockPin):
    """A pin whose first attempt to go low fails, like a glitching GPIO driver."""

    failures = 1

    def _set_state(self, value: bool) -> None:
        if not value and self.failures and self.function == "output" and self.state:
            self.failures -= 1
            raise OSError("simulated GPIO write failure")
        super()._set_state(value)


async def test_a_failed_release_is_retried_until_the_pin_is_off(
        mock_factory: MockFactory) -> None:
    """An exception while releasing the relay does not leave it on."""
    pin = mock_factory.pin(17, pin_class=FlakyPin)
    relay = build("barrier", MockActuatorConfig(pin=17, pulse=0.05), mock_factory=mock_factory)
    with capture_logs() as logs:
        await relay.open()
        await wait_released(relay)
    assert states(pin) == [False, True, False]
    assert [e["event"] for e in logs] == ["relay on", "relay did not release", "relay off"]
    await relay.close()


async def test_pulses_start_no_thread_of_their_own(mock_factory: MockFactory,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Pulses after the first start no thread: the relay's one releaser ends each of them
    (a thread per pulse made the loop wait for it to start, and handed the interpreter
    lock to and fro at its start and end), and still exactly off, on, off each time."""
    import threading

    pin = mock_factory.pin(17)
    relay = build("barrier", MockActuatorConfig(pin=17, pulse=0.02), mock_factory=mock_factory)
    assert await relay.open() == "pulsed"  # the first starts the releaser
    await wait_released(relay)
    started: list[str] = []
    real_start = threading.Thread.start

    def counting_start(thread: threading.Thread) -> None:
        started.append(thread.name)
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", counting_start)
    for _ in range(5):
        assert await relay.open() == "pulsed"
        await wait_released(relay)
    monkeypatch.undo()
    await relay.close()
    assert started == []
    assert states(pin) == [False] + [True, False] * 6
