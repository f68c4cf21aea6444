"""gated's own exceptions. Adapters translate library errors into these."""

from __future__ import annotations


class GatedError(Exception):
    """Base of every error gated raises on purpose."""


class ConfigError(GatedError):
    """The configuration is invalid; the message names the key path and line."""

    def __init__(self, message: str, *, path: str = "", line: int | None = None,
                 file: str = "") -> None:
        self.path = path
        self.line = line
        self.file = file
        self.detail = message
        where = file
        if line is not None:
            where = f"{where}:{line}" if where else f"line {line}"
        prefix = ": ".join(p for p in (where, path) if p)
        super().__init__(f"{prefix}: {message}" if prefix else message)


class NumberError(GatedError):
    """A phone number could not be understood."""


class ActuatorError(GatedError):
    """An actuator could not carry out an open command."""

    reason = "actuator_failed"


class ActuatorTimeout(ActuatorError):
    """An actuator did not confirm in time."""

    reason = "actuator_timeout"


class ActuatorUnreachable(ActuatorError):
    """The actuator cannot be reached at all right now (its MQTT broker is down)."""

    reason = "actuator_unreachable"


class NeedsCall(ActuatorError):
    """A gate that opens by a tone in the call, asked to open where no tone can be played."""

    reason = "needs_call"


class BrokerError(GatedError):
    """The MQTT broker could not be reached, or did not do what was asked."""


class BrokerUnavailable(BrokerError):
    """There is no working connection to the broker at this moment."""


class BrokerTimeout(BrokerError):
    """The broker did not acknowledge in time."""


class StoreError(GatedError):
    """The entry store could not be written or read."""


class NotMoved(ActuatorError):
    """The open command went out but the gate's position sensor saw no movement."""

    reason = "not_moved"


class EngineError(GatedError):
    """The SIP engine is missing, of a version gated does not know, or not answering."""
