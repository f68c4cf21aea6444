"""The fleet's codes as one set on a real broker: published by staff, applied whole by a site."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
from pathlib import Path
from typing import Any

import msgspec
import pytest
from structlog.testing import capture_logs

from gated.book import codeset, sitekey
from gated.book.codeset import Entry, SetPolicy
from gated.book.config import MqttConfig
from gated.commands import sets as setstaff
from gated.commands.sets import SetKeys
from gated.mqtt import setchannel
from gated.mqtt.link import connect

from .broker import Mosquitto, Probe, eventually, mqtt_ready, mqtt_table
from .helpers import BARRIER, DOOR, config_text
from .setkeys import make_keys, signed
from .test_book_check import cut, edit, sections_of, set_record
from .test_cli_codes import gated

FLEET = "gated/fleet"
FLEET_MQTT = f'fleet_prefix = "{FLEET}"'


def fleet_key(tmp_path: Path) -> SetKeys:
    """The fleet's keys where a site of tests/helpers.py's config looks: beside the site
    key (the signing key there too, as on a site that is also the staff machine)."""
    return make_keys(tmp_path / "state" / "fleet.key", FLEET)


def entries(keys: SetKeys | bytes, count: int, *, start: int = 0, gates: tuple[str, ...] = ("*",),
            prefix: str = "c") -> list[Entry]:
    key = keys.hmac if isinstance(keys, SetKeys) else keys
    return [Entry(sitekey.digest(key, f"{n:08d}"), SetPolicy(gates=gates), f"Code {n}",
                  f"{prefix}{n}") for n in range(start, start + count)]


async def publish_set(broker: Mosquitto, keys: SetKeys,
                      codes: list[Entry]) -> codeset.Manifest:
    settings = MqttConfig(host="127.0.0.1", port=broker.port)
    async with connect(settings, "staff-test") as client:
        return (await setstaff.replace_all(client, keys, "gated/staff/sync", codes))[0]


async def site_with_set(broker: Mosquitto, start_daemon: Any, tmp_path: Path,
                        count: int) -> tuple[SetKeys, codeset.Manifest, Any, Any]:
    """A set of ``count`` codes published, and a site that holds it whole:
    (the fleet's keys, the manifest, the running site, its fleet channel)."""
    key = fleet_key(tmp_path)
    manifest = await publish_set(broker, key, entries(key, count))
    running = await start_daemon(mqtt_table(broker, FLEET_MQTT))
    fleetset = running.daemon.bridge.fleetset
    await eventually(lambda: fleetset.complete, within=10)
    return key, manifest, running, fleetset


async def offer(probe: Probe, keys: SetKeys, first: codeset.Manifest, fleetset: Any,
                data: bytes, chunk: bytes) -> None:
    """Publish ``chunk`` as the only chunk of a set of ``data`` with a manifest signed by
    staff, and wait until the site has taken it in and is done with it."""
    await probe.publish(f"{FLEET}/set/0", chunk, retain=True)
    await probe.publish(f"{FLEET}/set", signed(keys, codeset.Manifest(
        serial=first.serial + (1 << 16), version=codeset.version_of(data), size=len(data),
        chunks=1, codes=100, key=first.key)), retain=True)
    await eventually(lambda: fleetset.newest is not None
                     and fleetset.newest.version == codeset.version_of(data))
    await eventually(lambda: not fleetset.pending)


async def test_a_fleet_code_put_by_staff_opens_and_the_broker_never_sees_its_digits(
        broker: Mosquitto, probe: Probe, start_daemon: Any, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """put --fleet publishes a delta on the fleet's set: a hash under the fleet key, listed
    in the manifest; the site opens with it; no message anywhere holds the digits; rm
    --fleet takes it away; no site publishes an empty verdict for it."""
    await probe.subscribe(f"{FLEET}/#")
    config = str(tmp_path / "gated.toml")
    running = await start_daemon(mqtt_table(broker, FLEET_MQTT))
    code, out = await gated(capsys, "-c", config, "codes", "put", "--fleet", "courier",
                            "--code", "80808080", "--gates", "*")
    assert code == 2  # "error: no fleet key at …": nothing published
    assert probe.on(f"{FLEET}/#") == []
    code, out = await gated(capsys, "-c", config, "codes", "fleet-key", "--new")
    assert code == 0 and "fingerprint" in out, out
    await running.stop()
    running = await start_daemon(mqtt_table(broker, FLEET_MQTT))  # now with the fleet key
    await mqtt_ready(running)

    # The fleet's first code makes its set; the next one is a delta on it.
    code, out = await gated(capsys, "-c", config, "codes", "put", "--fleet", "first",
                            "--code", "70707070", "--gates", "barrier", "--wait", "0")
    assert code == 0, out
    code, out = await gated(capsys, "-c", config, "codes", "put", "--fleet", "courier",
                            "--code", "80808080", "--gates", "*", "--wait", "0.5")
    assert code == 0, out
    assert "published gated/fleet/codes/courier in the fleet's set" in out
    assert "no site refused it" in out
    fleet = running.daemon.gatekeeper.book.fleet
    await eventually(lambda: running.daemon.bridge.codes.get("fleet", "courier") is not None)
    assert await running.get(code="80808080", did=BARRIER) == (200, "status=ACK")
    assert await running.get(code="80808080", did=DOOR) == (200, "status=ACK")
    assert await running.get(code="70707070", did=BARRIER) == (200, "status=ACK")
    assert await running.get(code="70707070", did=DOOR) == (200, "status=NAK")
    manifest_message = probe.on(f"{FLEET}/set")[-1]
    manifest = codeset.decode_manifest(manifest_message.payload)
    body = probe.on(f"{FLEET}/codes/courier")[-1].payload
    assert manifest.deltas == {"courier": hashlib.sha256(body).hexdigest()}
    assert manifest.key == codeset.fingerprint(fleet.key)
    assert "code_hash" in json.loads(body) and "code" not in json.loads(body)
    everything = b"".join(m.payload for m in probe.received)
    assert b"80808080" not in everything and b"70707070" not in everything
    assert probe.on(f"{FLEET}/codes/courier/error/test") == []

    code, out = await gated(capsys, "-c", config, "codes", "rm", "--fleet", "courier")
    assert code == 0, out
    await eventually(lambda: running.daemon.bridge.codes.get("fleet", "courier") is None)
    assert await running.get(code="80808080", did=BARRIER) == (200, "status=NAK")
    assert probe.on(f"{FLEET}/codes/courier/error/test") == []


async def test_a_large_set_arrives_whole_through_a_short_broker_queue(
        tmp_path: Path, start_daemon: Any) -> None:
    """20,000 fleet codes through a broker that queues at most 100 messages a client: the
    set is a handful of chunks, so the site gets every code."""
    broker = Mosquitto(tmp_path / "short-queue", listener="max_queued_messages 100\n")
    broker.start()
    try:
        key = fleet_key(tmp_path)
        codes = entries(key, 20_000, gates=("barrier",))
        manifest = await publish_set(broker, key, codes)
        assert manifest.chunks < 10
        running = await start_daemon(mqtt_table(broker, FLEET_MQTT))
        fleetset = running.daemon.bridge.fleetset
        await eventually(lambda: fleetset.complete, within=20)
        assert len(running.daemon.gatekeeper.book.fleet) == 20_000
        for n in (0, 7_777, 19_999):
            assert await running.get(code=f"{n:08d}", did=BARRIER) == (200, "status=ACK")
        assert await running.get(code=f"{n:08d}", did=DOOR) == (200, "status=NAK")
        assert await running.get(code="20000000", did=BARRIER) == (200, "status=NAK")
    finally:
        broker.stop()


async def test_a_code_deleted_while_the_site_was_away_is_gone_when_it_returns(
        broker: Mosquitto, start_daemon: Any, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A site that was down while a fleet code was deleted: at start it answers from its
    local copy at once (the set mapped from its file), and the deletion is in force
    within moments of connecting; the rest of the set is untouched."""
    key = fleet_key(tmp_path)
    await publish_set(broker, key, entries(key, 1_000))
    running = await start_daemon(mqtt_table(broker, FLEET_MQTT))
    await eventually(lambda: running.daemon.bridge.fleetset.complete, within=10)
    await running.stop()

    config = str(tmp_path / "gated.toml")
    code, out = await gated(capsys, "-c", config, "codes", "rm", "--fleet", "c5")
    assert code == 0, out

    broker.stop()
    running = await start_daemon(mqtt_table(broker, FLEET_MQTT))
    # No broker: the whole set from the local copy, the deletion not known yet.
    assert len(running.daemon.gatekeeper.book.fleet) == 1_000
    assert await running.get(code="00000005", did=BARRIER) == (200, "status=ACK")
    broker.start()
    await eventually(lambda: running.daemon.bridge.fleetset.complete, within=10)
    assert await running.get(code="00000005", did=BARRIER) == (200, "status=NAK")
    assert await running.get(code="00000006", did=BARRIER) == (200, "status=ACK")


async def test_a_set_the_site_cannot_confirm_withdraws_nothing_and_raises_an_alarm(
        broker: Mosquitto, probe: Probe, start_daemon: Any, tmp_path: Path) -> None:
    """A manifest naming a set whose chunks are not all there, and one made with another
    fleet key: the site keeps the codes it has, says it is incomplete (alarm and its
    retained fleet state), and says so again once the set is whole."""
    await probe.subscribe("gated/test/alarms", "gated/test/fleet")
    key = fleet_key(tmp_path)
    first = await publish_set(broker, key, entries(key, 5_000))
    running = await start_daemon(mqtt_table(broker, FLEET_MQTT))
    fleetset = running.daemon.bridge.fleetset
    fleetset.grace = 0.5
    await eventually(lambda: fleetset.complete, within=10)

    # A second set whose last chunk never reaches the broker.
    bigger = codeset.build(entries(key, 8_000))
    chunks = codeset.split(bigger)
    await probe.publish(f"{FLEET}/set/0", chunks[0], retain=True)
    manifest = codeset.Manifest(serial=first.serial + 1 << 16, version=codeset.version_of(bigger),
                                size=len(bigger), chunks=len(chunks), codes=8_000,
                                key=first.key)
    await probe.publish(f"{FLEET}/set", signed(key, manifest), retain=True)
    alarms = await probe.wait_for("gated/test/alarms", 1, within=5)
    assert json.loads(alarms[-1].payload)["alarm"] == "codes_incomplete"
    assert json.loads(alarms[-1].payload)["missing_chunks"] == len(chunks) - 1
    assert len(running.daemon.gatekeeper.book.fleet) == 5_000
    assert await running.get(code="00004999", did=BARRIER) == (200, "status=ACK")
    assert await running.get(code="00007999", did=BARRIER) == (200, "status=NAK")
    state = json.loads(probe.on("gated/test/fleet")[-1].payload)
    assert state["complete"] is False and state["serial"] == first.serial

    for index, chunk in enumerate(chunks[1:], 1):
        await probe.publish(f"{FLEET}/set/{index}", chunk, retain=True)
    alarms = await probe.wait_for("gated/test/alarms", 2, within=5)
    assert json.loads(alarms[-1].payload)["alarm"] == "codes_complete"
    assert await running.get(code="00007999", did=BARRIER) == (200, "status=ACK")

    # Made with another key: not applied, and said.
    other = codeset.build(entries(b"k" * 32, 10))
    (chunk,) = codeset.split(other)
    await probe.publish(f"{FLEET}/set/0", chunk, retain=True)
    await probe.publish(f"{FLEET}/set", signed(key, codeset.Manifest(
        serial=manifest.serial + 1 << 16, version=codeset.version_of(other), size=len(other),
        chunks=1, codes=10, key=codeset.fingerprint(b"k" * 32))), retain=True)
    alarms = await probe.wait_for("gated/test/alarms", 3, within=5)
    assert json.loads(alarms[-1].payload) | {"time": None} == json.loads(alarms[-1].payload) | {
        "time": None, "alarm": "codes_incomplete", "key_matches": False}
    assert await running.get(code="00007999", did=BARRIER) == (200, "status=ACK")


async def test_a_damaged_chunk_is_never_applied(broker: Mosquitto, probe: Probe,
                                                start_daemon: Any, tmp_path: Path) -> None:
    """Chunks whose bytes do not make the set the manifest names (a flipped bit, a
    mix of two publishes): nothing of them applies; the set in force stays."""
    key, first, running, fleetset = await site_with_set(broker, start_daemon, tmp_path, 100)
    other = codeset.build(entries(key, 100, start=500))
    (chunk,) = codeset.split(other)
    damaged = chunk[:-1] + bytes([chunk[-1] ^ 1])
    await offer(probe, key, first, fleetset, other, damaged)
    assert fleetset.manifest is not None and fleetset.manifest.version == first.version
    assert await running.get(code="00000001", did=BARRIER) == (200, "status=ACK")
    assert await running.get(code="00000501", did=BARRIER) == (200, "status=NAK")


async def test_import_publishes_a_csv_as_the_fleets_whole_set_and_ls_says_if_it_is_whole(
        broker: Mosquitto, probe: Probe, start_daemon: Any, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """import --fleet makes a CSV file the fleet's set: the site opens with its codes (and
    the one for other sites' gates stays out); ls --broker --fleet lists them with no
    digits and says the list is whole, or that it is not once a chunk is gone; a file
    with a bad line publishes nothing."""
    await probe.subscribe(f"{FLEET}/#")
    fleet_key(tmp_path)
    config = str(tmp_path / "gated.toml")
    running = await start_daemon(mqtt_table(broker, FLEET_MQTT))
    await mqtt_ready(running)
    csv = tmp_path / "codes.csv"
    csv.write_text("name,code,gates,max_uses\n"
                   "Courier,51515151,*,\n"
                   "Cleaner,52525252,door,3\n"
                   "Elsewhere,53535353,zuid-gate,\n")
    code, out = await gated(capsys, "-c", config, "codes", "import", "--fleet", str(csv))
    assert code == 0, out
    assert "published 3 codes" in out and "into the fleet's set" in out
    fleetset = running.daemon.bridge.fleetset
    await eventually(lambda: fleetset.complete)
    assert await running.get(code="51515151", did=BARRIER) == (200, "status=ACK")
    assert await running.get(code="52525252", did=DOOR) == (200, "status=ACK")
    assert await running.get(code="52525252", did=BARRIER) == (200, "status=NAK")
    assert await running.get(code="53535353", did=BARRIER) == (200, "status=NAK")

    code, out = await gated(capsys, "-c", config, "codes", "ls", "--broker", "--fleet")
    assert code == 0, out
    assert "Courier" in out and "Cleaner" in out and "Elsewhere" in out
    assert "complete (3 codes" in out
    assert not {"51515151", "52525252", "53535353"} & set(out.split())
    everything = b"".join(m.payload for m in probe.received)
    # The whole code: four digits turn up by chance in a signature, a serial or a digest.
    assert b"51515151" not in everything and b"52525252" not in everything

    serial = codeset.decode_manifest(probe.on(f"{FLEET}/set")[-1].payload).serial
    csv.write_text("name,code,gates\nCourier,51515151,*\nBroken,12,*\n")
    code, out = await gated(capsys, "-c", config, "codes", "import", "--fleet", str(csv))
    assert code == 2
    await probe.publish(f"{FLEET}/set/0", b"", retain=True)  # a chunk lost on the broker
    code, out = await gated(capsys, "-c", config, "codes", "ls", "--broker", "--fleet")
    assert code == 1 and "INCOMPLETE" in out and "chunks are not all on the broker" in out
    assert codeset.decode_manifest(probe.on(f"{FLEET}/set")[-1].payload).serial == serial
    # The site keeps what it has.
    assert await running.get(code="51515151", did=BARRIER) == (200, "status=ACK")


async def test_two_staff_commands_at_once_lose_neither_code(
        broker: Mosquitto, start_daemon: Any, tmp_path: Path) -> None:
    """Four fleet puts at the same moment, each reading and replacing the one manifest:
    every code opens at the site, and the manifest lists them all."""
    key, _, running, fleetset = await site_with_set(broker, start_daemon, tmp_path, 10)
    settings = MqttConfig(host="127.0.0.1", port=broker.port)

    async def put(n: int) -> codeset.Manifest:
        body = setstaff.hashed_body({"name": f"Racer {n}", "gates": ["*"]},
                                      f"9{n}9{n}9{n}9{n}", key.hmac)
        async with connect(settings, f"staff-{n}") as client:
            return await setstaff.change(client, key, f"gated/staff/sync/{n}",
                                           f"racer-{n}", body)

    await asyncio.gather(*(put(n) for n in range(4)))
    await eventually(lambda: fleetset.complete and fleetset.newest is not None
                     and len(fleetset.newest.deltas) == 4)
    for n in range(4):
        assert await running.get(code=f"9{n}9{n}9{n}9{n}", did=BARRIER) == (200, "status=ACK")


async def test_a_fleet_code_no_signed_manifest_lists_never_opens_nor_enters_a_set(
        broker: Mosquitto, probe: Probe, start_daemon: Any, tmp_path: Path) -> None:
    """A fleet code published by someone who can write the fleet's topics but holds no
    signing key (a copied code_hash under a new id): no site applies it, and the next
    staff command neither lists it nor takes it into a set; once staff publish a code of
    that id themselves, it applies."""
    key, _first, running, _fleetset = await site_with_set(broker, start_daemon, tmp_path, 10)
    orphan = setstaff.hashed_body({"name": "Orphan", "gates": ["*"]}, "41414141", key.hmac)
    await probe.publish(f"{FLEET}/codes/orphan", orphan, retain=True)
    settings = MqttConfig(host="127.0.0.1", port=broker.port)
    async with connect(settings, "staff-next") as client:
        manifest = await setstaff.change(client, key, "gated/staff/sync", "next",
                                         setstaff.hashed_body({"gates": ["*"]},
                                                              "42424242", key.hmac))
    assert set(manifest.deltas) == {"next"}
    await eventually(lambda: running.daemon.bridge.codes.get("fleet", "next") is not None)
    assert running.daemon.bridge.codes.get("fleet", "orphan") is None
    assert await running.get(code="41414141", did=BARRIER) == (200, "status=NAK")
    async with connect(settings, "staff-fold") as client:
        broker_now = await setstaff.read(client, key, "gated/staff/sync")
    assert set(setstaff.current(broker_now, key)) == {f"c{n}" for n in range(10)} | {"next"}

    async with connect(settings, "staff-orphan") as client:
        await setstaff.change(client, key, "gated/staff/sync", "orphan", orphan)
    await eventually(lambda: running.daemon.bridge.codes.get("fleet", "orphan") is not None)
    assert await running.get(code="41414141", did=BARRIER) == (200, "status=ACK")


async def test_sets_a_crash_left_behind_are_cleared_at_start(
        broker: Mosquitto, start_daemon: Any, tmp_path: Path) -> None:
    """A set file written but never recorded as in force, and a write lock of a killed
    daemon, are removed at start; the set in force stays and is mapped."""
    _key, _, running, _fleetset = await site_with_set(broker, start_daemon, tmp_path, 10)
    await running.stop()
    state = tmp_path / "state"
    (kept,) = state.glob("entries.sqlite3.fleet-*")
    (state / "entries.sqlite3.fleet-0123456789abcdef").write_bytes(b"half")
    (state / "entries.sqlite3.fleet-0123456789abcdef.lock").write_bytes(b"")
    running = await start_daemon(mqtt_table(broker, FLEET_MQTT))
    assert list(state.glob("entries.sqlite3.fleet-*")) == [kept]
    assert await running.get(code="00000003", did=BARRIER) == (200, "status=ACK")


async def test_a_reload_keeps_the_fleets_set_and_deltas(
        broker: Mosquitto, probe: Probe, start_daemon: Any, tmp_path: Path) -> None:
    """A reload of the site's file builds a new book: the fleet's set and its deltas are
    carried over (policies compiled again for the new config), a delta still hides the
    set's copy of its id."""
    key, _, running, _fleetset = await site_with_set(broker, start_daemon, tmp_path, 100)
    settings = MqttConfig(host="127.0.0.1", port=broker.port)
    async with connect(settings, "staff") as client:
        await setstaff.change(client, key, "gated/staff/sync", "c7",
                                setstaff.hashed_body({"name": "Moved", "gates": ["door"]},
                                                       "77007700", key.hmac))
    await eventually(lambda: running.daemon.bridge.codes.get("fleet", "c7") is not None)
    extra = (mqtt_table(broker, FLEET_MQTT)
             + '[[codes]]\nname = "New"\ncode = "112233"\ngates = ["door"]\n')
    (tmp_path / "gated.toml").write_text(config_text(tmp_path, extra))
    before = running.daemon.gatekeeper.book
    assert await running.daemon.reload("test")
    assert running.daemon.gatekeeper.book is not before
    assert await running.get(code="112233", did=DOOR) == (200, "status=ACK")
    assert running.daemon.gatekeeper.book.fleet is not None
    assert await running.get(code="00000042", did=BARRIER) == (200, "status=ACK")
    assert await running.get(code="77007700", did=DOOR) == (200, "status=ACK")
    assert await running.get(code="00000007", did=BARRIER) == (200, "status=NAK")


async def test_a_broker_that_lost_the_manifest_withdraws_no_fleet_code(
        tmp_path: Path, start_daemon: Any) -> None:
    """A site whose broker comes back empty (replaced, its store lost): the fleet's set and
    its deltas stay in force, and the site raises codes_incomplete; once the manifest is
    published again, codes_complete."""
    broker = Mosquitto(tmp_path / "broker")
    broker.start()
    try:
        key = fleet_key(tmp_path)
        await publish_set(broker, key, entries(key, 50))
        settings = MqttConfig(host="127.0.0.1", port=broker.port)
        async with connect(settings, "staff") as client:
            await setstaff.change(client, key, "gated/staff/sync", "delta",
                                    setstaff.hashed_body({"gates": ["*"]}, "31313131", key.hmac))
        running = await start_daemon(mqtt_table(broker, FLEET_MQTT))
        bridge = running.daemon.bridge
        bridge.fleetset.grace = 0.5
        await eventually(lambda: bridge.fleetset.complete)
        await eventually(lambda: bridge.codes.get("fleet", "delta") is not None)
        connections = bridge.synced_connections
        broker.stop()
        for stored in broker.dir.glob("mosquitto.db*"):
            stored.unlink()
        broker.start()
        probe = await Probe(broker.port).connect()
        await probe.subscribe("gated/test/alarms")
        await eventually(lambda: bridge.synced_connections > connections, within=10)
        (alarm,) = await probe.wait_for("gated/test/alarms", 1, within=5)
        assert alarm.json()["alarm"] == "codes_incomplete"
        assert alarm.json()["manifest_on_broker"] is False
        assert await running.get(code="31313131", did=BARRIER) == (200, "status=ACK")
        assert await running.get(code="00000042", did=BARRIER) == (200, "status=ACK")
        # Published again, without the delta: in force as published, the delta gone.
        await publish_set(broker, key, entries(key, 50))
        alarms = await probe.wait_for("gated/test/alarms", 2, within=5)
        assert alarms[-1].json()["alarm"] == "codes_complete"
        assert await running.get(code="31313131", did=BARRIER) == (200, "status=NAK")
        assert await running.get(code="00000042", did=BARRIER) == (200, "status=ACK")
        await probe.disconnect()
    finally:
        broker.stop()


async def test_deltas_past_the_limit_are_folded_into_a_new_set(
        broker: Mosquitto, probe: Probe, start_daemon: Any, tmp_path: Path) -> None:
    """The 33rd delta makes the command publish a whole new set holding every code and
    clear the deltas: a connect never costs more than 97 messages; the site has them all."""
    key, _, running, fleetset = await site_with_set(broker, start_daemon, tmp_path, 20)
    settings = MqttConfig(host="127.0.0.1", port=broker.port)
    manifests = []
    async with connect(settings, "staff") as client:
        for n in range(codeset.MAX_DELTAS + 1):
            manifests.append(await setstaff.change(
                client, key, "gated/staff/sync", f"d{n}",
                setstaff.hashed_body({"gates": ["*"]}, f"{n:04d}1111", key.hmac)))
    assert len(manifests[-2].deltas) == codeset.MAX_DELTAS
    assert manifests[-1].deltas == {} and manifests[-1].codes == 20 + codeset.MAX_DELTAS + 1
    await eventually(lambda: fleetset.complete and fleetset.manifest is not None
                     and fleetset.manifest.serial == manifests[-1].serial)
    for n in (0, codeset.MAX_DELTAS):
        assert await running.get(code=f"{n:04d}1111", did=BARRIER) == (200, "status=ACK")
    assert await running.get(code="00000019", did=BARRIER) == (200, "status=ACK")
    await probe.subscribe(f"{FLEET}/codes/+")
    await asyncio.sleep(0.2)
    assert [m for m in probe.on(f"{FLEET}/codes/+") if m.payload] == []


async def test_a_set_that_cannot_be_written_is_kept_out_and_tried_again(
        broker: Mosquitto, probe: Probe, start_daemon: Any, tmp_path: Path) -> None:
    """A new set arriving while the state directory cannot take its file (a full disk):
    the set in force stays, the site says it is incomplete, and once the disk has room
    the checked set is written and applied without the broker sending it again."""
    await probe.subscribe("gated/test/alarms")
    key, first, running, fleetset = await site_with_set(broker, start_daemon, tmp_path, 10)
    fleetset.grace = 0.5
    state = tmp_path / "state"
    bigger = codeset.build(entries(key, 20))
    blocker = state / f"entries.sqlite3.fleet-{codeset.version_of(bigger)[:16]}"
    blocker.mkdir()  # the file cannot take its place: as good as a full disk
    try:
        (chunk,) = codeset.split(bigger)
        await probe.publish(f"{FLEET}/set/0", chunk, retain=True)
        await probe.publish(f"{FLEET}/set", signed(key, codeset.Manifest(
            serial=first.serial + (1 << 16), version=codeset.version_of(bigger),
            size=len(bigger), chunks=1, codes=20, key=first.key)), retain=True)
        (alarm,) = await probe.wait_for("gated/test/alarms", 1, within=5)
        assert alarm.json()["alarm"] == "codes_incomplete"
        assert await running.get(code="00000009", did=BARRIER) == (200, "status=ACK")
        assert await running.get(code="00000019", did=BARRIER) == (200, "status=NAK")
    finally:
        blocker.rmdir()
    alarms = await probe.wait_for("gated/test/alarms", 2, within=5)
    assert alarms[-1].json()["alarm"] == "codes_complete"
    assert await running.get(code="00000019", did=BARRIER) == (200, "status=ACK")


async def test_a_damaged_local_set_is_never_read(
        broker: Mosquitto, start_daemon: Any, tmp_path: Path) -> None:
    """A bit flipped in the set's file (an SD card): at start the site uses none of it,
    and takes the set from the broker again."""
    _key, _, running, _fleetset = await site_with_set(broker, start_daemon, tmp_path, 100)
    await running.stop()
    (path,) = (tmp_path / "state").glob("entries.sqlite3.fleet-*")
    data = bytearray(path.read_bytes())
    data[-10] ^= 1
    path.write_bytes(bytes(data))
    broker.stop()
    running = await start_daemon(mqtt_table(broker, FLEET_MQTT))
    assert len(running.daemon.gatekeeper.book.fleet) == 0
    assert await running.get(code="00000042", did=BARRIER) == (200, "status=NAK")
    broker.start()
    await eventually(lambda: running.daemon.bridge.fleetset.complete, within=10)
    assert await running.get(code="00000042", did=BARRIER) == (200, "status=ACK")


async def test_a_message_that_is_no_code_under_the_fleet_prefix_breaks_no_staff_command(
        broker: Mosquitto, probe: Probe, start_daemon: Any, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Bytes that are no fleet code, retained under the fleet's codes: a put lists none of
    them in the manifest (sites would wait for them forever); a whole set made from the
    broker's leaves them out; nothing fails with a traceback."""
    key, _, running, fleetset = await site_with_set(broker, start_daemon, tmp_path, 10)
    for code_id, junk in [("junk", b"\xff\x00not json"), ("list", b"[1, 2]"),
                          ("nocode", b'{"gates": ["*"]}'), ("types", b'{"code": "1234", '
                                                                     b'"gates": "barrier"}')]:
        await probe.publish(f"{FLEET}/codes/{code_id}", junk, retain=True)
    config = str(tmp_path / "gated.toml")
    code, out = await gated(capsys, "-c", config, "codes", "put", "--fleet", "good",
                            "--code", "64646464", "--gates", "*", "--wait", "0")
    assert code == 0, out
    await eventually(lambda: fleetset.complete and fleetset.manifest is not None
                     and set(fleetset.manifest.deltas) == {"good"})
    assert await running.get(code="64646464", did=BARRIER) == (200, "status=ACK")
    settings = MqttConfig(host="127.0.0.1", port=broker.port)
    async with connect(settings, "staff-fold") as client:
        on_broker = await setstaff.read(client, key, "gated/staff/sync")
    assert set(setstaff.current(on_broker, key)) == {f"c{n}" for n in range(10)} | {"good"}


def every_policy_past_the_table(sections: dict[str, bytearray]) -> None:
    for at in range(len(sections["prefixes"]) // 8):
        set_record(sections, at, policy=1)  # entries() share one policy: index 0


MALFORMED = {
    "a policy index past the table": (edit(every_policy_past_the_table),
                                      "record 0 points to policy 1, past the table of 1"),
    "a section cut short": (cut("prefixes", 3), "prefixes section: 797 bytes, not a whole "
                                                "number of 8-byte digests"),
}


@pytest.mark.parametrize("malformed", MALFORMED)
async def test_a_set_whose_insides_lie_is_never_applied_and_the_site_says_so(
        broker: Mosquitto, probe: Probe, start_daemon: Any, tmp_path: Path,
        malformed: str) -> None:
    """A set whose bytes are the ones its manifest names, but whose book lies inside: the
    site applies none of it (its codes answer NAK, not ERR), writes none of it, keeps
    the set in force, raises codes_incomplete, and no task ends in a traceback."""
    await probe.subscribe("gated/test/alarms")
    key, first, running, fleetset_ = await site_with_set(broker, start_daemon, tmp_path, 100)
    fleetset_.grace = 0.5
    corrupt, message = MALFORMED[malformed]
    bad = corrupt(*sections_of(codeset.build(entries(key, 100, start=500))))
    (chunk,) = codeset.split(bad)
    with capture_logs() as logs:
        await offer(probe, key, first, fleetset_, bad, chunk)
        assert await running.get(code="00000501", did=BARRIER) == (200, "status=NAK")
        assert await running.get(code="00000001", did=BARRIER) == (200, "status=ACK")
        (alarm,) = await probe.wait_for("gated/test/alarms", 1, within=5)
    assert alarm.json()["alarm"] == "codes_incomplete"
    assert fleetset_.manifest is not None and fleetset_.manifest.version == first.version
    assert [e for e in logs if e["event"] == "mqtt task failed"] == []
    refused = [e for e in logs if e["event"] == "the fleet's code set not applied; keeping "
               "the one in force"]
    assert refused and all(message in e["error"] for e in refused)
    assert [p.name for p in (tmp_path / "state").glob("entries.sqlite3.fleet-*")] == [
        setchannel.set_path(tmp_path / "state" / "entries.sqlite3", first.version).name]


async def test_a_local_set_whose_insides_lie_never_stops_the_site(
        broker: Mosquitto, start_daemon: Any, tmp_path: Path) -> None:
    """A local copy whose file is the one its manifest names but whose book lies inside (a
    section cut short: a set kept before sets were checked, or written by hand): the site
    starts without it, answers none of its codes, and takes the set from the broker."""
    _key, _, running, fleetset_ = await site_with_set(broker, start_daemon, tmp_path, 100)
    kept = fleetset_.manifest
    await running.stop()
    state = tmp_path / "state"
    (path,) = state.glob("entries.sqlite3.fleet-*")
    bad = cut("prefixes", 3)(*sections_of(path.read_bytes()))
    forged = msgspec.structs.replace(kept, version=codeset.version_of(bad), size=len(bad))
    path.unlink()
    setchannel.set_path(state / "entries.sqlite3", forged.version).write_bytes(bad)
    with sqlite3.connect(state / "entries.sqlite3") as db:
        db.execute("UPDATE managed_codes SET body = ? WHERE scope = ? AND id = ?",
                   (forged.encode(), *setchannel.LOCAL["fleet"]))
    db.close()
    broker.stop()
    running = await start_daemon(mqtt_table(broker, FLEET_MQTT))
    assert len(running.daemon.gatekeeper.book.fleet) == 0
    assert await running.get(code="00000042", did=BARRIER) == (200, "status=NAK")
    broker.start()
    await eventually(lambda: running.daemon.bridge.fleetset.complete, within=10)
    assert await running.get(code="00000042", did=BARRIER) == (200, "status=ACK")
