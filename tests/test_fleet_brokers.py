"""The bridged brokers of tests/fleet.py, with the operator's bridge file, against real Mosquitto.

What a fleet relies on from its brokers: a fleet code published at central
reaches every edge, a site's reports reach central, a cut link catches up when
it comes back, retained messages survive a restart, and a replaced edge is
filled again from central. Also what the bridge file must never do: deliver
an open late, or put a code deleted at central back.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .broker import Mosquitto, Probe, eventually
from .fleet import (
    ACL_FILE,
    BRIDGE_FILE,
    PING,
    Fleet,
    bridge_topics,
    new_subscriber_gets,
    publish_retained,
)

CODE = "gated/fleet/codes/visitor-1"
SITE_CODE = "gated/zuid/codes/visitor-1"


async def test_a_retained_fleet_code_at_central_reaches_a_subscriber_at_each_edge(
        fleet: Fleet) -> None:
    staff = await fleet.probe(fleet.central)
    await staff.publish(CODE, b'{"code": "1"}', retain=True)
    for edge in fleet.edges:
        site = await fleet.probe(edge, "gated/fleet/codes/+")
        [got] = await site.wait_for(CODE)
        assert (got.payload, got.retain) == (b'{"code": "1"}', True)


async def test_a_site_topic_published_at_its_edge_reaches_central(fleet: Fleet) -> None:
    central = await fleet.probe(fleet.central, "gated/+/status", "gated/+/events")
    site = await fleet.probe(fleet.edge1)
    await site.publish("gated/noord/status", b"online", retain=True)
    await site.publish("gated/noord/events", b"{}")
    assert [m.payload for m in await central.wait_for("gated/noord/status")] == [b"online"]
    assert [m.payload for m in await central.wait_for("gated/noord/events")] == [b"{}"]
    later = await fleet.probe(fleet.central, "gated/noord/status")
    assert [m.retain for m in await later.wait_for("gated/noord/status")] == [True]


async def test_nothing_reaches_a_cut_edge_and_the_retained_code_arrives_after_restore(
        fleet: Fleet) -> None:
    site = await fleet.probe(fleet.edge2, "gated/fleet/codes/+")
    link = await fleet.probe(fleet.central, "$SYS/broker/connection/edge-zuid/state")
    await eventually(lambda: [m.payload for m in link.received][-1:] == [b"1"])
    fleet.link.cut()
    staff = await fleet.probe(fleet.central)
    await staff.publish(CODE, b"during the cut", retain=True)
    # edge1 has it, and edge2's bridge has since tried central and been turned away.
    await (await fleet.probe(fleet.edge1, CODE)).wait_for(CODE)
    await fleet.cut_seen()
    assert site.on(CODE) == []
    # What an operator watches on central: the bridge's will says 0.
    assert [m.payload for m in link.received][-1:] == [b"0"]

    fleet.link.restore()
    [got] = await site.wait_for(CODE)
    assert got.payload == b"during the cut"
    await eventually(lambda: [m.payload for m in link.received][-1:] == [b"1"])


async def _delete_during_a_cut(fleet: Fleet) -> tuple[list[bytes], list[bytes]]:
    """A site code deleted at central while edge2's link is cut: what edge2, then central, hold."""
    staff = await fleet.probe(fleet.central)
    await staff.publish(SITE_CODE, b"valid", retain=True)
    await (await fleet.probe(fleet.edge2, SITE_CODE)).wait_for(SITE_CODE)
    fleet.link.cut()
    await staff.publish(SITE_CODE, b"", retain=True)
    fleet.link.restore()
    await fleet.linked(fleet.edge2)
    held = []
    for broker in (fleet.edge2, fleet.central):
        subscriber = await fleet.probe(broker, SITE_CODE)
        await fleet.settled(subscriber)
        held.append([m.payload for m in subscriber.on(SITE_CODE)])
    return held[0], held[1]


async def test_a_delete_at_central_during_a_cut_reaches_the_edge_after_restore(
        fleet: Fleet) -> None:
    """The bridge's session on central (cleansession false) keeps the delete for
    the edge, and the edge's old copy does not travel back to central."""
    assert await _delete_during_a_cut(fleet) == ([], [])


async def test_a_bridge_with_a_clean_session_misses_a_delete_made_during_a_cut(
        make_fleet: Callable[..., Any]) -> None:
    """Why the bridge file says cleansession false: central has nothing left to send."""
    fleet = await make_fleet(bridge={"cleansession": "true"})
    assert await _delete_during_a_cut(fleet) == ([b"valid"], [])


async def _open_during_a_cut(fleet: Fleet) -> tuple[Probe, list[bytes]]:
    """An open pressed at central while edge2's link is cut: what reaches edge2 after restore."""
    site = await fleet.probe(fleet.edge2, "gated/zuid/gates/+/open")
    fleet.link.cut()
    button = await fleet.probe(fleet.central)
    await button.publish("gated/zuid/gates/barrier/open", b"open", qos=1)
    await fleet.cut_seen()
    fleet.link.restore()
    await fleet.linked(fleet.edge2)
    await fleet.settled(site)
    return site, [m.payload for m in site.on("gated/zuid/gates/+/open")]


async def test_an_open_published_while_the_link_is_cut_never_reaches_the_edge(
        fleet: Fleet) -> None:
    """Opens are bridged at QoS 0: central keeps none for a link that is down."""
    site, opened = await _open_during_a_cut(fleet)
    assert opened == []
    button = await fleet.probe(fleet.central)
    await button.publish("gated/zuid/gates/barrier/open", b"now", qos=1)
    assert [m.payload for m in await site.wait_for("gated/zuid/gates/+/open")] == [b"now"]


async def test_queue_qos0_messages_on_central_delivers_an_open_late(
        make_fleet: Callable[..., Any]) -> None:
    """Why central must keep Mosquitto's default queue_qos0_messages false."""
    fleet = await make_fleet(extra={"central": "queue_qos0_messages true\n"})
    _, opened = await _open_during_a_cut(fleet)
    assert opened == [b"open"]


async def test_a_bridge_without_try_private_does_not_keep_codes_retained_at_the_edge(
        make_fleet: Callable[..., Any]) -> None:
    """Why the bridge file says try_private true: a code published while the link
    is up reaches the edge as an ordinary message, and a gated connecting later
    never sees it."""
    fleet = await make_fleet(bridge={"try_private": "false"})
    live = await fleet.probe(fleet.edge1, CODE)
    await (await fleet.probe(fleet.central)).publish(CODE, b"{}", retain=True)
    [got] = await live.wait_for(CODE)
    assert got.retain is False
    later = await fleet.probe(fleet.edge1, CODE)
    await fleet.settled(later)
    assert later.on(CODE) == []


async def test_the_bridges_work_through_centrals_acl(
        make_fleet: Callable[..., Any], tmp_path: Path) -> None:
    """Each edge logs in to central as its own bridge user, under config/mosquitto/acl."""
    acl = tmp_path / "acl"
    acl.write_text(ACL_FILE.read_text() + "\nuser tester\ntopic readwrite #\ntopic read $SYS/#\n"
                   + "".join(f"user edge-{site}\ntopic read {PING.format(site=site)}/+\n"
                             for site in ("noord", "zuid")))
    logins = {"edge1": ("edge-noord", "pw-noord"), "edge2": ("edge-zuid", "pw-zuid")}
    fleet = await make_fleet(
        users={"central": {"tester": "pw-tester", **dict(logins.values())}},
        acl={"central": acl}, logins=logins, probe_logins={"central": ("tester", "pw-tester")})
    staff = await fleet.probe(fleet.central, "gated/noord/#", "gated/fleet/codes/+/error/+",
                              "homeassistant/+/+/+/config", "$SYS/broker/connection/+/state")
    sites = [await fleet.probe(edge, "gated/#", "homeassistant/status") for edge in fleet.edges]
    await staff.publish(CODE, b"{}", retain=True)
    await staff.publish("gated/fleet/set", b"{}", retain=True)  # the manifest
    await staff.publish("gated/fleet/set/0", b"chunk", retain=True)
    await staff.publish("homeassistant/status", b"online")
    await staff.publish("gated/noord/gates/barrier/open", b"open", qos=0)
    for site in sites:
        for topic in (CODE, "gated/fleet/set", "gated/fleet/set/0", "homeassistant/status"):
            await site.wait_for(topic)
    await sites[0].wait_for("gated/noord/gates/barrier/open")

    reports = ["gated/noord/status", "gated/noord/events", "gated/noord/last_entry",
               "gated/noord/gates/barrier/event",
               "gated/noord/alarms", "gated/noord/fleet", "gated/noord/codes/visitor-1/error",
               "gated/fleet/codes/visitor-1/error/noord",
               "homeassistant/button/gated_noord/barrier_open/config"]
    for topic in reports:
        await sites[0].publish(topic, b"x")
    for topic in reports:
        await staff.wait_for(topic)
    assert [m.payload for m in await staff.wait_for("$SYS/broker/connection/edge-noord/state")
            ][-1:] == [b"1"]


def test_every_bridged_topic_travels_one_way() -> None:
    """No topic is bridged both ways, nor matched by an `in` and an `out` line.

    A topic carried both ways sends the edge's retained copy back to central
    when the link comes up: a code deleted at central during an outage comes
    back from the edge that missed the delete. Opens are QoS 0 and nothing
    else carries them.
    """
    topics = bridge_topics()
    assert all(direction != "both" for _, direction, _ in topics)
    into = [t for t, d, _ in topics if d == "in"]
    out = [t for t, d, _ in topics if d == "out"]
    for one in into:
        for other in out:
            assert not (_overlaps(one, other)), (one, other)
    opens = [(t, q) for t, d, q in topics if _overlaps(t, "gated/noord/gates/x/open")]
    assert opens == [("gated/noord/gates/+/open", 0)]
    assert "cleansession false" in BRIDGE_FILE.read_text().splitlines()


def _overlaps(one: str, other: str) -> bool:
    """Whether some topic matches both filters."""
    a, b = one.split("/"), other.split("/")
    for x, y in zip(a, b, strict=False):
        if "#" in (x, y):
            return True
        if x != y and "+" not in (x, y):
            return False
    return len(a) == len(b)


async def test_a_broker_restart_keeps_retained_messages(fleet: Fleet) -> None:
    staff = await fleet.probe(fleet.central)
    await staff.publish(CODE, b"kept", retain=True)
    site = await fleet.probe(fleet.edge1, CODE)
    await site.wait_for(CODE)
    await staff.disconnect()
    await site.disconnect()

    fleet.restart(fleet.central)
    fleet.restart(fleet.edge1)
    for broker in (fleet.central, fleet.edge1):
        later = await fleet.probe(broker, CODE)
        assert [m.payload for m in await later.wait_for(CODE)] == [b"kept"]
    await fleet.linked(fleet.edge1)


async def test_a_replaced_edge_starts_empty_and_gets_centrals_retained_messages_again(
        fleet: Fleet) -> None:
    staff = await fleet.probe(fleet.central)
    await staff.publish(CODE, b"from central", retain=True)
    site = await fleet.probe(fleet.edge1)
    await site.publish("gated/noord/codes/visitor-1/error", b"local only", retain=True)
    await (await fleet.probe(fleet.edge1, CODE)).wait_for(CODE)
    for client in list(fleet.probes):
        await client.disconnect()
        fleet.probes.remove(client)

    fleet.link.cut()  # keep edge2 out of it
    fleet.replace(fleet.edge1)
    await fleet.linked(fleet.edge1)
    back = await fleet.probe(fleet.edge1, "gated/fleet/codes/+", "gated/noord/codes/+/error")
    [got] = await back.wait_for(CODE)
    assert (got.payload, got.retain) == (b"from central", True)
    await fleet.settled(back)
    # The edge's own retained error went with its store (central has it, but
    # that topic only travels out).
    assert back.on("gated/noord/codes/+/error") == []



def _crash(broker: Mosquitto) -> None:
    """kill -9: no orderly shutdown, so no save of the in-memory database."""
    assert broker.process is not None
    broker.process.kill()
    broker.process.wait()
    assert broker.process.stderr is not None
    broker.process.stderr.close()
    broker.process = None


async def test_default_mosquitto_loses_retained_messages_since_its_last_save_on_a_crash(
        tmp_path: Path) -> None:
    """Persistence is written at shutdown and every autosave_interval (30 min)."""
    broker = Mosquitto(tmp_path / "default")
    broker.start()
    try:
        publish_retained(broker.port, [(CODE, b"lost")])
        _crash(broker)
        broker.start()
        assert new_subscriber_gets(broker.port, CODE) == 0
    finally:
        broker.stop()


async def test_a_broker_saving_on_every_change_keeps_retained_messages_through_a_crash(
        tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path / "saving",
                       listener="autosave_on_changes true\nautosave_interval 1\n")
    broker.start()
    try:
        store = broker.dir / "mosquitto.db"
        assert not store.exists()
        publish_retained(broker.port, [(CODE, b"kept")])
        # Mosquitto writes mosquitto.db.new, then renames it: the save is done.
        await eventually(lambda: store.exists() and not store.with_suffix(".db.new").exists())
        _crash(broker)
        broker.start()
        assert new_subscriber_gets(broker.port, CODE) == 1
    finally:
        broker.stop()
