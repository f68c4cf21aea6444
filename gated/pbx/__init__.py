"""The PBX adapters: each turns its platform's request into the one call the
gatekeeper takes, and the gatekeeper's Answer into its platform's format.

``voipgrid`` answers ``status=ACK|NAK|ERR`` to VoIPGRID-style webhooks;
``twiml`` answers TwiML to Twilio and the platforms that speak it. Nothing
below this package knows which PBX asked.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from gated.site.gatekeeper import Gatekeeper

# The gatekeeper every adapter hands its call to (set by gated.app).
GATEKEEPER: web.AppKey[Gatekeeper] = web.AppKey("gatekeeper")
