"""Smart routing in the running daemon: webhook answers byte for byte, reloads, MQTT."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import urllib.parse
from pathlib import Path
from typing import Any

import pytest

from gated.cli import main

from .broker import Mosquitto, Probe, entries, mqtt_ready, mqtt_table
from .helpers import BARRIER, DOOR, RESIDENT, TOKEN, write_config

LINE = "+31501234500"
ACME = "+31201234567"
PREFIX = "gated/test"
ROUTES = """
[[routes]]
name = "Key accounts"
numbers = ["+31501234500", "+31501234567"]
callers = ["+31201234567", "+3120*"]
destination = "+31501234510"
callername = "Acme (key account)"

[[routes]]
name = "CRM"
file = "accounts.csv"
destination = "+31501234540"
"""
CSV = "number,destination,callername\n0301234567,+31501234541,Café Utrecht & Zn\n"


def routed(callername: str, destination: str) -> str:
    return urllib.parse.urlencode({"status": "ACK", "callername": callername,
                                   "destination": destination})


async def test_the_daemon_answers_routed_calls_byte_for_byte(start_daemon: Any,
                                                             tmp_path: Path) -> None:
    """A known caller without a code gets ACK with the route's callername and destination,
    url-encoded exactly as urlencode makes them, on a line and on a gate's number alike;
    nothing opens, and the entry names the route."""
    (tmp_path / "accounts.csv").write_text(CSV)
    running = await start_daemon(ROUTES)
    barrier = running.pin(17)
    assert await running.get(did=LINE, callerid="0201234567", code="") == (
        200, "status=ACK&callername=Acme+%28key+account%29&destination=%2B31501234510")
    assert await running.get(did=BARRIER, callerid="+31209999999") == (
        200, routed("Acme (key account)", "+31501234510"))
    assert await running.get(did=DOOR, callerid="+31301234567") == (
        200, "status=ACK&callername=Caf%C3%A9+Utrecht+%26+Zn&destination=%2B31501234541")
    assert await running.get(did=DOOR, callerid=ACME) == (200, "status=NAK")  # not its number
    assert await running.get(did=LINE, callerid="+31101234567") == (200, "status=NAK")
    assert await running.get(did="+31509999999", callerid=ACME) == (200, "status=NAK")
    # The resident on the gate's list opens it, before any route.
    assert await running.get(did=BARRIER, callerid=RESIDENT) == (200, "status=ACK")
    assert [s.state for s in barrier.states] == [False, True]
    rows = [(e.gate, e.status, e.reason, e.credential, e.kind, e.actuator, e.caller)
            for e in entries(running)]
    assert rows == [
        (None, "ACK", "routed_caller", "Key accounts", "route", "", ACME),
        ("barrier", "ACK", "routed_caller", "Key accounts", "route", "", "+31209999999"),
        ("door", "ACK", "routed_caller", "CRM", "route", "", "+31301234567"),
        ("door", "NAK", "unknown_caller", "", "", "", ACME),
        (None, "NAK", "no_route", "", "", "", "+31101234567"),
        (None, "NAK", "unknown_number", "", "", "", ACME),
        ("barrier", "ACK", "granted_caller", "", "", "pulsed", RESIDENT),
    ]


async def test_gated_call_explains_a_routed_answer(start_daemon: Any, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """gated call shows the destination and says a route answered and nothing opened."""
    (tmp_path / "accounts.csv").write_text(CSV)
    running = await start_daemon(ROUTES)
    code = await asyncio.to_thread(main, [
        "-c", str(tmp_path / "gated.toml"), "call", "--from", "020 123 4567", "--to", LINE,
        "--url", running.url, "--token", TOKEN])
    out = capsys.readouterr().out
    assert code == 0
    assert "destination: +31501234510" in out
    assert "reason: routed_caller (route 'Key accounts')" in out
    assert "nothing was opened" in out


async def test_check_config_summarises_routes(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """check-config counts routes and callers, names the lines and each file's rows."""
    (tmp_path / "accounts.csv").write_text(CSV)
    path = write_config(tmp_path, ROUTES)
    assert main(["check-config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "routes    2 route(s), 3 caller(s); lines: +31501234500" in out
    assert f"  file    {tmp_path / 'accounts.csv'}: 1 row(s)" in out


async def test_a_replaced_csv_is_reloaded_and_a_bad_one_keeps_the_old_routes(
        start_daemon: Any, tmp_path: Path) -> None:
    """The CSV reloads with the config: a bad row is refused (the old routes keep
    answering), a good export replacing the file is picked up without a SIGHUP."""
    csv = tmp_path / "accounts.csv"
    csv.write_text(CSV)
    running = await start_daemon(ROUTES)
    before = await running.get(did=DOOR, callerid="+31301234567")
    assert before[1].endswith("destination=%2B31501234541")
    csv.write_text(CSV + "not a number,,\n")
    assert await running.daemon.reload("test") is False
    assert await running.get(did=DOOR, callerid="+31301234567") == before
    replacement = tmp_path / "accounts.csv.new"
    replacement.write_text("number,destination\n0301234567,+31501234599\n")
    os.replace(replacement, csv)  # as an export job replaces it
    for _ in range(100):
        answer = await running.get(did=DOOR, callerid="+31301234567")
        if answer != before:
            break
        await asyncio.sleep(0.1)
    assert answer == (200, "status=ACK&destination=%2B31501234599")


# -- routes over MQTT -------------------------------------------------------------------


def body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


# The file makes LINE a line (routes over MQTT may answer there, never make one).
SALES_LINE = f"""
[[routes]]
name = "Sales"
numbers = ["{LINE}"]
callers = ["+3140*"]
destination = "+31501234590"
"""


async def put(probe: Probe, route_id: str, payload: bytes) -> Any:
    """Publish a route as staff do (retained) and wait for gated's verdict."""
    error_topic = f"{PREFIX}/routes/{route_id}/error"
    before = len(probe.on(error_topic))
    await probe.publish(f"{PREFIX}/routes/{route_id}", payload, retain=True)
    verdicts = await probe.wait_for(error_topic, before + 1)
    assert verdicts[-1].retain is False
    return verdicts[-1].json() if verdicts[-1].payload else None


async def test_routes_over_mqtt_put_refused_deleted(broker: Mosquitto, probe: Probe,
                                                    start_daemon: Any) -> None:
    """A route published over MQTT answers; a bad version is refused on its error topic
    and the previous one stays; a config reload keeps it; an empty message deletes it;
    routed calls go out on the events topic like every entry."""
    await probe.subscribe(f"{PREFIX}/routes/+/error", f"{PREFIX}/events")
    running = await start_daemon(mqtt_table(broker))
    await mqtt_ready(running)
    assert await running.get(did=DOOR, callerid=ACME) == (200, "status=NAK")
    assert await put(probe, "acme", body(name="Acme", callers=["+3120*"],
                                         destination="+31501234510")) is None
    assert await running.get(did=DOOR, callerid=ACME) == (
        200, "status=ACK&destination=%2B31501234510")
    for bad, reason in [
        (body(callers=["+3120*"]), "destination: a route needs a destination or a callername"),
        (body(callers=["+3120*"], destination="1", file="x.csv"), "file: unknown key"),
        (body(callers=["020*"], destination="1"), "callers[0]: a prefix is + and 1 to 15"),
        (body(callers=["+3120*"], destination="1", numbers=["nope"]),
         "numbers[0]: not a phone number"),
        (b"[1]", "expected a JSON object"),
    ]:
        error = await put(probe, "acme", bad)
        assert error["error"].startswith(reason), error
        assert (error["id"], error["scope"], error["site"]) == ("acme", "site", "test")
        assert await running.get(did=DOOR, callerid=ACME) == (
            200, "status=ACK&destination=%2B31501234510")
    (event, *_) = [m.json() for m in probe.on(f"{PREFIX}/events")
                   if m.json()["reason"] == "routed_caller"]
    assert (event["credential"], event["credential_id"], event["kind"], event["gate"]) == (
        "Acme", "acme", "route", "door")
    # A config reload carries the managed route over to the new book.
    assert await running.daemon.reload("test") is True
    assert await running.get(did=DOOR, callerid=ACME) == (
        200, "status=ACK&destination=%2B31501234510")
    assert await put(probe, "acme", b"") is None
    assert await running.get(did=DOOR, callerid=ACME) == (200, "status=NAK")


async def test_routes_over_mqtt_survive_a_restart_with_the_broker_down(
        broker: Mosquitto, probe: Probe, start_daemon: Any) -> None:
    """Routes live on in the store's local copy: a restart without a broker still routes;
    one deleted while gated was away is withdrawn once it is back in sync."""
    await probe.subscribe(f"{PREFIX}/routes/+/error")
    running = await start_daemon(mqtt_table(broker) + SALES_LINE)
    await mqtt_ready(running)
    assert await put(probe, "kept", body(callers=[ACME], destination="kept",
                                         numbers=[LINE])) is None
    assert await put(probe, "gone", body(callers=["+3130*"], destination="gone")) is None
    assert await running.get(did=LINE, callerid=ACME) == (200, "status=ACK&destination=kept")
    await running.stop()
    await probe.disconnect()
    broker.stop()

    offline = await start_daemon(mqtt_table(broker) + SALES_LINE)
    assert not offline.daemon.link.connected
    # The file's line, answered by the route over MQTT from its local copy.
    assert await offline.get(did=LINE, callerid=ACME) == (200, "status=ACK&destination=kept")
    assert await offline.get(did=DOOR, callerid="+31301234567") == (
        200, "status=ACK&destination=gone")
    await offline.stop()

    broker.start()
    deleter = await Probe(broker.port).connect()
    await deleter.publish(f"{PREFIX}/routes/gone", b"", retain=True)
    await deleter.disconnect()
    again = await start_daemon(mqtt_table(broker) + SALES_LINE)
    await mqtt_ready(again)
    assert again.daemon.bridge.synced_connections >= 1
    assert await again.get(did=DOOR, callerid="+31301234567") == (200, "status=NAK")
    assert await again.get(did=LINE, callerid=ACME) == (200, "status=ACK&destination=kept")
    await again.daemon.gatekeeper.store.flush()
    kept = sqlite3.connect(again.daemon.gatekeeper.store.path).execute(
        "SELECT id FROM managed_routes").fetchall()
    assert kept == [("kept",)]


async def test_gated_routes_put_ls_rm_round_trip(broker: Mosquitto, start_daemon: Any,
                                                 tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """routes put publishes and reports gated's verdict, refuses a bad route before
    publishing it; ls lists the file's routes and the broker's; rm deletes."""
    from .test_cli_codes import gated

    (tmp_path / "accounts.csv").write_text(CSV)
    running = await start_daemon(mqtt_table(broker) + ROUTES)
    await mqtt_ready(running)
    config = str(tmp_path / "gated.toml")
    code, out = await gated(capsys, "-c", config, "routes", "put", "sales", "--callers",
                            "+3140*,0612345678", "--destination", "+31501234590",
                            "--callername", "Sales", "--schedule", "mon-sun 00:00-24:00")
    assert (code, out.splitlines()) == (0, ["published gated/test/routes/sales",
                                            "applied by gated at site test"])
    assert await running.get(did=DOOR, callerid="+31401234567") == (
        200, "status=ACK&callername=Sales&destination=%2B31501234590")
    code, out = await gated(capsys, "-c", config, "routes", "put", "bad", "--callers", "040*",
                            "--destination", "1")
    assert code == 2 and out.startswith("not published: callers[0]: a prefix is")

    code, out = await gated(capsys, "-c", config, "routes", "ls")
    assert code == 0 and "Key accounts" in out and "accounts.csv: 1 " in out
    code, out = await gated(capsys, "-c", config, "routes", "ls", "--broker", "--json")
    (listed,) = [json.loads(line) for line in out.splitlines()]
    assert listed == {"scope": "site", "id": "sales", "name": "sales",
                      "callers": ["+3140*", "0612345678"], "destination": "+31501234590",
                      "callername": "Sales", "schedule": ["mon-sun 00:00-24:00"]}

    code, out = await gated(capsys, "-c", config, "routes", "rm", "sales")
    assert (code, out.strip()) == (0, "deleted gated/test/routes/sales")
    for _ in range(100):
        if running.daemon.bridge.routes.routes.get("site", "sales") is None:
            break
        await asyncio.sleep(0.02)
    assert await running.get(did=DOOR, callerid="+31401234567") == (200, "status=NAK")


async def test_fleet_routes_apply_at_every_site_and_share_no_id_with_site_routes(
        broker: Mosquitto, probe: Probe, start_daemon: Any) -> None:
    """A route under the fleet prefix routes here too, refused versions are reported on
    the site's own error topic under the fleet prefix, and a site route may not take a
    fleet route's id."""
    fleet = "gated/fleet"
    await probe.subscribe(f"{PREFIX}/routes/+/error", f"{fleet}/routes/+/error/test")
    running = await start_daemon(mqtt_table(broker, f'fleet_prefix = "{fleet}"'))
    await mqtt_ready(running)
    await probe.publish(f"{fleet}/routes/helpdesk", body(callers=["+31*"],
                                                        destination="+31501234599"),
                        retain=True)
    (verdict,) = await probe.wait_for(f"{fleet}/routes/helpdesk/error/test")
    assert verdict.payload == b""
    assert await running.get(did=DOOR, callerid=ACME) == (
        200, "status=ACK&destination=%2B31501234599")
    await probe.publish(f"{fleet}/routes/helpdesk", body(callers=["+31*"]), retain=True)
    (_, refused) = await probe.wait_for(f"{fleet}/routes/helpdesk/error/test", 2)
    assert refused.json()["error"].startswith("destination: a route needs")
    error = await put(probe, "helpdesk", body(callers=[ACME], destination="1"))
    assert error["error"] == "id 'helpdesk' is already used by a fleet route"
    assert await running.get(did=DOOR, callerid=ACME) == (
        200, "status=ACK&destination=%2B31501234599")


async def test_a_twiml_call_is_routed_at_once_and_a_line_asks_for_a_code(
        start_daemon: Any) -> None:
    """Over TwiML a known caller is answered at once with their route (callername said,
    then <Dial>); an unknown caller on a line is asked for a code, and a route-only code
    typed there routes; nothing opens either way."""
    from .test_twiml import ASKING, Platform, twiml_table, verbs

    running = await start_daemon(twiml_table() + ROUTES.replace(
        'name = "CRM"\nfile = "accounts.csv"', 'name = "CRM"\ncallers = ["+3130*"]'))
    known = Platform(running, caller="+31201234567", called=LINE)
    assert verbs(await known.incoming()) == ["Say Acme (key account)", "Dial +31501234510"]
    stranger = Platform(running, caller="+31101234567", called=LINE)
    answer = await stranger.incoming()
    assert verbs(answer) == ASKING
    assert verbs(await stranger.type(answer, "9000")) == ["Say Sales desk", "Dial +31501234599"]
    await running.daemon.gatekeeper.store.flush()
    assert [(e.gate, e.status, e.reason, e.credential, e.actuator, e.source)
            for e in entries(running)] == [
        (None, "ACK", "routed_caller", "Key accounts", "", "twiml"),
        (None, "ACK", "granted_route", "Sales", "", "twiml"),
    ]


ANYWHERE = "+31509999999"  # a number the one-gate site's gate answers on (it has no numbers)
VISITOR = "+31687654321"


def one_gate_site(tmp_path: Path, broker: Mosquitto) -> Path:
    """A site with one gate and no numbers (it takes every number but the file's line
    LINE), a resident on its caller list, a code for it, and a fleet prefix."""
    path = tmp_path / "gated.toml"
    path.write_text(f"""
[site]
id = "test"
timezone = "Europe/Amsterdam"
region = "NL"

[server]
listen = "127.0.0.1:0"
tokens = ["{TOKEN}"]

[gates.barrier]
actuator = {{ type = "mock", pin = 17, active_high = true, pulse = 0.05 }}
callers = ["{RESIDENT}"]

[[codes]]
name = "Barrier only"
code = "5555"
gates = ["barrier"]

[[routes]]
name = "Sales"
numbers = ["{LINE}"]
callers = ["+3140*"]
destination = "+31501234510"

[lockout]
caller_failures = 3

[log]
path = "{tmp_path / 'state' / 'entries.sqlite3'}"
""" + mqtt_table(broker, 'fleet_prefix = "gated/fleet"'))
    return path


async def test_a_route_over_mqtt_never_takes_a_number_a_gate_answers_on(
        broker: Mosquitto, probe: Probe, start_daemon: Any, tmp_path: Path) -> None:
    """A route over MQTT, site or fleet, naming a number the one-gate site's gate answers
    on is refused on its error topic and changes nothing: the resident still opens, the
    gate's code still opens and is never counted as a guess; a route on the file's own
    line is applied, and refused once a reload gives that line up."""
    fleet = "gated/fleet"
    await probe.subscribe(f"{PREFIX}/routes/+/error", f"{fleet}/routes/+/error/test")
    running = await start_daemon(config=one_gate_site(tmp_path, broker))
    await mqtt_ready(running)
    barrier = running.pin(17)
    takeover = body(callers=["+31*"], numbers=[ANYWHERE], destination="+31500000000")
    error = await put(probe, "takeover", takeover)
    assert error is not None and error["error"].startswith("numbers[0]: "), error
    await probe.publish(f"{fleet}/routes/takeover", takeover, retain=True)
    (verdict,) = await probe.wait_for(f"{fleet}/routes/takeover/error/test")
    assert verdict.payload and verdict.json()["error"].startswith("numbers[0]: ")
    assert running.daemon.bridge.routes.routes.applied == {}

    assert await running.get(did=ANYWHERE, callerid=RESIDENT) == (200, "status=ACK")
    for _ in range(4):  # more than caller_failures: none of them a guess
        assert await running.get(did=ANYWHERE, callerid=VISITOR, code="5555") == (
            200, "status=ACK")
    assert running.daemon.gatekeeper.ledger.lockout.strikes(VISITOR) is None
    assert [s.state for s in barrier.states][:2] == [False, True]

    # The file's own line may carry routes over MQTT.
    assert await put(probe, "sales", body(callers=["+3130*"], numbers=["0501234500"],
                                          destination="+31501234520")) is None
    assert await running.get(did=LINE, callerid="+31301234567") == (
        200, "status=ACK&destination=%2B31501234520")
    await running.daemon.gatekeeper.store.flush()
    assert {e.reason for e in entries(running)} == {"granted_caller", "granted_code",
                                                    "routed_caller"}

    # The file gives the line up: the route over MQTT on it goes too, refused on reload.
    path = tmp_path / "gated.toml"
    text = path.read_text()
    path.write_text(text[:text.index("[[routes]]")] + text[text.index("[lockout]"):])
    before = len(probe.on(f"{PREFIX}/routes/sales/error"))
    assert await running.daemon.reload("test") is True
    (*_, refused) = await probe.wait_for(f"{PREFIX}/routes/sales/error", before + 1)
    assert refused.json()["error"].startswith("numbers[0]: ")
    assert await running.get(did=LINE, callerid=RESIDENT) == (200, "status=ACK")
