"""gated's own SIP endpoint: the call's logic on a fake engine, a real gatekeeper and store."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from gated import daemon as daemon_mod
from gated.book import compiler
from gated.core.clock import SystemClock
from gated.core.decide import Status
from gated.core.errors import ConfigError
from gated.pbx.sip import SipCalls, SipSettings, number_of
from gated.site.gatekeeper import Gatekeeper, RawCall
from gated.site.store import Entry, Store, read_entries

from .helpers import BARRIER, RESIDENT, FakeActuator, write_config
from .sipengine import FakeEngine

VISITOR = "sip:+31687654321@192.0.2.10"
GATE = f"sip:{BARRIER}@gate.example.nl"
FALLBACK = "+31501234500"
CONFIGURED = frozenset({"201", "+31501234599", FALLBACK})


@dataclass
class Site:
    engine: FakeEngine
    gatekeeper: Gatekeeper
    calls: SipCalls
    actuators: dict[str, Any] = field(default_factory=dict)

    def opened(self, gate: str = "barrier") -> int:
        return len(self.actuators[gate].opened)

    def entries(self) -> list[Entry]:
        return read_entries(self.gatekeeper.store.path, limit=100)


@dataclass
class ToneActuator(FakeActuator):
    """A call box's gate: it opens by a tone the call plays."""

    tones: str = "9"


@contextlib.asynccontextmanager
async def sip_site(tmp_path: Path, settings: SipSettings, extra: str = ""
                   ) -> AsyncIterator[Site]:
    loaded = compiler.load(write_config(tmp_path, extra))
    store = Store.open(tmp_path / "entries.sqlite3")
    actuators: dict[str, Any] = {"barrier": FakeActuator("barrier"),
                                 "door": ToneActuator("door")}
    gatekeeper = Gatekeeper(loaded.book, store.load_ledger(daemon_mod.policy(loaded)),
                            actuators, store, SystemClock(), deadline=3.0)
    engine = FakeEngine()
    calls = SipCalls(engine, gatekeeper, settings)
    writer = asyncio.create_task(store.run())
    runner = asyncio.create_task(calls.run())
    try:
        yield Site(engine, gatekeeper, calls, actuators)
    finally:
        engine.stop()
        await runner
        await store.flush()
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer
        store.close()


SETTINGS = SipSettings(attempts=2, input_timeout=5.0, fallback=FALLBACK, transfers=CONFIGURED)


async def test_a_sip_code_opens_the_gate_and_hangs_up_without_logging_the_digits(
        tmp_path: Path) -> None:
    """A visitor answered with the prompt who types a good code and # opens the gate once,
    is hung up on, is recorded with source sip, and the digits are in no log line."""
    with capture_logs() as logs:
        async with sip_site(tmp_path, SETTINGS) as site:
            site.engine.ring("c1", VISITOR, GATE)
            await site.engine.until(lambda e: ("play", "prompt") in e.commands("c1"))
            site.engine.press("c1", "5555#")
            await site.engine.said_last("c1", "hang_up")
            await site.gatekeeper.store.flush()
            assert site.engine.commands("c1") == [("answer", ""), ("play", "prompt"),
                                                  ("hang_up", "")]
            assert site.opened() == 1
            [entry] = site.entries()
    assert (entry.status, entry.source, entry.caller, entry.did) == (
        "ACK", "sip", "+31687654321", BARRIER)
    assert "5555" not in repr(logs)


async def test_a_pause_ends_the_digits_as_the_hash_key_does(tmp_path: Path) -> None:
    """Digits with no # are decided after a pause of input_timeout."""
    settings = SipSettings(input_timeout=0.3, transfers=CONFIGURED)
    async with sip_site(tmp_path, settings) as site:
        site.engine.ring("c1", VISITOR, GATE)
        site.engine.press("c1", "5555")
        await site.engine.said_last("c1", "hang_up")
        assert site.opened() == 1


async def test_wrong_sip_codes_prompt_again_until_attempts_then_go_to_the_fallback(
        tmp_path: Path) -> None:
    """Two wrong codes: the prompt, the wrong-code prompt, then the call is put through
    to the fallback; nothing opened and two NAKs recorded."""
    async with sip_site(tmp_path, SETTINGS) as site:
        site.engine.ring("c1", VISITOR, GATE)
        site.engine.press("c1", "1111#")
        await site.engine.until(lambda e: ("play", "wrong") in e.commands("c1"))
        site.engine.press("c1", "2222#")
        await site.engine.said_last("c1", "transfer")
        await site.gatekeeper.store.flush()
        assert site.engine.commands("c1") == [
            ("answer", ""), ("play", "prompt"), ("play", "wrong"), ("transfer", FALLBACK)]
        assert site.opened() == 0
        assert [e.status for e in site.entries()] == ["NAK", "NAK"]


async def test_a_known_sip_caller_opens_with_no_prompt(tmp_path: Path) -> None:
    """A caller on the gate's caller list is answered, opens and is hung up on, unprompted."""
    async with sip_site(tmp_path, SETTINGS) as site:
        site.engine.ring("c1", f"sip:{RESIDENT}@192.0.2.10", GATE)
        await site.engine.said_last("c1", "hang_up")
        assert site.engine.commands("c1") == [("answer", ""), ("hang_up", "")]
        assert site.opened() == 1


async def test_a_sip_code_with_a_destination_is_put_through_to_it(tmp_path: Path) -> None:
    """A code whose answer carries a configured destination opens, then transfers there."""
    async with sip_site(tmp_path, SETTINGS) as site:
        site.engine.ring("c1", VISITOR, GATE)
        site.engine.press("c1", "471123#")
        await site.engine.said_last("c1", "transfer")
        assert site.engine.commands("c1")[-1] == ("transfer", "201")
        assert site.opened() == 1


async def test_sip_transfers_never_dial_a_number_the_config_does_not_hold(
        tmp_path: Path) -> None:
    """A destination that is not a number written in the config (a visitor code's, from
    the broker) is never dialled: the call is hung up instead (no toll fraud)."""
    settings = SipSettings(attempts=2, transfers=frozenset({FALLBACK}))
    async with sip_site(tmp_path, settings) as site:
        site.engine.ring("c1", VISITOR, GATE)
        site.engine.press("c1", "9000#")  # route-only code, destination +31501234599
        await site.engine.said_last("c1", "hang_up")
        assert not [c for c in site.engine.commands("c1") if c[0] == "transfer"]


async def test_a_trunk_call_from_outside_trunk_from_is_never_answered_or_decided(
        tmp_path: Path) -> None:
    """In trunk mode a call from an address outside trunk_from, or from one the engine
    cannot tell, is hung up unanswered: nothing decided, opened or recorded."""
    settings = SipSettings(transfers=CONFIGURED,
                           trunk_from=SipSettings.networks(["198.51.100.0/24"]))
    async with sip_site(tmp_path, settings) as site:
        site.engine.ring("c1", f"sip:{RESIDENT}@203.0.113.5", GATE, source="203.0.113.5:5060")
        site.engine.ring("c2", f"sip:{RESIDENT}@203.0.113.5", GATE, source=None)
        site.engine.ring("c3", f"sip:{RESIDENT}@198.51.100.7", GATE, source="198.51.100.7:5060")
        await site.engine.said_last("c3", "hang_up")
        await site.gatekeeper.store.flush()
        assert site.engine.commands("c1") == [("hang_up", "")]
        assert site.engine.commands("c2") == [("hang_up", "")]
        assert site.opened() == 1  # c3, from the trunk, only
        assert len(site.entries()) == 1


async def test_sip_calls_beyond_max_calls_are_hung_up_unanswered(tmp_path: Path) -> None:
    """At max_calls calls in progress, a new call is refused (hung up before an answer)."""
    settings = SipSettings(max_calls=2, transfers=CONFIGURED)
    async with sip_site(tmp_path, settings) as site:
        for call in ("c1", "c2", "c3"):
            site.engine.ring(call, VISITOR, GATE)
        await site.engine.until(lambda e: bool(e.commands("c3")))
        assert site.engine.commands("c3") == [("hang_up", "")]
        assert ("answer", "") in site.engine.commands("c1")
        assert ("answer", "") in site.engine.commands("c2")


async def test_a_sip_call_that_outlasts_max_call_is_hung_up(tmp_path: Path) -> None:
    """A caller who keeps typing digits without end is hung up on at max_call."""
    settings = SipSettings(max_call=0.5, input_timeout=5.0, transfers=CONFIGURED)
    async with sip_site(tmp_path, settings) as site:
        site.engine.ring("c1", VISITOR, GATE)
        await site.engine.said_last("c1", "hang_up")
        assert site.opened() == 0
        assert "c1" not in site.calls.calls


async def test_sip_guesses_lock_the_caller_out_of_the_webhook_too(tmp_path: Path) -> None:
    """Wrong codes over SIP count in the one lockout: the same caller's right code over
    the VoIPGRID path is then refused locked_out."""
    extra = "\n[lockout]\ncaller_failures = 2\n"
    async with sip_site(tmp_path, SETTINGS, extra) as site:
        site.engine.ring("c1", VISITOR, GATE)
        site.engine.press("c1", "1111#")
        await site.engine.until(lambda e: ("play", "wrong") in e.commands("c1"))
        site.engine.press("c1", "2222#")
        await site.engine.said_last("c1", "transfer")
        answer = await site.gatekeeper.call(RawCall(code="5555", did=BARRIER,
                                                    callerid="+31687654321"))
        assert (answer.status, answer.reason) == (Status.NAK, "locked_out")
        assert site.opened() == 0


async def test_a_call_box_gate_opens_by_its_tone_played_into_the_sip_call(
        tmp_path: Path) -> None:
    """A dtmf gate's open is its tone, played into the call before the hang-up."""
    async with sip_site(tmp_path, SETTINGS) as site:
        site.engine.ring("c1", VISITOR, "sip:0501234568@gate.example.nl")
        site.engine.press("c1", "471123#")
        await site.engine.said_last("c1", "transfer")
        assert site.engine.commands("c1")[-2:] == [("tones", "9"), ("transfer", "201")]


async def test_a_sip_call_the_caller_hangs_up_is_let_go(tmp_path: Path) -> None:
    """A caller who hangs up during the prompt ends the call: nothing more is said to it
    and nothing is decided past the ring."""
    async with sip_site(tmp_path, SETTINGS) as site:
        site.engine.ring("c1", VISITOR, GATE)
        await site.engine.until(lambda e: ("play", "prompt") in e.commands("c1"))
        site.engine.end("c1")
        await site.engine.until(lambda e: "c1" not in site.calls.calls)
        site.engine.press("c1", "5555#")
        site.engine.ring("c2", f"sip:{RESIDENT}@192.0.2.10", GATE)
        await site.engine.said_last("c2", "hang_up")
        assert site.engine.commands("c1") == [("answer", ""), ("play", "prompt")]
        assert site.opened() == 1  # c2's


def test_sip_numbers_come_from_the_uris_user_part() -> None:
    """The caller's and called number are a URI's user part when it is a number."""
    assert number_of("sip:+31612345678@192.0.2.1;transport=udp") == "+31612345678"
    assert number_of('"Jan" <sip:0612345678@pbx.example.nl>') == "0612345678"
    assert number_of("sip:anonymous@anonymous.invalid") is None
    assert number_of("sip:gate@sip.example.nl") is None


def test_a_sip_trunk_without_trunk_from_is_refused(tmp_path: Path) -> None:
    """Trunk mode with no allowlist would take calls from anyone: refused, naming the key."""
    config = write_config(tmp_path, '\n[sip]\nlisten = "0.0.0.0:5060"\n')
    with pytest.raises(ConfigError, match=r"sip\.trunk_from"):
        compiler.load(config)
