"""The SIP endpoint end to end: the real daemon drives a real baresip, sipp calls it."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from pathlib import Path
from typing import Any

import pytest

from gated.commands import doctor
from gated.core.errors import EngineError
from gated.pbx.baresip import BaresipEngine, local_address, read_status
from gated.site.store import read_entries

from . import sipp
from .broker import eventually
from .helpers import BARRIER, RESIDENT
from .sipcaller import baresip_caller

HOST = local_address()
VISITOR = "+31687654321"
LOBBY = "+31501234569"


def sip_table(port: int, trunk_from: str = f"{HOST}/32") -> str:
    return f"""
[sip]
listen = "{HOST}:{port}"
trunk_from = ["{trunk_from}"]
attempts = 2
input_timeout = 3
"""


async def sip_daemon(start_daemon: Any, **kwargs: Any) -> tuple[Any, str]:
    port = sipp.free_udp(HOST)
    running = await start_daemon(sip_table(port, **kwargs))
    engine = running.daemon.sip_engine
    await eventually(lambda: engine.state == "running", within=15)
    return running, f"{HOST}:{port}"


def entries(running: Any) -> list[Any]:
    return read_entries(running.daemon.gatekeeper.store.path, limit=100)


async def test_a_sipp_caller_who_types_the_right_code_opens_the_gate_and_gets_the_bye(
        start_daemon: Any, tmp_path: Path) -> None:
    """INVITE, ACK, 5555# as RFC 4733 events: the barrier's relay pulses, the call is
    recorded ACK with source sip and the caller's number, and gated sends the BYE."""
    running, target = await sip_daemon(start_daemon)
    status, errors = await sipp.call(tmp_path / "sipp", target, BARRIER, VISITOR,
                                     ["5555#"], HOST)
    assert status == 0, errors
    await running.daemon.gatekeeper.store.flush()
    [entry] = entries(running)
    assert (entry.status, entry.source, entry.caller, entry.did) == (
        "ACK", "sip", VISITOR, BARRIER)
    assert True in [s.state for s in running.pin(17).states]


async def test_two_wrong_codes_over_sip_end_in_gateds_hang_up(start_daemon: Any,
                                                             tmp_path: Path) -> None:
    """Two wrong codes with attempts = 2: two NAKs recorded, nothing opened, and gated
    hangs up (sipp gets the BYE)."""
    running, target = await sip_daemon(start_daemon)
    status, errors = await sipp.call(tmp_path / "sipp", target, BARRIER, VISITOR,
                                     ["1111#", "2222#"], HOST)
    assert status == 0, errors
    await running.daemon.gatekeeper.store.flush()
    assert [e.status for e in entries(running)] == ["NAK", "NAK"]
    assert True not in [s.state for s in running.pin(17).states]


async def test_a_sip_call_from_outside_trunk_from_is_never_answered(start_daemon: Any,
                                                                   tmp_path: Path) -> None:
    """A resident's number calling from an address outside trunk_from: refused before the
    answer (sipp fails), nothing decided, recorded or opened."""
    running, target = await sip_daemon(start_daemon, trunk_from="198.51.100.0/24")
    status, _ = await sipp.call(tmp_path / "sipp", target, BARRIER, RESIDENT, ["5555#"], HOST)
    assert status != 0
    await running.daemon.gatekeeper.store.flush()
    assert entries(running) == []
    assert True not in [s.state for s in running.pin(17).states]


async def test_a_killed_sip_engine_comes_back_while_the_webhook_answers(
        start_daemon: Any, tmp_path: Path) -> None:
    """The engine SIGKILLed: the webhook answers meanwhile, the engine is started again,
    and the next SIP call opens."""
    running, target = await sip_daemon(start_daemon)
    engine = running.daemon.sip_engine
    os.kill(engine.pid, signal.SIGKILL)
    status, body = await running.get(code="5555", did=BARRIER, callerid=VISITOR)
    assert (status, body) == (200, "status=ACK")
    await eventually(lambda: engine.restarts >= 1 and engine.state == "running", within=15)
    status, errors = await sipp.call(tmp_path / "sipp", target, BARRIER, VISITOR,
                                     ["5555#"], HOST)
    assert status == 0, errors
    await running.daemon.gatekeeper.store.flush()
    assert sorted(e.source for e in entries(running)) == ["pbx", "sip"]


async def test_a_baresip_gated_does_not_know_is_refused_in_one_line(
        start_daemon: Any, tmp_path: Path, monkeypatch: Any) -> None:
    """A baresip of another version on the PATH: the daemon does not start, and says why
    in one line naming the version."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "baresip"
    fake.write_text("#!/bin/sh\necho 'baresip v2.9.0 Copyright (C) 2010 - 2020'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    with pytest.raises(EngineError, match=r"baresip 2\.9\.0 is not a version") as caught:
        await start_daemon(sip_table(sipp.free_udp(HOST)))
    assert "\n" not in str(caught.value)


async def test_a_hung_sip_engine_is_killed_and_started_again(
        start_daemon: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine stopped (SIGSTOP: alive, answering nothing): its control port's silence
    gets it killed and started again, and the next SIP call opens."""
    monkeypatch.setattr(BaresipEngine, "probe_every", 0.3)
    monkeypatch.setattr(BaresipEngine, "probe_wait", 1.0)
    running, target = await sip_daemon(start_daemon)
    engine = running.daemon.sip_engine
    hung = engine.pid
    os.kill(hung, signal.SIGSTOP)
    await eventually(lambda: engine.restarts >= 1 and engine.state == "running", within=15)
    assert engine.pid != hung
    status, errors = await sipp.call(tmp_path / "sipp", target, BARRIER, VISITOR,
                                     ["5555#"], HOST)
    assert status == 0, errors


async def test_digits_sent_as_sip_info_open_the_gate(start_daemon: Any, tmp_path: Path) -> None:
    """A caller whose phone sends its keys as SIP INFO (application/dtmf-relay) opens
    the gate as one sending RFC 4733 events does."""
    running, target = await sip_daemon(start_daemon)
    status, errors = await sipp.call(tmp_path / "sipp", target, BARRIER, VISITOR,
                                     ["5555#"], HOST, info=True)
    assert status == 0, errors
    await running.daemon.gatekeeper.store.flush()
    assert [(e.status, e.source) for e in entries(running)] == [("ACK", "sip")]


async def test_doctor_shows_the_sip_engine_and_its_registration(start_daemon: Any) -> None:
    """`gated doctor` names the engine's version, that it runs, and what it registered."""
    monkey = pytest.MonkeyPatch()
    monkey.setattr(BaresipEngine, "probe_every", 0.2)
    try:
        running, _ = await sip_daemon(start_daemon)
        engine = running.daemon.sip_engine
        await eventually(lambda: bool(engine.registration), within=10)
        await eventually(lambda: "User Agents" in str(
            read_status(running.daemon.gatekeeper.store.path.parent)), within=10)
    finally:
        monkey.undo()
    findings = [f for f in doctor.diagnose(str(running.daemon.loaded.path))
                if f.topic == "sip"]
    assert [f.level for f in findings] == ["ok", "ok"]
    assert "baresip 1.0.0" in findings[0].message
    assert "engine running" in findings[1].message
    assert BARRIER in findings[1].message


async def test_a_resident_calling_from_a_real_baresip_opens_with_no_prompt(
        start_daemon: Any, tmp_path: Path) -> None:
    """A second baresip, the resident's phone, dials the gate: gated answers, opens the
    barrier with no code asked, and hangs up on it."""
    running, target = await sip_daemon(start_daemon)
    async with baresip_caller(tmp_path / "phone", RESIDENT, HOST) as phone:
        phone.dial(f"sip:{BARRIER}@{target}")
        await eventually(lambda: "CALL_CLOSED" in phone.events, within=15)
    assert "CALL_ESTABLISHED" in phone.events
    await running.daemon.gatekeeper.store.flush()
    [entry] = entries(running)
    assert (entry.status, entry.reason, entry.source, entry.caller) == (
        "ACK", "granted_caller", "sip", RESIDENT)


async def test_a_call_box_opens_by_the_tone_gated_plays_into_the_sip_call(
        start_daemon: Any, tmp_path: Path) -> None:
    """A call box's gate (dtmf) over SIP: the resident's phone, a real baresip, calls;
    gated plays the gate's keys into the call as telephone-events (9, a pause, 9), and
    the phone hears both; the entry says actuator dtmf."""
    port = sipp.free_udp(HOST)
    running = await start_daemon(sip_table(port) + f"""
[gates.lobby]
numbers = ["{LOBBY}"]
actuator = {{ type = "dtmf", digits = "9w9" }}
callers = ["{RESIDENT}"]
""")
    engine = running.daemon.sip_engine
    await eventually(lambda: engine.state == "running", within=15)
    async with baresip_caller(tmp_path / "phone", RESIDENT, HOST) as phone:
        phone.dial(f"sip:{LOBBY}@{HOST}:{port}")
        await eventually(lambda: "CALL_CLOSED" in phone.events, within=20)
    assert phone.heard == ["9", "9"]
    await running.daemon.gatekeeper.store.flush()
    [entry] = entries(running)
    assert (entry.status, entry.reason, entry.source, entry.actuator) == (
        "ACK", "granted_caller", "sip", "dtmf")


async def test_the_engines_files_are_private_and_its_control_port_is_loopback_only(
        start_daemon: Any) -> None:
    """baresip's folder is 0700 and its files 0600, and its control port, which can dial
    and is given the accounts, listens on 127.0.0.1 only."""
    running, _ = await sip_daemon(start_daemon)
    folder = running.daemon.gatekeeper.store.path.parent / "baresip"
    assert folder.stat().st_mode & 0o777 == 0o700
    names = ("config", "accounts", "prompt.wav", "wrong.wav", "quiet.wav", "status.json")
    assert {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()} == dict.fromkeys(
        names, 0o600)
    [listen] = [line for line in (folder / "config").read_text().splitlines()
                if line.startswith("ctrl_tcp_listen")]
    assert listen.startswith("ctrl_tcp_listen 127.0.0.1:")
    port = int(listen.rpartition(":")[2])
    with socket.socket() as probe:
        assert probe.connect_ex((HOST, port)) != 0  # not on the machine's own address


async def test_a_process_that_takes_over_the_engines_control_port_gets_it_restarted(
        start_daemon: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another local process connects to the control port (baresip then serves it instead
    of gated): gated notices the silence, the engine is started again on a new port, and
    the intruder's connection is dead with it."""
    monkeypatch.setattr(BaresipEngine, "probe_every", 0.3)
    monkeypatch.setattr(BaresipEngine, "probe_wait", 1.0)
    running, target = await sip_daemon(start_daemon)
    engine = running.daemon.sip_engine
    folder = running.daemon.gatekeeper.store.path.parent / "baresip"
    [listen] = [line for line in (folder / "config").read_text().splitlines()
                if line.startswith("ctrl_tcp_listen")]
    reader, writer = await asyncio.open_connection("127.0.0.1", int(listen.rpartition(":")[2]))
    try:
        await eventually(lambda: engine.restarts >= 1 and engine.state == "running",
                         within=15)
        assert await asyncio.wait_for(reader.read(), 5) == b""  # the old engine is gone
    finally:
        writer.close()
    status, errors = await sipp.call(tmp_path / "sipp", target, BARRIER, VISITOR,
                                     ["5555#"], HOST)
    assert status == 0, errors
