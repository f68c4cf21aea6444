"""Register mode end to end: the real daemon drives a real baresip that registers with sipp
playing the provider's registrar, and calls come in through it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from gated.commands import doctor
from gated.pbx.baresip import BaresipEngine, local_address
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
    registration, and the password is in no log line, the status file or doctor."""
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
    for said in (repr(logs), (state_dir / "baresip" / "status.json").read_text(),
                 repr(findings)):
        assert PASSWORD not in said


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


async def test_gated_renews_its_registration_before_the_registrar_lets_it_expire(
        start_daemon: Any, tmp_path: Path) -> None:
    """A registrar that grants 2 seconds, twice: gated registers again, challenged and
    authenticated each time, at the same contact, before they are up; a call through
    the registrar after the renewals still opens."""
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
