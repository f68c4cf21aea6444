"""Three sites on bridged brokers: a central Mosquitto and two edges, default settings.

Site ``noord`` runs on edge1, ``zuid`` on edge2 (whose link to central goes
through a forwarder the test cuts), ``oost`` on central itself. Staff publish
at central, as an operator would.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from gated.book import codeset, signing, sitekey
from gated.book.codeset import Entry, SetPolicy
from gated.book.config import MqttConfig
from gated.commands import sets as setstaff
from gated.commands.sets import SetKeys
from gated.mqtt.link import connect

from .broker import Mosquitto, eventually
from .fleet import FLEET, Fleet
from .helpers import BARRIER, config_text
from .setkeys import make_keys

PINS = {"noord": (5, 6), "zuid": (12, 13), "oost": (19, 26)}


def site_config(root: Path, site: str, broker: Mosquitto) -> Path:
    folder = root / site
    folder.mkdir(parents=True, exist_ok=True)
    barrier, door = PINS[site]
    extra = (f'\n[mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\nreconnect_min = 0.05\n'
             f'reconnect_max = 0.3\nkeepalive = 5\nconnect_spread = 0\nfleet_prefix = "{FLEET}"\n')
    text = (config_text(folder, extra).replace('id = "test"', f'id = "{site}"')
            .replace("pin = 17", f"pin = {barrier}").replace("pin = 27", f"pin = {door}"))
    path = folder / "gated.toml"
    path.write_text(text)
    return path


def install_key(root: Path, keys: SetKeys) -> None:
    """The fleet key and the public signing key, copied to each site at install (0600)."""
    for site in PINS:
        state = root / site / "state"
        state.mkdir(parents=True, exist_ok=True)
        target = state / "fleet.key"
        target.write_text(keys.hmac.hex() + "\n")
        target.chmod(0o600)
        signing.trust(signing.public_path(target), keys.signer.public)


def entries(keys: SetKeys, count: int) -> list[Entry]:
    return [Entry(sitekey.digest(keys.hmac, f"{n:08d}"), SetPolicy(gates=("barrier",)), f"Code {n}",
                  f"c{n}") for n in range(count)]


async def staff(broker: Mosquitto, key: SetKeys, code_id: str | None = None,
                body: bytes | None = None, *, codes: list[Entry] | None = None
                ) -> codeset.Manifest:
    """Publish at ``broker`` as `gated codes` does: a whole set, or one change."""
    async with connect(MqttConfig(host="127.0.0.1", port=broker.port), "staff") as client:
        if codes is not None:
            return (await setstaff.replace_all(client, key, "staff/sync", codes))[0]
        assert code_id is not None
        return await setstaff.change(client, key, "staff/sync", code_id, body)


async def start_sites(fleet: Fleet, root: Path, start_daemon: Any,
                      key: SetKeys) -> dict[str, Any]:
    install_key(root, key)
    where = {"noord": fleet.edge1, "zuid": fleet.edge2, "oost": fleet.central}
    return {site: await start_daemon(config=site_config(root, site, broker))
            for site, broker in where.items()}


async def answers(site: Any, code: str) -> str:
    return (await site.get(code=code, did=BARRIER))[1]


async def test_fifty_thousand_fleet_codes_reach_every_site_through_default_brokers(
        fleet: Fleet, tmp_path: Path, start_daemon: Any) -> None:
    """50,000 fleet codes published at central reach all three sites whole, through
    bridges and brokers with Mosquitto's default queues; a site restarted answers from its
    local copy at once and confirms the set again; nothing is withdrawn."""
    key = make_keys(tmp_path / "staff" / "fleet.key", FLEET)
    manifest = await staff(fleet.central, key, codes=entries(key, 50_000))
    sites = await start_sites(fleet, tmp_path / "sites", start_daemon, key)
    for name, site in sites.items():
        fleetset = site.daemon.bridge.fleetset
        await eventually(lambda fleetset=fleetset: fleetset.complete, within=30)
        assert len(site.daemon.gatekeeper.book.fleet) == 50_000, name
        for n in (0, 31_337, 49_999):
            assert await answers(site, f"{n:08d}") == "status=ACK", name

    noord = sites["noord"]
    await noord.stop()
    again = await start_daemon(config=tmp_path / "sites" / "noord" / "gated.toml")
    # From the local copy, before the broker has said anything.
    assert len(again.daemon.gatekeeper.book.fleet) == 50_000
    assert await answers(again, "00012345") == "status=ACK"
    await eventually(lambda: again.daemon.bridge.fleetset.complete, within=15)
    assert again.daemon.bridge.fleetset.manifest.serial == manifest.serial


async def test_a_code_deleted_while_an_edge_was_cut_is_gone_when_the_link_returns(
        fleet: Fleet, tmp_path: Path, start_daemon: Any) -> None:
    """A fleet code deleted at central while edge2's link is down, behind 1,500 other
    messages that overflow central's queue for the bridge: the sites that are linked
    drop it at once; zuid keeps it while cut off (it cannot know) and drops it within
    seconds of the link coming back; the rest of the set stays."""
    key = make_keys(tmp_path / "staff" / "fleet.key", FLEET)
    await staff(fleet.central, key, codes=entries(key, 1_000))
    await staff(fleet.central, key, "courier",
                setstaff.hashed_body({"gates": ["*"]}, "24682468", key.hmac))
    sites = await start_sites(fleet, tmp_path / "sites", start_daemon, key)
    for site in sites.values():
        await eventually(lambda site=site: site.daemon.bridge.fleetset.complete, within=15)
        assert await answers(site, "24682468") == "status=ACK"

    fleet.link.cut()
    await fleet.cut_seen()
    filler = await fleet.probe(fleet.central)
    for n in range(1_500):  # the site's own code, changed 1,500 times: all queued for zuid
        await filler.publish("gated/zuid/codes/filler", json.dumps(
            {"code_hash": sitekey.PREFIX + f"{n:064x}", "gates": ["barrier"]}), retain=True)
    await staff(fleet.central, key, "courier", None)
    for name in ("noord", "oost"):
        fleetset = sites[name].daemon.bridge.fleetset
        await eventually(lambda fleetset=fleetset: fleetset.manifest.deltas.get(
            "courier", "") is None)
        assert await answers(sites[name], "24682468") == "status=NAK", name
    assert await answers(sites["zuid"], "24682468") == "status=ACK"

    fleet.link.restore()
    zuid = sites["zuid"].daemon.bridge.fleetset
    await eventually(lambda: zuid.manifest is not None
                     and zuid.manifest.deltas.get("courier", "") is None, within=15)
    assert await answers(sites["zuid"], "24682468") == "status=NAK"
    assert await answers(sites["zuid"], "00000999") == "status=ACK"
    assert "Outgoing messages are being dropped" in fleet.central.log()


async def test_an_open_pressed_during_a_cut_never_fires_late(
        fleet: Fleet, tmp_path: Path, start_daemon: Any) -> None:
    """An open pressed at central while zuid's link is cut, QoS 1 as Home Assistant
    publishes it: when the link is back (after the answer deadline) the relay does not
    move; noord's, pressed the same way while linked, opens."""
    key = make_keys(tmp_path / "staff" / "fleet.key", FLEET)
    sites = await start_sites(fleet, tmp_path / "sites", start_daemon, key)
    for site in sites.values():
        await site.daemon.bridge.link.wait_connected(5)
    ha = await fleet.probe(fleet.central)
    fleet.link.cut()
    await fleet.cut_seen()
    pressed = json.dumps({"at": time.time()})
    await ha.publish("gated/zuid/gates/barrier/open", pressed, qos=1)
    await ha.publish("gated/noord/gates/barrier/open", pressed, qos=1)
    barrier = sites["noord"].pin(PINS["noord"][0])
    await eventually(lambda: [s.state for s in barrier.states] == [False, True, False],
                     within=5)
    await asyncio.sleep(3.5)  # past zuid's answer deadline
    fleet.link.restore()
    await fleet.linked(fleet.edge2, within=15)
    await asyncio.sleep(1)
    assert [s.state for s in sites["zuid"].pin(PINS["zuid"][0]).states] == [False]


async def test_an_edge_replaced_with_an_empty_store_withdraws_nothing(
        fleet: Fleet, tmp_path: Path, start_daemon: Any) -> None:
    """edge1 replaced by a broker with an empty store: noord sees no manifest for a while
    and keeps every fleet code (delta included); the bridge brings the set back from
    central and noord confirms it, having withdrawn nothing."""
    key = make_keys(tmp_path / "staff" / "fleet.key", FLEET)
    await staff(fleet.central, key, codes=entries(key, 5_000))
    await staff(fleet.central, key, "courier",
                setstaff.hashed_body({"gates": ["*"]}, "13571357", key.hmac))
    sites = await start_sites(fleet, tmp_path / "sites", start_daemon, key)
    noord = sites["noord"]
    bridge = noord.daemon.bridge
    await eventually(lambda: bridge.fleetset.complete, within=15)
    await eventually(lambda: bridge.codes.get("fleet", "courier") is not None)
    applied = dict(bridge.codes.applied)
    connections = bridge.synced_connections
    fleet.replace(fleet.edge1)
    await eventually(lambda: bridge.synced_connections > connections, within=15)
    await fleet.linked(fleet.edge1, within=15)
    await eventually(lambda: bridge.fleetset.complete, within=15)
    assert bridge.codes.applied == applied
    assert len(noord.daemon.gatekeeper.book.fleet) == 5_001
    assert await answers(noord, "13571357") == "status=ACK"
    assert await answers(noord, "00004999") == "status=ACK"
