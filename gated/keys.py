"""Every aiohttp AppKey in one place."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from gated.gatekeeper import Gatekeeper
    from gated.webhook import WebhookSettings

GATEKEEPER: web.AppKey[Gatekeeper] = web.AppKey("gatekeeper")
WEBHOOK: web.AppKey[WebhookSettings] = web.AppKey("webhook")
