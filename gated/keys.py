"""Every aiohttp AppKey in one place."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from gated.gatekeeper import Gatekeeper
    from gated.metrics import Metrics
    from gated.pbx.twiml import LiveTwiml
    from gated.pbx.voipgrid import LiveSettings

GATEKEEPER: web.AppKey[Gatekeeper] = web.AppKey("gatekeeper")
WEBHOOK: web.AppKey[LiveSettings] = web.AppKey("webhook")
TWIML: web.AppKey[LiveTwiml] = web.AppKey("twiml")
METRICS: web.AppKey[Metrics] = web.AppKey("metrics")
HEALTH: web.AppKey[Callable[[], str | None]] = web.AppKey("health")
