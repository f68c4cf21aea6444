"""The event published for each entry: one JSON object, documented in docs/mqtt.md.

Built from the stored entry, which never holds the digits a caller typed, so
no event can carry them either.
"""

from __future__ import annotations

import datetime as dt
import zoneinfo
from typing import Any

import msgspec

from gated.site.store import Entry

# What the entry means for the people watching, and the Home Assistant
# event_type: ERR is neither granted nor denied, the gate failed to act.
RESULTS = {"ACK": "granted", "NAK": "denied", "ERR": "failed"}
EVENT_TYPES = ("granted", "denied", "failed")


def event(entry: Entry, *, site: str, tz: zoneinfo.ZoneInfo) -> dict[str, Any]:
    result = RESULTS.get(entry.status, "failed")
    return {
        "event_type": result,
        "time": dt.datetime.fromtimestamp(entry.time, tz).isoformat(timespec="milliseconds"),
        "site": site,
        "gate": entry.gate,
        "status": entry.status,
        "result": result,
        "reason": entry.reason,
        "credential": entry.credential,
        "credential_id": entry.credential_id,
        "kind": entry.kind,
        "caller": entry.caller,
        "did": entry.did,
        "source": entry.source,
        "actuator": entry.actuator,
        "latency_ms": entry.latency_ms,
    }


def encode(entry: Entry, *, site: str, tz: zoneinfo.ZoneInfo) -> bytes:
    return msgspec.json.encode(event(entry, site=site, tz=tz))
