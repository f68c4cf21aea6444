"""gated's word on a managed code or route, retained on its ``…/error`` topic."""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING

import msgspec

if TYPE_CHECKING:
    from gated.mqtt.link import Incoming
    from gated.mqtt.port import Site


class Verdicts:
    """gated's word on managed ``codes`` or ``routes``: a refusal retained on
    ``…/<id>/error`` (``…/<id>/error/<site>`` under the fleet prefix), cleared by an
    empty retained message once a good version lands."""

    def __init__(self, bridge: Site, kind: str) -> None:
        self.bridge = bridge
        self.kind = kind
        self._errors: set[tuple[str, str]] = set()  # retained refusals on the broker

    def topic(self, scope: str, item_id: str) -> str:
        bridge = self.bridge
        if scope == "site":
            return f"{bridge.prefix}/{self.kind}/{item_id}/error"
        return f"{bridge.fleet}/{self.kind}/{item_id}/error/{bridge.site}"

    def on_error(self, scope: str, message: Incoming) -> None:
        item_id = message.topic.split("/")[-2 if scope == "site" else -3]
        if message.payload:
            self._errors.add((scope, item_id))
        else:
            self._errors.discard((scope, item_id))

    def refuse(self, scope: str, item_id: str, reason: str) -> None:
        self._errors.add((scope, item_id))
        bridge = self.bridge
        payload = msgspec.json.encode({
            "id": item_id, "scope": scope, "site": bridge.site, "error": reason,
            "time": dt.datetime.fromtimestamp(bridge.gatekeeper.clock.now(), bridge.config.tz)
            .isoformat(timespec="seconds"),
        })
        bridge.send(self.topic(scope, item_id), payload)

    def clear(self, scope: str, item_id: str, *, force: bool) -> None:
        # An empty retained message removes the refusal; subscribers waiting
        # for a verdict (``gated codes put``) see it as "applied".
        if force or (scope, item_id) in self._errors:
            self._errors.discard((scope, item_id))
            self.bridge.send(self.topic(scope, item_id), b"")
