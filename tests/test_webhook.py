from __future__ import annotations

import asyncio
import sqlite3
import time
import urllib.parse
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from gated.site.store import read_entries

from .helpers import BARRIER, DOOR, RESIDENT, TOKEN, FakeActuator


def states(pin: Any) -> list[bool]:
    return [bool(s.state) for s in pin.states]


def entries(running: Any) -> list[Any]:
    return list(reversed(read_entries(running.daemon.gatekeeper.store.path, limit=1000)))


async def settle(running: Any) -> None:
    await running.daemon.gatekeeper.store.flush()


@pytest.mark.parametrize(
    ("params", "body"),
    [
        ({"code": "471123", "did": BARRIER, "callerid": "0612345678"},
         "status=ACK&callername=Welcome&destination=201"),
        ({"code": "9000", "did": BARRIER, "callerid": "0612345678"},
         "status=ACK&callername=Sales+desk&destination=%2B31501234599"),
        ({"code": "000000", "did": BARRIER, "callerid": "0612345678"}, "status=NAK"),
        ({"code": "", "did": BARRIER, "callerid": RESIDENT}, "status=ACK"),
        ({"code": "", "did": BARRIER, "callerid": "0687654321"}, "status=NAK"),
        ({"code": "471123", "did": "+31209999999", "callerid": RESIDENT}, "status=NAK"),
    ],
)
async def test_answers_are_byte_for_byte_the_protocol(start_daemon: Any, params: dict[str, str],
                                                      body: str) -> None:
    """Bodies are exactly what urllib.parse.urlencode makes, as text/plain with HTTP 200."""
    running = await start_daemon()
    async with running.session.get(running.url, params={"token": TOKEN, **params}) as response:
        assert response.status == 200
        assert response.content_type == "text/plain"
        assert await response.read() == body.encode()
    expected = urllib.parse.urlencode(urllib.parse.parse_qsl(body))
    assert body == expected


async def test_code_opens_the_selected_gate_with_one_pulse(start_daemon: Any) -> None:
    """The called number picks the gate; only its relay pulses, exactly once."""
    running = await start_daemon(pulse=0.1)
    barrier, door = running.pin(17), running.pin(27)
    assert await running.get(code="471123", did="0501234568", callerid="0612345678") == (
        200, "status=ACK&callername=Welcome&destination=201")
    assert not door.state  # active-low: energised means low, at the moment of the answer
    await asyncio.sleep(0.3)
    assert states(door)[1:] == [True, False, True]
    assert states(barrier) == [False]


@pytest.mark.parametrize("form", ["+31612345678", "0031612345678", "31612345678", "0612345678",
                                  " 31612345678"])
async def test_caller_list_matches_every_number_form(start_daemon: Any, form: str) -> None:
    """A resident opens by calling, whatever form the PBX gives their number in."""
    running = await start_daemon()
    assert await running.get(code="", did=BARRIER, callerid=form) == (200, "status=ACK")


async def test_plus_sent_unencoded_still_matches(start_daemon: Any) -> None:
    """A raw '+' in the query string (decoded as a space) still normalises."""
    running = await start_daemon()
    url = f"{running.url}?token={TOKEN}&code=&did=%2B31501234567&callerid=+31612345678"
    async with running.session.get(url) as response:
        assert await response.text() == "status=ACK"


async def test_post_form_is_accepted(start_daemon: Any) -> None:
    """POST with a form body works like GET, for other PBXes and testing."""
    running = await start_daemon()
    data = {"token": TOKEN, "code": "5555", "did": BARRIER, "callerid": "0612345678"}
    assert await running.post(data) == (200, "status=ACK")


@pytest.mark.parametrize("token", ["", "wrong", TOKEN[:-1], TOKEN + "x", "second-token-abcdefg"])
async def test_wrong_token_gets_403_and_nothing_happens(start_daemon: Any, token: str) -> None:
    """Without a valid token nothing is evaluated, opened or recorded; one log line."""
    running = await start_daemon()
    with capture_logs() as logs:
        status, _ = await running.get(token=token, code="471123", did=BARRIER, callerid=RESIDENT)
    assert status == 403
    assert [e["event"] for e in logs] == ["refused"]
    await settle(running)
    assert entries(running) == []
    assert states(running.pin(17)) == [False]


async def test_second_token_is_accepted_for_rotation(start_daemon: Any) -> None:
    """Any configured token authenticates, so tokens can be rotated."""
    running = await start_daemon()
    assert await running.get(token="second-token-abcdefgh", code="5555", did=BARRIER) == (
        200, "status=ACK")


async def test_allow_from_refuses_other_clients(start_daemon: Any) -> None:
    """A client outside allow_from is closed at accept, unanswered, even with the right
    token: nothing evaluated, nothing opened."""
    running = await start_daemon(allow_from=("10.0.0.0/8", "192.0.2.0/24"))
    # Closed at accept, before a byte is read: the client sees the end of the
    # connection, or a reset if its request was still being written.
    with pytest.raises((aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
        await running.get(code="471123", did=BARRIER)
    await settle(running)
    assert entries(running) == []
    assert states(running.pin(17)) == [False]


async def test_allow_from_admits_listed_clients(start_daemon: Any) -> None:
    """A client inside allow_from is served."""
    running = await start_daemon(allow_from=("127.0.0.0/8",))
    assert await running.get(code="5555", did=BARRIER) == (200, "status=ACK")


@pytest.mark.parametrize(
    ("params", "reason"),
    [
        ({"code": "47a123", "did": BARRIER}, "malformed_code"),
        ({"code": "4" * 200, "did": BARRIER}, "malformed_code"),
        ({"code": "471123", "did": "garbage"}, "malformed_number"),
        ({"code": "471123", "did": BARRIER, "callerid": "x" * 500}, "malformed_number"),
        ({"code": "471123"}, "unknown_number"),
        ({"code": "471123", "did": "+31209999999"}, "unknown_number"),
        ({"did": BARRIER}, "unknown_caller"),
        ({"code": "5555", "did": DOOR, "callerid": RESIDENT}, "wrong_gate"),
    ],
)
async def test_bad_input_is_a_nak_with_an_entry_saying_why(start_daemon: Any,
                                                          params: dict[str, str],
                                                          reason: str) -> None:
    """Bad input answers NAK, records why, and opens nothing."""
    running = await start_daemon()
    assert await running.get(**params) == (200, "status=NAK")
    await settle(running)
    (entry,) = entries(running)
    assert (entry.status, entry.reason) == ("NAK", reason)
    assert states(running.pin(17)) == [False]
    assert states(running.pin(27)) == [False, True]


async def test_broken_utf8_and_odd_requests_never_5xx(start_daemon: Any) -> None:
    """Broken UTF-8, wrong methods, files and oversized bodies get a 4xx or NAK."""
    running = await start_daemon()
    base = running.url
    session = running.session
    async with session.get(f"{base}?token={TOKEN}&code=%ff%fe&did=%c3%28") as response:
        assert response.status in (200, 400)
        if response.status == 200:
            assert await response.text() == "status=NAK"
    async with session.put(f"{base}?token={TOKEN}") as response:
        assert response.status == 405
    async with session.post(base, data=b"\xff\xfe=\xff", headers={
            "Content-Type": "application/x-www-form-urlencoded"}) as response:
        assert response.status in (400, 403)
    async with session.post(base, data={"token": TOKEN, "code": "1" * 20000}) as response:
        assert response.status == 413
    async with session.get(f"{base}?token={TOKEN}&code=471123&code=5555&did={BARRIER}") as r:
        assert r.status == 200
    assert states(running.pin(27)) == [False, True]


async def test_failing_actuator_answers_err_and_records_it(start_daemon: Any) -> None:
    """An actuator exception answers ERR; the entry says actuator_failed."""
    running = await start_daemon(actuators={"barrier": FakeActuator("barrier", fail=True)})
    assert await running.get(code="471123", did=BARRIER, callerid=RESIDENT) == (
        200, "status=ERR")
    await settle(running)
    (entry,) = entries(running)
    assert (entry.status, entry.reason, entry.actuator) == ("ERR", "granted_code",
                                                            "actuator_failed")


async def test_deadline_answers_err_in_time_and_never_opens_late(start_daemon: Any) -> None:
    """An actuator slower than the deadline: ERR at the deadline, and no late open."""
    slow = FakeActuator("barrier", delay=2.0)
    running = await start_daemon(actuators={"barrier": slow}, deadline=0.3)
    started = time.monotonic()
    assert await running.get(code="471123", did=BARRIER) == (200, "status=ERR")
    assert time.monotonic() - started < 1.5
    await asyncio.sleep(2.2)
    assert slow.opened == []
    await settle(running)
    (entry,) = entries(running)
    assert entry.actuator == "deadline"


async def test_entries_and_logs_never_contain_the_digits(start_daemon: Any) -> None:
    """Typed digits appear in no log event and no stored entry, right or wrong."""
    running = await start_daemon()
    with capture_logs() as logs:
        await running.get(code="471123", did=BARRIER, callerid=RESIDENT)
        await running.get(code="834512", did=BARRIER, callerid=RESIDENT)
        await running.get(code="83a4512", did=BARRIER, callerid=RESIDENT)
        await settle(running)
    assert logs, "expected entry log events"
    text = repr(logs)
    for digits in ("471123", "834512", "83a4512"):
        assert digits not in text
    stored = sqlite3.connect(running.daemon.gatekeeper.store.path).execute(
        "SELECT * FROM entries").fetchall()
    assert len(stored) == 3
    for digits in ("471123", "834512"):
        assert digits not in repr(stored)
    events = [e for e in logs if e["event"] == "entry"]
    assert [(e["status"], e["reason"], e.get("credential", "")) for e in events] == [
        ("ACK", "granted_code", "Demo"), ("NAK", "unknown_code", ""),
        ("NAK", "malformed_code", "")]


async def test_every_authenticated_request_is_one_durable_entry(start_daemon: Any) -> None:
    """Each answered call is in SQLite by the time its answer arrives."""
    running = await start_daemon()
    await running.get(code="471123", did=BARRIER, callerid="0612345678", callername="Jan")
    (entry,) = entries(running)  # no flush: durable before the answer
    assert entry.gate == "barrier"
    assert entry.caller == RESIDENT and entry.did == BARRIER
    assert entry.callername == "Jan" and entry.credential == "Demo"
    assert entry.status == "ACK" and entry.actuator == "pulsed" and entry.source == "pbx"


async def test_shutdown_finishes_in_flight_answers(start_daemon: Any) -> None:
    """A stop during a call lets it finish with its real answer and entry, then closes."""
    slow = FakeActuator("barrier", delay=0.5)
    running = await start_daemon(actuators={"barrier": slow})
    call = asyncio.create_task(running.get(code="471123", did=BARRIER))
    await asyncio.sleep(0.2)  # the call is now waiting on the actuator
    await running.stop()
    assert await call == (200, "status=ACK&callername=Welcome&destination=201")
    assert slow.opened and slow.closed
    (entry,) = entries(running)
    assert entry.status == "ACK"
