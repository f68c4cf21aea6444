"""The ports the running daemon's parts take: what they need of an adapter, as a Protocol.

The adapters (``gated.actuators``) implement them; nothing here imports one, so the
gatekeeper and the sensors never know which hardware or broker opens a gate.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class Actuator(Protocol):
    """Opens one gate. ``open`` returns once the command is issued."""

    gate: str
    # Digits the call must play for the open (a call box), "" for every other kind.
    tones: str

    async def open(self) -> str:
        """Issue the open command; return a short result word, raise ActuatorError."""
        ...

    async def close(self) -> None:
        """Leave the actuator safe (relay off) and release it."""
        ...
