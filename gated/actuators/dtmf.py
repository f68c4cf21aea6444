"""Call-box mode: the gate opens when the call plays a tone back to the box.

An apartment call box dials a number and buzzes the door when it hears the
resident's "open" key. Nothing is wired: the open is the tone, played by the
platform once the answer carries it. So there is nothing to switch here; the
gatekeeper puts ``digits`` into the answer, and only a call whose channel can
play tones (a TwiML call) gets it.
"""

from __future__ import annotations

from gated.book.config import DtmfActuatorConfig
from gated.core.errors import ActuatorError


class DtmfActuator:
    def __init__(self, gate: str, config: DtmfActuatorConfig) -> None:
        self.gate = gate
        self.digits = config.digits
        self.tones = config.digits
        self._closed = False

    async def open(self) -> str:
        if self._closed:
            raise ActuatorError(f"gate {self.gate!r}: shut down")
        return "dtmf"

    async def close(self) -> None:
        self._closed = True
