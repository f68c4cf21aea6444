"""What Mosquitto's default queue limits do to a large retained set, on real brokers.

Why fleet codes must not travel one retained message per code: a broker sends
a new subscription at most ``max_inflight_messages`` (20) +
``max_queued_messages`` (1000) of the retained messages it matches and drops
the rest ("Outgoing messages are being dropped for client ..."). An edge's
bridge is such a subscriber on central, so an edge replaced with an empty
store gets back only that many fleet codes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from .broker import eventually
from .fleet import Fleet, new_subscriber_gets, publish_retained

CODES = 5000
FIRST_BATCH = 20 + 1000  # max_inflight_messages + max_queued_messages, Mosquitto's defaults
DROPPED = "Outgoing messages are being dropped for client edge-noord"


async def _publish_codes(fleet: Fleet) -> None:
    await asyncio.to_thread(publish_retained, fleet.central.port, (
        (f"gated/fleet/codes/c{i:05d}", b"{}") for i in range(CODES)))


async def _count(port: int) -> int:
    return await asyncio.to_thread(new_subscriber_gets, port, "gated/fleet/codes/+")


async def test_default_mosquitto_truncates_a_large_retained_set_for_a_new_subscriber(
        fleet: Fleet) -> None:
    await _publish_codes(fleet)  # each one acknowledged: central holds all of them
    assert await _count(fleet.central.port) == FIRST_BATCH

    # The bridge of an edge replaced with an empty store is such a subscriber.
    fleet.replace(fleet.edge1)
    await fleet.linked(fleet.edge1)
    assert await _count(fleet.edge1.port) == FIRST_BATCH
    await eventually(lambda: DROPPED in fleet.central.log())


async def test_a_replaced_edge_gets_every_retained_code_when_queues_are_larger_than_the_set(
        make_fleet: Callable[..., Any]) -> None:
    larger = f"max_queued_messages {CODES + 1000}\n"
    fleet = await make_fleet(extra={"central": larger, "edge1": larger})
    await _publish_codes(fleet)
    fleet.replace(fleet.edge1)
    await fleet.linked(fleet.edge1)
    assert await _count(fleet.edge1.port) == CODES
    assert DROPPED not in fleet.central.log()


async def test_an_edge_is_linked_only_once_its_new_connection_brought_every_retained_code(
        make_fleet: Callable[..., Any]) -> None:
    """edge2 replaced while its link is down: central keeps the bridge's session, which
    can deliver a marker before the retained codes the new connection subscribes to;
    linked() returns only once the edge has every one of them."""
    larger = f"max_queued_messages {CODES + 1000}\n"
    fleet = await make_fleet(extra={"central": larger, "edge2": larger})
    await _publish_codes(fleet)
    await fleet.linked(fleet.edge2)  # the old edge2 has them all: central queues none
    fleet.link.cut()
    fleet.replace(fleet.edge2)
    linking = asyncio.create_task(fleet.linked(fleet.edge2, within=30))
    await fleet.cut_seen()  # the bridge tried central and was turned away
    fleet.link.restore()
    await linking
    assert await _count(fleet.edge2.port) == CODES
