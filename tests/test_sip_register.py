"""Register mode end to end: the real daemon drives a real baresip that registers with sipp
playing the provider's registrar, and calls come in through it."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from gated.commands import doctor
from gated.pbx.baresip import BaresipEngine, Setup, account_line, local_address, read_status
from gated.site.store import read_entries

from . import sipp
from .broker import eventually
from .helpers import BARRIER, RESIDENT
from .sipregistrar import registrar

HOST = local_address()
VISITOR = "+31687654321"
PASSWORD = "Gate-pass-7d41e0"  # what the account's password file holds


def register_table(tmp_path: Path, address: str, password: str = PASSWORD) -> str:
    secret = tmp_path / "sip.secret"
    secret.write_text(password + "\n")
    secret.chmod(0o600)
    return f"""
[sip]
account = "sip:{BARRIER}@{address}"
password_file = "{secret}"
attempts = 2
input_timeout = 3
"""


def entries(running: Any) -> list[Any]:
    return read_entries(running.daemon.gatekeeper.store.path, limit=100)


def pulses(running: Any) -> list[bool]:
    return [bool(s.state) for s in running.pin(17).states]


async def register_daemon(start_daemon: Any, tmp_path: Path, address: str,
                          password: str = PASSWORD) -> Any:
    running = await start_daemon(register_table(tmp_path, address, password))
    engine = running.daemon.sip_engine
    await eventually(lambda: engine.state == "running", within=15)
    return running


def sip_findings(running: Any) -> list[doctor.Finding]:
    return [f for f in doctor.diagnose(str(running.daemon.loaded.path)) if f.topic == "sip"]


async def test_gated_registers_its_account_and_its_password_is_never_logged(
        start_daemon: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The registrar's challenge is answered with a REGISTER authenticated as the account's
    user in the registrar's realm with the right password; `gated doctor` reports the
    registration, and the password is in no log line, no file of the engine's (it is
    given to it over its control port) and not in doctor."""
    monkeypatch.setattr(BaresipEngine, "probe_every", 0.2)
    with capture_logs() as logs:
        async with registrar(tmp_path / "registrar", HOST, BARRIER, PASSWORD) as provider:
            running = await register_daemon(start_daemon, tmp_path, provider.address)
            status, errors = await provider.finished()
            assert status == 0, errors
            engine = running.daemon.sip_engine
            await eventually(lambda: "OK" in engine.registration, within=10)
        findings = sip_findings(running)
    assert [f.level for f in findings] == ["ok", "ok"]
    assert f"sip:{BARRIER}@{provider.address}" in findings[1].message
    state_dir = running.daemon.gatekeeper.store.path.parent
    assert logs, "expected the daemon's log lines"
    engine_files = [p.read_bytes().decode(errors="replace")
                    for p in (state_dir / "baresip").iterdir()]
    for said in (repr(logs), *engine_files, repr(findings)):
        assert PASSWORD not in said


async def test_an_account_the_registrar_refuses_is_logged_and_doctor_calls_it_a_problem(
        start_daemon: Any, tmp_path: Path) -> None:
    """The registrar refuses the account (the password file holds a wrong one): gated logs
    that the registration failed and the registrar's answer, and `gated doctor` calls it a
    problem, naming the answer and not the password."""
    wrong = "Not-the-pass-51a9"
    with capture_logs() as logs:
        async with registrar(tmp_path / "registrar", HOST, BARRIER, PASSWORD) as provider:
            running = await register_daemon(start_daemon, tmp_path, provider.address, wrong)
            status, _ = await provider.finished()
            assert status != 0  # it refused the REGISTER
            await eventually(lambda: "problem" in [f.level for f in sip_findings(running)],
                             within=10, step=0.25)
    [finding] = [f for f in sip_findings(running) if f.level == "problem"]
    assert "403 Forbidden" in finding.message
    assert [e["why"] for e in logs if e["event"] == "sip registration failed"] == [
        "403 Forbidden"]
    assert wrong not in repr(logs) + repr(sip_findings(running))


async def test_a_call_the_registrar_sends_as_soon_as_gated_registers_opens_the_gate(
        start_daemon: Any, tmp_path: Path) -> None:
    """The registrar calls the contact gated registered the moment it has granted the
    registration, and a visitor types 5555#: the call is answered, the barrier's relay
    pulses, the entry is ACK with source sip, and gated sends the BYE."""
    async with registrar(tmp_path / "registrar", HOST, BARRIER, PASSWORD,
                         caller=VISITOR, codes=["5555#"]) as provider:
        running = await register_daemon(start_daemon, tmp_path, provider.address)
        status, errors = await provider.finished()
    assert status == 0, errors
    await running.daemon.gatekeeper.store.flush()
    [entry] = entries(running)
    assert (entry.status, entry.source, entry.caller, entry.did) == (
        "ACK", "sip", VISITOR, BARRIER)
    await eventually(lambda: pulses(running) == [False, True, False], within=5)


async def test_wrong_codes_through_the_registrar_open_nothing(start_daemon: Any,
                                                             tmp_path: Path) -> None:
    """Two wrong codes through the registrar with attempts = 2: two NAKs recorded, the
    relay never energised, and gated hangs up."""
    async with registrar(tmp_path / "registrar", HOST, BARRIER, PASSWORD,
                         caller=VISITOR, codes=["1111#", "2222#"]) as provider:
        running = await register_daemon(start_daemon, tmp_path, provider.address)
        status, errors = await provider.finished()
    assert status == 0, errors
    await running.daemon.gatekeeper.store.flush()
    assert [e.status for e in entries(running)] == ["NAK", "NAK"]
    assert pulses(running) == [False]


async def test_a_call_to_the_registered_contact_from_elsewhere_is_never_answered(
        start_daemon: Any, tmp_path: Path) -> None:
    """Someone at another address (127.0.0.2) who found the contact gated registered sends
    the INVITE a resident's call would bring: refused before the answer, nothing decided,
    recorded or opened; the same INVITE from the registrar's address opens."""
    async with registrar(tmp_path / "registrar", HOST, BARRIER, PASSWORD) as provider:
        running = await register_daemon(start_daemon, tmp_path, provider.address)
        status, errors = await provider.finished()
        assert status == 0, errors
    [contact] = provider.contacts()
    user, _, target = contact.partition("@")
    with capture_logs() as logs:
        status, _ = await sipp.call(tmp_path / "stranger", target, user, RESIDENT, [],
                                    "127.0.0.2")
    assert status != 0
    assert [(e["event"], e["source"].split(":")[0]) for e in logs
            if e["event"] == "sip call refused"] == [("sip call refused", "127.0.0.2")]
    await running.daemon.gatekeeper.store.flush()
    assert entries(running) == []
    assert pulses(running) == [False]
    status, errors = await sipp.call(tmp_path / "provider", target, user, RESIDENT, [], HOST)
    assert status == 0, errors
    await running.daemon.gatekeeper.store.flush()
    assert [(e.status, e.reason) for e in entries(running)] == [("ACK", "granted_caller")]


async def test_gated_renews_a_registration_the_registrar_grants_for_two_seconds(
        start_daemon: Any, tmp_path: Path) -> None:
    """A registrar that grants 2 seconds, twice: gated registers again each time, challenged
    and authenticated, at the same contact; a call through the registrar after the
    renewals still opens."""
    async with registrar(tmp_path / "registrar", HOST, BARRIER, PASSWORD,
                         grants=(2, 2, 3600), caller=VISITOR, codes=["5555#"]) as provider:
        running = await register_daemon(start_daemon, tmp_path, provider.address)
        status, errors = await provider.finished()
    assert status == 0, errors
    contacts = provider.contacts()
    assert len(contacts) == 3
    assert len(set(contacts)) == 1
    await running.daemon.gatekeeper.store.flush()
    assert [e.status for e in entries(running)] == ["ACK"]


async def test_a_registrar_that_names_itself_in_latin_1_does_not_get_the_engine_restarted(
        start_daemon: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A registrar whose Server header is not UTF-8 ("Telefónica" in ISO-8859-1, which the
    engine passes on in its registration report): the engine's answers are still read, so
    it is not taken for hung and restarted, and the registration is reported."""
    monkeypatch.setattr(BaresipEngine, "probe_every", 0.2)
    monkeypatch.setattr(BaresipEngine, "probe_wait", 1.0)
    async with registrar(tmp_path / "registrar", HOST, BARRIER, PASSWORD,
                         server="Centralita Telef\xf3nica") as provider:
        running = await register_daemon(start_daemon, tmp_path, provider.address)
        status, errors = await provider.finished()
        assert status == 0, errors
        engine = running.daemon.sip_engine
        await eventually(lambda: "Centralita" in engine.registration, within=10)
        probed = engine.probes
        await eventually(lambda: engine.probes >= probed + 5, within=10)
    assert engine.restarts == 0


async def test_doctor_shows_the_registration_in_plain_words(
        start_daemon: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine colours its registration report and repeats the registrar's Server
    header, which may hold terminal controls (here CSI, U+009B): `gated doctor` and the
    status file show the registration without any control character."""
    monkeypatch.setattr(BaresipEngine, "probe_every", 0.2)
    server = "Registrar \u009b2J".encode().decode("latin-1")  # its UTF-8 bytes, sent as they are
    async with registrar(tmp_path / "registrar", HOST, BARRIER, PASSWORD,
                         server=server) as provider:
        running = await register_daemon(start_daemon, tmp_path, provider.address)
        status, errors = await provider.finished()
        assert status == 0, errors
        engine = running.daemon.sip_engine
        await eventually(lambda: "Registrar" in engine.registration, within=10)
    state_dir = running.daemon.gatekeeper.store.path.parent
    [_, finding] = sip_findings(running)
    for said in (finding.message, str(read_status(state_dir)), engine.registration):
        assert " OK " in said
        assert said.isprintable(), repr(said)


# An engine that refuses every account it is given, answering as baresip's menu does:
# its answer repeats the account line, the password in it.
REFUSING_ENGINE = """
import json, socket, sys
folder = sys.argv[sys.argv.index("-f") + 1]
port = next(int(line.rsplit(":", 1)[1]) for line in open(folder + "/config")
            if line.startswith("ctrl_tcp_listen"))
server = socket.create_server(("127.0.0.1", port))
connection, _ = server.accept()
stream = connection.makefile("rb")
while True:
    size = b""
    while (byte := stream.read(1)) != b":":
        if not byte:
            sys.exit()
        size += byte
    command = json.loads(stream.read(int(size) + 1)[:-1])
    answer = json.dumps({"response": True, "ok": False, "token": command["token"],
                         "data": "Creating UA for " + command.get("params", "") + " ..."})
    connection.sendall(str(len(answer)).encode() + b":" + answer.encode() + b",")
"""


async def test_an_account_the_engine_refuses_is_logged_without_its_password(
        tmp_path: Path) -> None:
    """The engine refuses the account gated gives it and repeats the account line in its
    answer: gated logs the refusal, and not the answer with the password in it."""
    fake = tmp_path / "baresip"
    fake.write_text(f"#!/bin/sh\nexec {sys.executable} -c '{REFUSING_ENGINE}' \"$@\"\n")
    fake.chmod(0o755)
    setup = Setup(tmp_path / "engine", "127.0.0.1",
                  (account_line(f"sip:{BARRIER}@192.0.2.9", PASSWORD),), domain="192.0.2.9")
    engine = BaresipEngine(setup, dict, binary=str(fake))
    with capture_logs() as logs:
        running = asyncio.create_task(engine.run())
        try:
            await eventually(lambda: "sip engine refused a command" in repr(logs), within=10)
        finally:
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running
            await engine.stop()
    assert PASSWORD not in repr(logs)
