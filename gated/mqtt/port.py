"""What the broker's channels (code sets, routes, verdicts) need of the site's bridge.

``gated.mqtt.bridge.Bridge`` is the one implementation; the channels take this port
instead of importing it, so the bridge that carries them and the channels it
carries do not import each other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from gated.book.config import Config
    from gated.book.messages import ManagedCodes, Scope
    from gated.mqtt.link import MqttLink
    from gated.site.gatekeeper import Gatekeeper


class Site(Protocol):
    """The site on the broker, as its channels see it."""

    link: MqttLink
    gatekeeper: Gatekeeper
    config: Config
    site: str
    prefix: str
    fleet: str | None
    codes: ManagedCodes

    @property
    def closed(self) -> bool:
        """The daemon is stopping: nothing from the broker is applied any more."""
        ...

    @property
    def retained_in(self) -> bool:
        """This connection's retained messages have all arrived."""
        ...

    def seen(self, scope: Scope) -> set[str]:
        """Ids of the codes this connection has had a message for."""
        ...

    def send(self, topic: str, payload: bytes) -> None:
        """Publish a retained message in the background, if connected."""
        ...

    def withdraw(self, scope: Scope, code_id: str) -> None:
        """Take a managed code out of force."""
        ...

    def apply(self, scope: Scope, code_id: str, payload: bytes, *, live: bool) -> None:
        """Apply one managed code's message."""
        ...
