"""Alarms: things a person should know about now, logged and passed on.

An alarm (a lock begun or ended, a failing store, a relay that would not
release, a gate held or forced open) is logged where it happens, with an
``alarm`` field, and handed to every subscriber — the MQTT bridge publishes
it on ``<prefix>/alarms``. Subscribers may be called from any thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

Subscriber = Callable[[dict[str, Any]], None]

_lock = threading.Lock()
_subscribers: list[Subscriber] = []


def subscribe(subscriber: Subscriber) -> Callable[[], None]:
    """Receive every alarm; returns the call that unsubscribes."""
    with _lock:
        _subscribers.append(subscriber)

    def unsubscribe() -> None:
        with _lock:
            if subscriber in _subscribers:
                _subscribers.remove(subscriber)

    return unsubscribe


def alarm(logger: Any, kind: str, message: str | None = None, *, level: str = "warning",
          **fields: Any) -> None:
    """Log ``kind`` (with ``alarm=kind``) and pass it to the subscribers."""
    getattr(logger, level)(message or kind, alarm=kind, **fields)
    event = {"alarm": kind, "time": time.time(), **fields}
    with _lock:
        subscribers = list(_subscribers)
    for subscriber in subscribers:
        try:
            subscriber(dict(event))
        except Exception:  # an alarm must never break the code that raised it
            logger.exception("alarm subscriber failed", alarm=kind)
