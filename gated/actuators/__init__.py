"""The actuators (adapters of ``gated.site.ports.Actuator``) and the one mapping from a config
``type`` to an adapter.

A backend is chosen by name and never silently replaced: a ``gpio`` gate on a
machine with no GPIO fails at start instead of quietly running on mock pins.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gated.book.config import (
    ActuatorConfig,
    DtmfActuatorConfig,
    GpioActuatorConfig,
    MockActuatorConfig,
    MqttActuatorConfig,
)
from gated.core.errors import ActuatorError
from gated.site.ports import Actuator

if TYPE_CHECKING:
    from gated.mqtt.link import MqttLink


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
