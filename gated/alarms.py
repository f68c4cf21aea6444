"""Alarms are log events that carry ``alarm=<kind>``; this forwards them onwards.

Every alarm (a lock, an unlock, a failing store, a stuck relay, a held-open
gate) is logged where it happens, with an ``alarm`` field. One structlog
processor hands those events to subscribers — the MQTT link publishes them —
so no alarm needs a second code path to reach the broker.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, MutableMapping
from typing import Any

Subscriber = Callable[[dict[str, Any]], None]

_lock = threading.Lock()
_subscribers: list[Subscriber] = []


def subscribe(subscriber: Subscriber) -> Callable[[], None]:
    """Receive every alarm event (from any thread); returns the unsubscribe call."""
    with _lock:
        _subscribers.append(subscriber)

    def unsubscribe() -> None:
        with _lock:
            if subscriber in _subscribers:
                _subscribers.remove(subscriber)

    return unsubscribe


def forward(_logger: Any, _method: str, event: MutableMapping[str, Any]
            ) -> MutableMapping[str, Any]:
    """structlog processor: pass alarm events to the subscribers, unchanged."""
    if event.get("alarm"):
        with _lock:
            subscribers = list(_subscribers)
        for subscriber in subscribers:
            subscriber(dict(event))
    return event
