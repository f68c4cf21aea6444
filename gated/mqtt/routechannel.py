"""Routes over MQTT: ``<prefix>/routes/<id>``, handled the way managed codes are.

One retained JSON message per route (the fields of a ``[[routes]]`` entry but
``file``); an empty retained message deletes it. Each is checked on its own:
a bad one is refused on ``<prefix>/routes/<id>/error`` (under the fleet
prefix: ``<fleet>/routes/<id>/error/<site-id>``) and the previous version
stays. Applied routes are kept in the store, so a restart with the broker
down still routes; the bridge's ``sync`` marker withdraws routes deleted
while gated was away.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import structlog

from gated.book.messages import ManagedRoutes, parse_route
from gated.book.routes import RouteError, RouteTable
from gated.mqtt.verdicts import Verdicts

if TYPE_CHECKING:
    from gated.book.config import Config
    from gated.mqtt.link import Incoming
    from gated.mqtt.port import Site

log = structlog.get_logger("gated.routes")

SCOPES = ("site", "fleet")


class RouteChannel:
    def __init__(self, bridge: Site) -> None:
        self.bridge = bridge
        self.routes = ManagedRoutes()
        self.verdicts = Verdicts(bridge, "routes")
        self._seen: dict[str, set[str]] = {scope: set() for scope in SCOPES}

    @property
    def table(self) -> RouteTable:
        return self.bridge.gatekeeper.book.routes

    def topic(self, scope: str, route_id: str) -> str:
        base = self.bridge.prefix if scope == "site" else self.bridge.fleet
        return f"{base}/routes/{route_id}"

    def attach(self) -> None:
        """Subscribe (before the bridge's ``sync``: retained messages come in order)."""
        link, prefix, fleet = self.bridge.link, self.bridge.prefix, self.bridge.fleet
        link.subscribe(f"{prefix}/routes/+/error",
                       functools.partial(self.verdicts.on_error, "site"))
        link.subscribe(f"{prefix}/routes/+", functools.partial(self._on_route, "site"))
        if fleet is not None:
            link.subscribe(f"{fleet}/routes/+/error/{self.bridge.site}",
                           functools.partial(self.verdicts.on_error, "fleet"))
            link.subscribe(f"{fleet}/routes/+", functools.partial(self._on_route, "fleet"))

    def load_local(self) -> None:
        """Apply the local copy: the site routes with the broker down."""
        store = self.bridge.gatekeeper.store
        for scope, route_id, body in store.load_routes():
            try:
                if scope == "fleet" and self.bridge.fleet is None:
                    raise RouteError("no [mqtt] fleet_prefix any more")
                self.routes.put(self.table, parse_route(scope, route_id, body,
                                                          self.bridge.config))
            except RouteError as exc:
                log.warning("local copy of a managed route dropped", id=route_id, scope=scope,
                            error=str(exc))
                store.save_route(scope, route_id, None)
        if self.routes.applied:
            log.info("managed routes loaded from the local copy",
                     count=len(self.routes.applied))

    def rebase(self, table: RouteTable, config: Config) -> None:
        """Carry the managed routes over to a reloaded book, before it is swapped in."""
        for route, exc in self.routes.rebase(table, config):
            log.warning("managed route dropped on reload", id=route.id, scope=route.scope,
                        error=str(exc))
            self.bridge.gatekeeper.store.save_route(route.scope, route.id, None)
            self.verdicts.refuse(route.scope, route.id, str(exc))

    def connected(self) -> None:
        self._seen = {scope: set() for scope in SCOPES}

    def synced(self) -> None:
        """Every retained route has arrived: withdraw those the broker no longer holds."""
        for scope in SCOPES:
            for route_id in sorted(self.routes.ids(scope) - self._seen[scope]):
                log.info("managed route withdrawn while gated was away", id=route_id,
                         scope=scope)
                self._withdraw(scope, route_id)

    def _on_route(self, scope: str, message: Incoming) -> None:
        if self.bridge.closed:
            return
        route_id = message.topic.rsplit("/", 1)[1]
        self._seen[scope].add(route_id)
        live = not message.retain
        if not message.payload:
            self._withdraw(scope, route_id)
            return
        current = self.routes.get(scope, route_id)
        if current is not None and current.body == message.payload:
            self.verdicts.clear(scope, route_id, force=live)
            return
        try:
            route = parse_route(scope, route_id, message.payload, self.bridge.config)
            previous = self.routes.put(self.table, route)
        except RouteError as exc:
            log.warning("managed route refused", id=route_id, scope=scope, error=str(exc))
            self.verdicts.refuse(scope, route_id, str(exc))
            return
        self.bridge.gatekeeper.store.save_route(scope, route_id, route.body)
        log.info("managed route applied", id=route_id, scope=scope,
                 name=route.route.credential.name, callers=len(route.route.callers),
                 replaced=previous is not None)
        self.verdicts.clear(scope, route_id, force=live)

    def _withdraw(self, scope: str, route_id: str) -> None:
        if self.routes.delete(self.table, scope, route_id) is not None:
            self.bridge.gatekeeper.store.save_route(scope, route_id, None)
            log.info("managed route removed", id=route_id, scope=scope)
        self.verdicts.clear(scope, route_id, force=False)
