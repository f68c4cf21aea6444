"""Codes managed over MQTT, observed the way a caller sees them: webhook answers."""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from gated.book.compiler import parse
from gated.book.config import MqttConfig
from gated.book.messages import (
    MAX_BODY,
    NOT_ACCEPTED,
    ClashWatch,
    ManagedCodes,
    NotHere,
    Rejected,
    compile_policy,
)
from gated.book.messages import parse as parse_code
from gated.commands import sets as setstaff
from gated.core.errors import ConfigError
from gated.mqtt.link import connect
from gated.site.store import MIGRATIONS, SCHEMA_VERSION, Store

from .broker import Mosquitto, Probe, entries, eventually, mqtt_ready, mqtt_table
from .helpers import BARRIER, DOOR, FakeClock, config_text
from .setkeys import make_keys

PREFIX = "gated/test"
ERRORS = f"{PREFIX}/codes/+/error"


def body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


async def put(probe: Probe, code_id: str, payload: bytes, *, topic: str = PREFIX) -> Any:
    """Publish a code as staff do (retained) and wait for gated's verdict: None or the error."""
    error_topic = f"{topic}/codes/{code_id}/error" + ("/test" if topic != PREFIX else "")
    before = len(probe.on(error_topic))
    await probe.publish(f"{topic}/codes/{code_id}", payload, retain=True)
    verdicts = await probe.wait_for(error_topic, before + 1)
    verdict = verdicts[-1]
    assert verdict.retain is False  # a live verdict, not an old one the broker kept
    return verdict.json() if verdict.payload else None


async def test_code_put_changed_deleted_and_invalid(broker: Mosquitto, probe: Probe,
                                                   start_daemon: Any) -> None:
    """A code published over MQTT opens; a new version replaces it; a bad version is
    refused with a reason and the previous one stays; an empty message deletes it; the
    digits appear in no log line."""
    with capture_logs() as logs:
        await _put_change_delete(broker, probe, start_daemon)
    assert any(e["event"] == "managed code applied" for e in logs)
    assert not {"246810", "135790", "999999"} & set(re.findall(r"\d{6}", repr(logs)))


async def _put_change_delete(broker: Mosquitto, probe: Probe, start_daemon: Any) -> None:
    await probe.subscribe(ERRORS)
    running = await start_daemon(mqtt_table(broker))
    await mqtt_ready(running)
    assert await running.get(code="246810", did=BARRIER) == (200, "status=NAK")

    assert await put(probe, "visitor-1", body(name="Visitor", code="246810",
                                              gates=["barrier"], callername="Hello")) is None
    assert await running.get(code="246810", did=BARRIER) == (
        200, "status=ACK&callername=Hello")
    assert await running.get(code="246810", did=DOOR) == (200, "status=NAK")

    assert await put(probe, "visitor-1", body(name="Visitor", code="135790",
                                              gates=["barrier", "door"])) is None
    assert await running.get(code="246810", did=BARRIER) == (200, "status=NAK")
    assert await running.get(code="135790", did=DOOR) == (200, "status=ACK")

    for bad, reason in [
        (body(code="12", gates=["barrier"]), "code: a code is 4 to 16 digits"),
        (body(code="999999", gates=["nowhere"]), "gates[0]: no gate named 'nowhere'"),
        (body(code="999999", gates=["barrier"], colour="red"), "colour: unknown key"),
        (body(code=999999, gates=["barrier"]), "code: Expected `str | null`, got `int`"),
        (b"{not json", "not valid JSON"),
        (body(code="999999", gates=["barrier"], valid_from="2026-02-01T00:00:00",
              valid_until="2026-01-01T00:00:00"), "valid_until: must be after valid_from"),
    ]:
        error = await put(probe, "visitor-1", bad)
        assert error["error"] == reason
        assert (error["id"], error["scope"], error["site"]) == ("visitor-1", "site", "test")
        assert "999999" not in json.dumps(error)
        assert await running.get(code="135790", did=DOOR) == (200, "status=ACK")

    # Deleting clears the standing refusal too.
    assert await put(probe, "visitor-1", b"") is None
    assert await running.get(code="135790", did=DOOR) == (200, "status=NAK")
    granted = [e for e in entries(running) if e.status == "ACK"]
    assert {(e.credential, e.credential_id, e.kind, e.reason) for e in granted} == {
        ("Visitor", "visitor-1", "managed", "granted_managed")}


async def test_clash_with_a_file_code_is_refused_not_merged(broker: Mosquitto, probe: Probe,
                                                           start_daemon: Any) -> None:
    """Digits or an id already used in the file are refused, and the file's code stays."""
    await probe.subscribe(ERRORS)
    running = await start_daemon(mqtt_table(broker))
    await mqtt_ready(running)
    error = await put(probe, "sneaky", body(code="5555", gates=["barrier", "door"]))
    assert error["error"] == NOT_ACCEPTED
    error = await put(probe, "Demo", body(code="424242", gates=["barrier"]))
    assert error["error"] == "id 'Demo' is already used by another credential"
    assert await running.get(code="5555", did=DOOR) == (200, "status=NAK")  # wrong_gate
    assert await running.get(code="424242", did=BARRIER) == (200, "status=NAK")
    assert await running.get(code="5555", did=BARRIER) == (200, "status=ACK")
    assert entries(running)[-1].credential == "Barrier only"


async def test_a_digit_clash_tells_the_publisher_nothing_and_probing_raises_an_alarm(
        broker: Mosquitto, probe: Probe, start_daemon: Any) -> None:
    """A code taking another credential's digits gets the same refusal whatever it hit,
    is kept nowhere, and a burst of them is one code_clashes alarm naming no digits."""
    await probe.subscribe(ERRORS, f"{PREFIX}/alarms")
    running = await start_daemon(mqtt_table(broker))
    await mqtt_ready(running)
    assert await put(probe, "mine", body(code="246810", gates=["barrier"])) is None
    taken = ["5555", "471123", "9000", "246810", "5555", "471123", "9000"]
    with capture_logs() as logs:
        for n, digits in enumerate(taken):
            error = await put(probe, f"probe-{n}", body(code=digits, gates=["barrier"]))
            assert error["error"] == NOT_ACCEPTED, digits
        (alarm,) = await probe.wait_for(f"{PREFIX}/alarms", 1)
    assert [e["alarm"] for e in logs if "alarm" in e] == ["code_clashes"]
    assert (alarm.json()["alarm"], alarm.json()["clashes"]) == ("code_clashes", 5)
    assert not set(taken) & set(re.findall(r"\d{4,}", alarm.payload.decode()))
    assert not set(taken) & set(re.findall(r"\d{4,}", repr(logs)))
    store = running.daemon.gatekeeper.store
    await store.flush()
    assert [r[0] for r in sqlite3.connect(store.path).execute(
        "SELECT id FROM managed_codes")] == ["mine"]
    assert running.daemon.bridge.codes.ids("site") == {"mine"}
    assert await running.get(code="5555", did=BARRIER) == (200, "status=ACK")
    assert entries(running)[-1].credential == "Barrier only"


async def test_managed_code_fields_are_bounded_and_deep_nesting_is_refused(
        broker: Mosquitto, probe: Probe, start_daemon: Any) -> None:
    """A callername or destination past its bound, a message past 64 KiB, or JSON nested
    past any code's shape is refused on the error topic and changes nothing; a callername
    of exactly 64 characters is applied."""
    await probe.subscribe(ERRORS)
    running = await start_daemon(mqtt_table(broker))
    await mqtt_ready(running)
    longest = "L" * 64
    assert await put(probe, "v", body(code="246810", gates=["barrier"],
                                      callername=longest, destination="2" * 64)) is None
    answer = f"status=ACK&callername={longest}&destination={'2' * 64}"
    assert await running.get(code="246810", did=BARRIER) == (200, answer)
    nested = b'{"gates": ' + b"[" * 30_000 + b"]" * 30_000 + b"}"
    assert len(nested) <= MAX_BODY
    with capture_logs() as logs:
        for bad, reason in [
            (body(code="246810", gates=["barrier"], callername="L" * 65),
             "callername: Expected `str` of length <= 64"),
            (body(code="246810", gates=["barrier"], destination="2" * 65),
             "destination: Expected `str` of length <= 64"),
            (body(code="246810", gates=["barrier"], destination="2" * (1 << 20)),
             f"message too large (at most {MAX_BODY} bytes)"),
            (body(code="246810", gates=["barrier"], callers=["+31612345678"] * 1001),
             "callers: Expected `array` of length <= 1000"),
            (nested, "not valid JSON: too deeply nested"),
        ]:
            error = await put(probe, "v", bad)
            assert error["error"] == reason
            assert await running.get(code="246810", did=BARRIER) == (200, answer)
    assert not [e for e in logs if e["log_level"] == "error"]
    await running.daemon.gatekeeper.store.flush()
    (kept,) = sqlite3.connect(running.daemon.gatekeeper.store.path).execute(
        "SELECT body FROM managed_codes")
    assert json.loads(kept[0])["callername"] == longest


async def test_restart_with_the_broker_down_keeps_managed_codes(
        broker: Mosquitto, probe: Probe, start_daemon: Any) -> None:
    """Managed codes live on in the local copy: a restart without a broker still opens."""
    await probe.subscribe(ERRORS)
    running = await start_daemon(mqtt_table(broker))
    await mqtt_ready(running)
    assert await put(probe, "visitor-1", body(code="246810", gates=["barrier"])) is None
    await running.stop()
    await probe.disconnect()
    broker.stop()

    again = await start_daemon(mqtt_table(broker))
    assert not again.daemon.link.connected
    assert await again.get(code="246810", did=BARRIER) == (200, "status=ACK")


async def test_code_deleted_while_away_is_withdrawn_on_reconnect(
        broker: Mosquitto, probe: Probe, start_daemon: Any) -> None:
    """A delete leaves nothing retained to receive; gated notices the absence once in sync."""
    await probe.subscribe(ERRORS)
    running = await start_daemon(mqtt_table(broker))
    await mqtt_ready(running)
    assert await put(probe, "gone", body(code="246810", gates=["barrier"])) is None
    assert await put(probe, "kept", body(code="135790", gates=["barrier"])) is None
    await running.stop()
    await probe.publish(f"{PREFIX}/codes/gone", b"", retain=True)

    again = await start_daemon(mqtt_table(broker))
    await mqtt_ready(again)
    assert await again.get(code="246810", did=BARRIER) == (200, "status=NAK")
    assert await again.get(code="135790", did=BARRIER) == (200, "status=ACK")
    await again.daemon.gatekeeper.store.flush()
    store = again.daemon.gatekeeper.store.path
    assert [r[0] for r in sqlite3.connect(store).execute("SELECT id FROM managed_codes")] == [
        "kept"]


async def test_fleet_codes_open_at_every_site(broker: Mosquitto, probe: Probe,
                                              start_daemon: Any, tmp_path: Path) -> None:
    """A code under the fleet prefix (published by staff, listed in the signed set)
    applies here too; one for other sites' gates does not; a site code may not take a
    fleet code's id. An applied fleet code is not answered with an empty verdict: from
    every site on every change, that is a storm."""
    fleet = "gated/fleet"
    keys = make_keys(tmp_path / "state" / "fleet.key", fleet)
    await probe.subscribe(ERRORS, f"{fleet}/codes/+/error/test")
    running = await start_daemon(mqtt_table(broker, f'fleet_prefix = "{fleet}"'))
    await mqtt_ready(running)
    settings = MqttConfig(host="127.0.0.1", port=broker.port)

    async def staff(code_id: str, payload: bytes) -> None:
        async with connect(settings, "staff") as client:
            await setstaff.change(client, keys, "gated/staff/sync", code_id, payload)

    await staff("courier", body(code="808080", gates=["*"]))  # the fleet's first: a set
    fleet = running.daemon.bridge.fleetset
    await eventually(lambda: fleet.complete and len(running.daemon.gatekeeper.book.fleet) == 1)
    assert await running.get(code="808080", did=BARRIER) == (200, "status=ACK")
    assert await running.get(code="808080", did=DOOR) == (200, "status=ACK")

    await staff("elsewhere", body(code="717171", gates=["zuid-gate"]))
    # Handled in order: by the time this verdict arrives, "elsewhere" was seen.
    error = await put(probe, "courier", body(code="909090", gates=["barrier"]))
    assert error["error"] == "id 'courier' is already used by a fleet code"
    assert await running.get(code="717171", did=BARRIER) == (200, "status=NAK")
    assert await running.get(code="909090", did=BARRIER) == (200, "status=NAK")
    assert running.daemon.bridge.codes.get("fleet", "elsewhere") is None
    assert probe.on(f"{fleet}/codes/elsewhere/error/test") == []
    assert probe.on(f"{fleet}/codes/courier/error/test") == []


async def test_reload_keeps_managed_codes_and_reports_new_clashes(
        broker: Mosquitto, probe: Probe, start_daemon: Any, tmp_path: Any) -> None:
    """A file reload carries managed codes over; one whose digits the file now takes is
    dropped and reported."""
    await probe.subscribe(ERRORS)
    running = await start_daemon(mqtt_table(broker))
    await mqtt_ready(running)
    assert await put(probe, "visitor-1", body(code="246810", gates=["barrier"])) is None
    extra = mqtt_table(broker) + '[[codes]]\nname = "New"\ncode = "112233"\ngates = ["door"]\n'
    (tmp_path / "gated.toml").write_text(config_text(tmp_path, extra))
    assert await running.daemon.reload("test")
    assert await running.get(code="246810", did=BARRIER) == (200, "status=ACK")
    assert await running.get(code="112233", did=DOOR) == (200, "status=ACK")

    extra += '[[codes]]\nname = "Taker"\ncode = "246810"\ngates = ["door"]\n'
    (tmp_path / "gated.toml").write_text(config_text(tmp_path, extra))
    before = len(probe.on(f"{PREFIX}/codes/visitor-1/error"))
    assert await running.daemon.reload("test")
    (*_, error) = await probe.wait_for(f"{PREFIX}/codes/visitor-1/error", before + 1)
    assert error.json()["error"] == NOT_ACCEPTED
    assert await running.get(code="246810", did=BARRIER) == (200, "status=NAK")
    assert await running.get(code="246810", did=DOOR) == (200, "status=ACK")


async def test_codes_changed_while_a_reload_builds_its_book_are_in_the_new_one(
        broker: Mosquitto, probe: Probe, start_daemon: Any, tmp_path: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The reload compiles the managed codes for the new book in a thread; a code
    changed, withdrawn or added meanwhile is as the broker says after the swap."""
    from gated.mqtt import bridge as bridge_mod

    await probe.subscribe(ERRORS)
    running = await start_daemon(mqtt_table(broker))
    await mqtt_ready(running)
    assert await put(probe, "a", body(code="246810", gates=["barrier"])) is None
    assert await put(probe, "b", body(code="135791", gates=["barrier"])) is None
    started, go_on = threading.Event(), threading.Event()
    real = bridge_mod.rebased

    def held(*args: Any) -> Any:  # the thread's work, held until the messages are in
        started.set()
        go_on.wait(10)
        return real(*args)

    monkeypatch.setattr(bridge_mod, "rebased", held)
    reload = asyncio.create_task(running.daemon.reload("test"))
    assert await asyncio.to_thread(started.wait, 10)
    assert await put(probe, "a", body(code="246811", gates=["barrier"])) is None
    await probe.publish(f"{PREFIX}/codes/b", b"", retain=True)
    assert await put(probe, "c", body(code="97531", gates=["barrier"])) is None
    bridge = running.daemon.bridge
    await eventually(lambda: bridge.codes.get("site", "b") is None)
    go_on.set()
    assert await reload
    assert sorted(bridge.codes.applied) == ["a", "c"]
    assert await running.get(code="246811", did=BARRIER) == (200, "status=ACK")
    assert await running.get(code="97531", did=BARRIER) == (200, "status=ACK")
    assert await running.get(code="246810", did=BARRIER) == (200, "status=NAK")
    assert await running.get(code="135791", did=BARRIER) == (200, "status=NAK")


async def test_deleting_a_code_resets_its_uses(broker: Mosquitto, probe: Probe,
                                               start_daemon: Any) -> None:
    """A single-use code issued again under the same id after a delete works once more."""
    await probe.subscribe(ERRORS)
    running = await start_daemon(mqtt_table(broker))
    await mqtt_ready(running)
    once = body(code="246810", gates=["barrier"], max_uses=1)
    assert await put(probe, "visitor-1", once) is None
    assert await running.get(code="246810", did=BARRIER) == (200, "status=ACK")
    assert await running.get(code="246810", did=BARRIER) == (200, "status=NAK")
    await probe.publish(f"{PREFIX}/codes/visitor-1", b"", retain=True)
    bridge = running.daemon.bridge
    await eventually(lambda: bridge.codes.get("site", "visitor-1") is None)
    assert await put(probe, "visitor-1", once) is None
    assert await running.get(code="246810", did=BARRIER) == (200, "status=ACK")


# -- the pure part ------------------------------------------------------------------


def site_config(tmp_path: Any) -> Any:
    config, _book = parse(config_text(tmp_path))
    return config


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (b"[1, 2]", "expected a JSON object with the fields of a [[codes]] entry"),
        (body(code="123456", gates=["barrier"], id="other"),
         "id: must be the id in the topic, or left out"),
        (body(code="123456"), "gates: a code needs gates to open, or callername/destination "
                              "to route"),
        (body(code="123456", gates=["barrier"], schedule=["someday"]), "schedule:"),
        (body(code="123456", gates=["barrier"], callers=["not a number"]), "callers[0]:"),
        (body(code="123456", gates=["barrier"], max_uses=0), "max_uses: Expected `int` >= 1"),
        (body(code="1" * 17, gates=["barrier"]), "code: Expected `str` of length <= 16"),
        (body(code="123456", gates=["barrier"] * 257), "gates: Expected `array` of length "
                                                        "<= 256"),
        (body(code="123456", gates=["g" * 33]), "gates[0]: Expected `str` of length <= 32"),
        (body(code="123456", gates=["barrier"], schedule=["mon 07:00-08:00"] * 65),
         "schedule: Expected `array` of length <= 64"),
        (body(code="123456", gates=["barrier"], callers=["1" * 33]),
         "callers[0]: Expected `str` of length <= 32"),
        (body(name="N" * 121, code="123456", gates=["barrier"]),
         "name: Expected `str` of length <= 120"),
        (b"[" * 5000 + b"]" * 5000, "not valid JSON: too deeply nested"),
    ],
)
def test_refusals_name_the_field_and_never_the_digits(tmp_path: Any, payload: bytes,
                                                      error: str) -> None:
    """Each refusal says which field is wrong, in words safe to publish."""
    with pytest.raises(Rejected) as caught:
        parse_code("site", "visitor-1", payload, site_config(tmp_path))
    assert str(caught.value).startswith(error)
    assert "123456" not in str(caught.value)


def test_the_file_bounds_codes_as_mqtt_does(tmp_path: Any) -> None:
    """[[codes]] in the file meet the same bounds, and the error names key and line."""
    long_name = '[[codes]]\nname = "Long"\ncode = "112233"\ngates = ["barrier"]\n' \
                f'callername = "{"L" * 65}"\n'
    with pytest.raises(ConfigError) as caught:
        parse(config_text(tmp_path, long_name))
    assert caught.value.path == "codes[3].callername"
    assert "at most 64 characters" in str(caught.value)
    assert caught.value.line == config_text(tmp_path, long_name).splitlines().index(
        f'callername = "{"L" * 65}"') + 1


def test_clash_alarm_once_per_burst() -> None:
    """Five clashes within ten minutes raise the alarm once per ten minutes; slower ones
    never do."""
    clock = FakeClock()
    watch = ClashWatch()
    slow = []
    for _ in range(10):
        slow.append(watch.clashed(clock.monotonic()))
        clock.advance(151)
    assert not any(slow)
    clock.advance(600)
    assert [watch.clashed(clock.monotonic()) for _ in range(20)] == [False] * 4 + [True] + [
        False] * 15
    clock.advance(599)
    assert not watch.clashed(clock.monotonic())
    clock.advance(2)  # the next window: the one at 599 s and four more make five
    assert [watch.clashed(clock.monotonic()) for _ in range(5)] == [False] * 3 + [True, False]


def test_bad_ids_and_foreign_fleet_codes(tmp_path: Any) -> None:
    """Ids outside the allowed characters are refused; a fleet code for other gates is
    NotHere; '*' means every gate of this site."""
    config = site_config(tmp_path)
    with pytest.raises(Rejected, match="code id"):
        parse_code("site", "a b", body(code="123456", gates=["barrier"]), config)
    with pytest.raises(NotHere):
        parse_code("fleet", "x", body(code="123456", gates=["zuid"]), config)
    everywhere = parse_code("fleet", "x", body(code="123456", gates=["*"]), config)
    assert everywhere.credential.gates == {"barrier", "door"}
    mixed = parse_code("fleet", "x", body(code="123456", gates=["zuid", "door"]), config)
    assert mixed.credential.gates == {"door"}
    assert "123456" not in repr(everywhere)


def test_a_refused_replacement_keeps_the_previous_version(tmp_path: Any) -> None:
    """put() that clashes restores the code it was replacing."""
    config, book = parse(config_text(tmp_path))
    codes = ManagedCodes()
    first = parse_code("site", "v", body(code="246810", gates=["barrier"]), config)
    codes.put(book, first)
    clash = parse_code("site", "v", body(code="5555", gates=["barrier"]), config)
    with pytest.raises(Rejected):
        codes.put(book, clash)
    found = book.code(book.digest("246810"))
    assert found is not None and found.id == "v"
    assert codes.get("site", "v") is first


def test_a_schema_1_store_gains_the_local_copy_table(tmp_path: Any) -> None:
    """An entry store written by the previous schema opens, keeps its rows, and can hold
    managed codes."""
    path = tmp_path / "old.sqlite3"
    old = sqlite3.connect(path)
    old.executescript(MIGRATIONS[0] + "INSERT INTO entries (time, status, reason) "
                      "VALUES (1.0, 'ACK', 'granted_code'); PRAGMA user_version = 1;")
    old.close()
    store = Store.open(path)
    try:
        assert store.load_codes() == []
        conn = sqlite3.connect(path)
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        assert conn.execute("SELECT count(*) FROM entries").fetchone() == (1,)
        conn.close()
    finally:
        store.close()


def test_codes_from_the_broker_are_named_for_what_they_are(tmp_path: Path) -> None:
    """A fleet's code is kind fleet, a site's code over the broker kind managed, and only a
    code `gated codes issue` made is a visitor: entries, events and `codes ls` say which."""
    config = parse(config_text(tmp_path))[0]
    courier = parse_code("fleet", "courier", body(name="Courier", code="246801",
                                                  gates=["barrier"]), config)
    staff = parse_code("site", "cleaner", body(name="Cleaner", code="246802",
                                               gates=["barrier"]), config)
    visitor = parse_code("site", "v-0a1b2c3d", body(name="Plumber", code="246803",
                                                    gates=["barrier"]), config)
    assert [c.credential.kind for c in (courier, staff, visitor)] == [
        "fleet", "managed", "visitor"]
    fields = {"gates": ["barrier"]}
    assert compile_policy(fields, config, "fleet").kind == "fleet"
    assert compile_policy(fields, config, "site").kind == "managed"
