"""The Actuator port and the one mapping from a config ``type`` to an adapter.

A backend is chosen by name and never silently replaced: a ``gpio`` gate on a
machine with no GPIO fails at start instead of quietly running on mock pins.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from gated.config import (
    ActuatorConfig,
    DtmfActuatorConfig,
    GpioActuatorConfig,
    MockActuatorConfig,
    MqttActuatorConfig,
)
from gated.errors import ActuatorError

if TYPE_CHECKING:
    from gated.mqtt import MqttLink


@runtime_checkable
class Actuator(Protocol):
    """Opens one gate. ``open`` returns once the command is issued."""

    gate: str

    async def open(self) -> str:
        """Issue the open command; return a short result word, raise ActuatorError."""
        ...

    async def close(self) -> None:
        """Leave the actuator safe (relay off) and release it."""
        ...


def build(gate: str, config: ActuatorConfig, *, mock_factory: Any = None,
          mqtt: MqttLink | None = None) -> Actuator:
    """Make the adapter ``config`` names. ``mock_factory`` is a gpiozero MockFactory."""
    if isinstance(config, MockActuatorConfig):
        from gated.actuators.relay import RelayActuator

        if mock_factory is None:
            from gpiozero.pins.mock import MockFactory

            mock_factory = MockFactory()
        return RelayActuator.create(gate, config, pin_factory=mock_factory)
    if isinstance(config, GpioActuatorConfig):
        from gated.actuators.relay import RelayActuator

        return RelayActuator.create(gate, config, pin_factory=None)
    if isinstance(config, MqttActuatorConfig):
        from gated.actuators.mqtt import MqttActuator

        if mqtt is None:
            raise ActuatorError(f"gate {gate!r}: an mqtt actuator needs the [mqtt] connection")
        return MqttActuator(gate, config, mqtt)
    if isinstance(config, DtmfActuatorConfig):
        from gated.actuators.dtmf import DtmfActuator

        return DtmfActuator(gate, config)
    raise ActuatorError(f"gate {gate!r}: no actuator type {type(config).__name__}")
