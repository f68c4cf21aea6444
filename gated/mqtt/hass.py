"""Home Assistant MQTT discovery: the site as one device, nothing to write in YAML.

Per gate an ``event`` entity (granted / denied / failed, fed by the gate's
event topic) and a ``button`` that publishes to the gate's open topic, with the
time it was pressed (not for a call box's gate, which only a call can open); per site
a sensor showing the last entry. All share the site's availability topic, so
Home Assistant greys them out when the last will says ``offline``.

The sensor's state is ``<prefix>/last_entry``, the last entry retained, so
Home Assistant shows it again after its own restart (``events`` is news, not
retained).

Configs are retained, so a gate taken out of the config would live on in Home
Assistant (an Open button answering ``unknown_gate``). At connect gated reads
back the retained configs under its own node id and clears the ones it no
longer announces; another site's node is never touched. A Home Assistant that
was down then never saw the clearing and keeps the entities, ``unavailable``,
for good: the cleared topics are kept beside the store and cleared again each
time Home Assistant says it is back, for ``KEEP_REMOVED``.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from pathlib import Path
from typing import Any

import msgspec

from gated import __version__
from gated.book import files
from gated.site.events import EVENT_TYPES

# How long the configs of a removed gate are cleared again at each of Home
# Assistant's births: long enough for one that was away over a holiday.
KEEP_REMOVED = 60 * 86400.0
# At most this many, the latest: only gated and its bridge may write its
# node's configs, but the list must not grow without bound whatever is there.
MAX_REMOVED = 1000


def gate_event_topic(prefix: str, gate: str) -> str:
    return f"{prefix}/gates/{gate}/event"


def gate_open_topic(prefix: str, gate: str) -> str:
    return f"{prefix}/gates/{gate}/open"


# What a press sends: the time of the press, rendered by Home Assistant (a
# float). A remote open that cannot show it is fresh opens nothing, so a press
# held up in a bridge's or a broker's queue arrives as a refused `stale` entry.
OPEN_TEMPLATE = '{"at": {{ as_timestamp(now()) }}}'


def last_entry_topic(prefix: str) -> str:
    return f"{prefix}/last_entry"


def node_id(site: str) -> str:
    return f"gated_{site}".replace("-", "_")


def config_filter(*, site: str, discovery_prefix: str) -> str:
    """The topic filter matching every discovery config gated publishes for ``site``."""
    return f"{discovery_prefix}/+/{node_id(site)}/+/config"


def configs(*, site: str, prefix: str, discovery_prefix: str,
            gates: list[str], no_button: Collection[str] = ()
            ) -> list[tuple[str, dict[str, Any]]]:
    """(config topic, payload) for every entity of the site; ``no_button``: gates that
    cannot be opened remotely."""
    node = node_id(site)
    device = {
        "identifiers": [node],
        "name": f"gated {site}",
        "manufacturer": "gated",
        "model": "gate controller",
        "sw_version": __version__,
    }
    common = {
        "availability_topic": f"{prefix}/status",
        "payload_available": "online",
        "payload_not_available": "offline",
        "device": device,
        "origin": {"name": "gated", "sw_version": __version__},
    }
    out: list[tuple[str, dict[str, Any]]] = []
    for gate in gates:
        out.append((f"{discovery_prefix}/event/{node}/{gate}/config", {
            "name": f"{gate} entries",
            "unique_id": f"{node}_{gate}_entries",
            "state_topic": gate_event_topic(prefix, gate),
            "event_types": list(EVENT_TYPES),
            "icon": "mdi:gate",
            **common,
        }))
        if gate in no_button:
            continue
        out.append((f"{discovery_prefix}/button/{node}/{gate}_open/config", {
            "name": f"Open {gate}",
            "unique_id": f"{node}_{gate}_open",
            "command_topic": gate_open_topic(prefix, gate),
            "command_template": OPEN_TEMPLATE,
            "qos": 1,
            "retain": False,
            "icon": "mdi:gate-open",
            **common,
        }))
    out.append((f"{discovery_prefix}/sensor/{node}/last_entry/config", {
        "name": "Last entry",
        "unique_id": f"{node}_last_entry",
        "state_topic": last_entry_topic(prefix),
        "value_template": "{{ value_json.result }} {{ value_json.gate or '' }}",
        "json_attributes_topic": last_entry_topic(prefix),
        "icon": "mdi:account-key",
        **common,
    }))
    return out


class _Config(msgspec.Struct):
    availability_topic: str | None = None


def owner(payload: bytes) -> str | None:
    """The availability topic a discovery config follows: whose config it is."""
    try:
        return msgspec.json.decode(payload, type=_Config).availability_topic
    except (msgspec.DecodeError, RecursionError):
        return None


def encode(payload: dict[str, Any]) -> bytes:
    return msgspec.json.encode(payload)


def removed_path(store: Path) -> Path:
    """Where the cleared configs' topics are kept: beside the entry store."""
    return store.with_name(store.name + ".hass-removed")


def load_removed(path: Path, now: float) -> dict[str, float]:
    """Topic -> when it was cleared, for those cleared within ``KEEP_REMOVED``.

    Raises OSError, FileError or msgspec.DecodeError for a file that cannot be read."""
    try:
        with os.fdopen(files.open_state(path), "rb") as file:
            data = file.read(1 << 20)
    except FileNotFoundError:
        return {}
    removed = msgspec.json.decode(data, type=dict[str, float])
    return latest({topic: at for topic, at in removed.items() if now - at < KEEP_REMOVED})


def latest(removed: dict[str, float]) -> dict[str, float]:
    """The ``MAX_REMOVED`` most recently cleared."""
    if len(removed) <= MAX_REMOVED:
        return removed
    return dict(sorted(removed.items(), key=lambda item: item[1])[-MAX_REMOVED:])


def save_removed(path: Path, removed: dict[str, float]) -> None:
    files.replace(path, msgspec.json.encode(latest(removed)))
