"""The PBX adapters: each turns its platform's request into the one call the
gatekeeper takes, and the gatekeeper's Answer into its platform's format.

``voipgrid`` answers ``status=ACK|NAK|ERR`` to VoIPGRID-style webhooks;
``twiml`` answers TwiML to Twilio and the platforms that speak it. Nothing
below this package knows which PBX asked.
"""

from __future__ import annotations

from dataclasses import dataclass

from gated.decide import Status


@dataclass(frozen=True, slots=True)
class Answer:
    """What the gatekeeper answers a call, in no PBX's format."""

    status: Status
    reason: str
    callername: str = ""
    destination: str = ""
    tones: str = ""  # digits the call plays to open the gate (a call box), never typed ones
    # Nothing admits the call without a code and nothing was recorded: ask for one.
    wants_code: bool = False
