"""The aiohttp application factory: typed dependencies in, app out."""

from __future__ import annotations

from aiohttp import web

from gated.book.config import ServerConfig, TwimlConfig
from gated.pbx import GATEKEEPER
from gated.pbx.voipgrid import WEBHOOK, LiveSettings, voipgrid, webhook_settings
from gated.site.gatekeeper import Gatekeeper
from gated.site.sockets import name_no_server

# What a PBX request needs, with room to spare; anything larger is not a PBX.
# (client_max_size, from [server] max_body, bounds the body.)
REQUEST_LIMITS = {"max_line_size": 4096, "max_field_size": 4096, "max_headers": 32}


def make_app(gatekeeper: Gatekeeper, server: ServerConfig, twiml: TwimlConfig | None = None,
             *, region: str = "NL") -> web.Application:
    app = web.Application(client_max_size=server.max_body)
    name_no_server(app)
    app[GATEKEEPER] = gatekeeper
    app[WEBHOOK] = LiveSettings(webhook_settings(server), shared=twiml is not None)
    app.router.add_route("GET", server.path, voipgrid)
    app.router.add_route("POST", server.path, voipgrid)
    if twiml is not None:
        from gated.pbx import twiml as twiml_pbx

        settings = twiml_pbx.TwimlSettings.build(twiml, region)
        app[twiml_pbx.TWIML] = twiml_pbx.LiveTwiml(settings)
        app.router.add_route("POST", settings.path, twiml_pbx.incoming)
        app.router.add_route("POST", f"{settings.path}/code", twiml_pbx.digits)
    return app
