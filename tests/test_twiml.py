"""The TwiML webhook and call-box gates, through the real daemon.

Requests are signed with the twilio library exactly as Twilio's servers sign
them, for the public URL a TLS proxy receives them on, and sent to where the
daemon listens; every answer is parsed as XML and its verbs checked.
"""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import textwrap
import urllib.parse
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs
from twilio.request_validator import RequestValidator

from gated.book import compiler
from gated.cli import main
from gated.core.errors import ConfigError
from gated.site.store import MIGRATIONS, SCHEMA_VERSION, Store, read_entries

from .broker import Mosquitto, Probe, eventually, mqtt_ready, mqtt_table, open_payload
from .helpers import BARRIER, RESIDENT, TOKEN, FakeActuator, config_text, write_config

AUTH = "0123456789abcdef0123456789abcdef"
PUBLIC = "https://gate.example.nl/twiml"
LOBBY = "+31201234567"
VISITOR = "+31687654321"
FALLBACK = "+31501234500"
CALL_SID = "CA" + "5" * 32
FLAT_12 = "246810"
PROMPT = "Toets uw code, gevolgd door een hekje."
WRONG = "Deze code is niet geldig."


def twiml_table(*, auth: str | None = AUTH, attempts: int = 2, prompt: str = PROMPT,
                wrong: str = WRONG, welcome: str = "Welkom.", fallback: str = FALLBACK,
                account_sid: str | None = None) -> str:
    lines = [
        "[twiml]",
        'path = "/twiml"',
        f'public_url = "{PUBLIC}"',
        'language = "nl-NL"',
        'voice = "Polly.Lotte"',
        f"prompt = {prompt!r}" if "'" not in prompt else f'prompt = """{prompt}"""',
        f"wrong = {wrong!r}" if "'" not in wrong else f'wrong = """{wrong}"""',
        f"welcome = {welcome!r}" if "'" not in welcome else f'welcome = """{welcome}"""',
        f"attempts = {attempts}",
        "input_timeout = 6",
    ]
    if auth is not None:
        lines.append(f'auth_token = "{auth}"')
    if fallback:
        lines.append(f'fallback = "{fallback}"')
    if account_sid is not None:
        lines.append(f'account_sid = "{account_sid}"')
    return "\n".join(lines) + f"""

[gates.lobby]
numbers = ["{LOBBY}"]
actuator = {{ type = "dtmf", digits = "9w9" }}

[[codes]]
name = "Flat 12"
code = "{FLAT_12}"
gates = ["lobby"]
"""


class Platform:
    """Plays the TwiML platform: signs each request as Twilio's servers do (the URL it
    calls, plus the sorted POST parameters, HMAC-SHA1, base64) and follows each
    <Gather>'s action to the next request."""

    def __init__(self, running: Any, *, auth: str | None = AUTH, caller: str = VISITOR,
                 called: str = LOBBY) -> None:
        self.running = running
        self.auth = auth
        host, port = running.daemon.listening[0]
        self.local = f"http://{host}:{port}/twiml"
        self.params = {"CallSid": CALL_SID, "AccountSid": "AC" + "0" * 32, "From": caller,
                       "To": called, "CallStatus": "ringing", "Direction": "inbound",
                       "ApiVersion": "2010-04-01"}

    def signature(self, url: str, params: dict[str, str]) -> str:
        assert self.auth is not None
        return str(RequestValidator(self.auth).compute_signature(url, params))

    async def send(self, url: str, params: dict[str, str], *,
                   headers: dict[str, str] | None = None) -> tuple[int, str]:
        """POST to the daemon what the platform sends to ``url`` (a public URL)."""
        if headers is None:
            headers = {"X-Twilio-Signature": self.signature(url, params)} if self.auth else {}
        target = self.local + url.removeprefix(PUBLIC)
        async with self.running.session.post(target, data=params, headers=headers) as response:
            text = await response.text()
            if response.status == 200:
                assert response.content_type == "text/xml"
            return response.status, text

    async def incoming(self, url: str = PUBLIC) -> ET.Element:
        status, text = await self.send(url, self.params)
        assert status == 200, text
        return parse(text)

    async def type(self, answer: ET.Element, digits: str) -> ET.Element:
        """Type ``digits`` at the answer's <Gather>: the request its action names."""
        gather = answer.find("Gather")
        assert gather is not None, verbs(answer)
        params = {**self.params, "CallStatus": "in-progress", "Digits": digits}
        status, text = await self.send(gather.get("action", ""), params)
        assert status == 200, text
        return parse(text)


def parse(text: str) -> ET.Element:
    return ET.fromstring(text)  # noqa: S314 (the daemon under test's own answer)


def verbs(answer: ET.Element) -> list[str]:
    """An answer in short: 'Say Welkom.', 'Play 9w9', 'Gather 2', 'Dial +31…', 'Hangup'."""
    shown = []
    for verb in answer:
        if verb.tag == "Say":
            shown.append(f"Say {verb.text}")
        elif verb.tag == "Play":
            shown.append(f"Play {verb.get('digits')}")
        elif verb.tag == "Gather":
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(verb.get("action", "")).query)
            shown.append(f"Gather {query['attempt'][0]}")
            shown.extend(f"  {inner}" for inner in verbs(verb))
        elif verb.tag == "Dial":
            shown.append(f"Dial {verb.text}")
        else:
            shown.append(verb.tag)
    return shown


def check_form(answer: ET.Element) -> None:
    """Language and voice on every <Say>; each <Gather> as §13 has it."""
    assert answer.tag == "Response"
    for say in answer.iter("Say"):
        assert (say.get("language"), say.get("voice")) == ("nl-NL", "Polly.Lotte")
    for gather in answer.iter("Gather"):
        assert {k: v for k, v in gather.attrib.items() if k != "action"} == {
            "input": "dtmf", "method": "POST", "finishOnKey": "#", "timeout": "6"}
        assert gather.get("action", "").startswith(f"{PUBLIC}/code?attempt=")


def entries(running: Any) -> list[Any]:
    return list(reversed(read_entries(running.daemon.gatekeeper.store.path, limit=1000)))


def states(pin: Any) -> list[bool]:
    return [bool(s.state) for s in pin.states]


async def settle(running: Any) -> None:
    await running.daemon.gatekeeper.store.flush()


ASKING = ["Gather 1", f"  Say {PROMPT}", f"Dial {FALLBACK}"]


# -- whole calls ---------------------------------------------------------------------------

async def test_a_whole_call_with_two_wrong_codes_ends_at_the_fallback(start_daemon: Any) -> None:
    """Incoming -> prompt; wrong -> 'wrong' and ask again; wrong again -> 'wrong' and the
    fallback. Two entries, source twiml, each with the CallSid and never the digits."""
    running = await start_daemon(twiml_table())
    platform = Platform(running)
    with capture_logs() as logs:
        answer = await platform.incoming()
        assert verbs(answer) == ASKING
        check_form(answer)
        answer = await platform.type(answer, "111111")
        assert verbs(answer) == [f"Say {WRONG}", "Gather 2", f"  Say {PROMPT}", f"Dial {FALLBACK}"]
        check_form(answer)
        answer = await platform.type(answer, "222222#")
        assert verbs(answer) == [f"Say {WRONG}", f"Dial {FALLBACK}"]
        check_form(answer)
    await settle(running)
    assert [(e.gate, e.status, e.reason, e.source, e.call_id, e.caller) for e in entries(running)
            ] == [("lobby", "NAK", "unknown_code", "twiml", CALL_SID, VISITOR)] * 2
    dump = "\n".join(" ".join(map(str, row)) for row in sqlite3.connect(
        running.daemon.gatekeeper.store.path).execute("SELECT * FROM entries"))
    assert "111111" not in dump and "222222" not in dump
    assert "111111" not in repr(logs) and "222222" not in repr(logs)


async def test_a_right_code_plays_the_tone_the_call_box_opens_on(start_daemon: Any) -> None:
    """Incoming -> prompt; the right code -> welcome, <Play digits> with the gate's tone,
    hang up. The entry says actuator dtmf."""
    running = await start_daemon(twiml_table())
    platform = Platform(running)
    answer = await platform.type(await platform.incoming(), FLAT_12)
    assert verbs(answer) == ["Say Welkom.", "Play 9w9", "Hangup"]
    check_form(answer)
    await settle(running)
    assert [(e.gate, e.status, e.reason, e.credential, e.actuator, e.source, e.call_id)
            for e in entries(running)] == [
        ("lobby", "ACK", "granted_code", "Flat 12", "dtmf", "twiml", CALL_SID)]


async def test_a_code_for_a_relay_gate_pulses_it_and_says_the_callername(
        start_daemon: Any) -> None:
    """On a relay gate a TwiML ACK pulses the relay once and answers with the credential's
    callername and destination; no tone is played."""
    running = await start_daemon(twiml_table(), pulse=0.05)
    barrier = running.pin(17)
    platform = Platform(running, called=BARRIER)
    answer = await platform.type(await platform.incoming(), "471123")
    assert verbs(answer) == ["Say Welcome", "Dial 201"]
    await eventually(lambda: len(states(barrier)) == 3)
    assert states(barrier) == [False, True, False]


async def test_a_route_only_code_is_put_through_without_asking_again(start_daemon: Any) -> None:
    """A route-only code says its callername and dials its destination; nothing opens."""
    running = await start_daemon(twiml_table())
    platform = Platform(running, called=BARRIER)
    answer = await platform.type(await platform.incoming(), "9000")
    assert verbs(answer) == ["Say Sales desk", "Dial +31501234599"]
    assert states(running.pin(17)) == [False]


async def test_a_caller_on_the_list_is_answered_at_once_and_recorded_once(
        start_daemon: Any) -> None:
    """A resident on the caller list opens without a prompt (one entry); an incoming call
    that is asked for a code records nothing."""
    running = await start_daemon(twiml_table(), pulse=0.05)
    assert verbs(await Platform(running, called=BARRIER).incoming()) == ASKING
    answer = await Platform(running, caller=RESIDENT, called=BARRIER).incoming()
    assert verbs(answer) == ["Say Welkom.", "Hangup"]
    await settle(running)
    assert [(e.caller, e.status, e.reason) for e in entries(running)] == [
        (RESIDENT, "ACK", "granted_caller")]


async def test_a_call_to_no_gates_number_is_refused_at_once(start_daemon: Any) -> None:
    """A called number no gate answers to gets no prompt: the fallback, and one entry."""
    running = await start_daemon(twiml_table())
    answer = await Platform(running, called="+31209999999").incoming()
    assert verbs(answer) == [f"Dial {FALLBACK}"]
    await settle(running)
    assert [(e.status, e.reason, e.source) for e in entries(running)] == [
        ("NAK", "unknown_number", "twiml")]


async def test_no_input_goes_to_the_fallback_and_records_nothing(start_daemon: Any) -> None:
    """Digits empty (only # pressed): the fallback, and no decision made."""
    running = await start_daemon(twiml_table(fallback=""))
    platform = Platform(running)
    answer = await platform.incoming()
    assert verbs(answer) == ["Gather 1", f"  Say {PROMPT}", "Hangup"]
    assert verbs(await platform.type(answer, "#")) == ["Hangup"]
    await settle(running)
    assert entries(running) == []


async def test_an_open_that_fails_goes_to_the_fallback(start_daemon: Any) -> None:
    """ERR (the actuator failed) answers with the fallback, recorded as ERR."""
    running = await start_daemon(twiml_table(), actuators={"barrier": FakeActuator(
        "barrier", fail=True)})
    platform = Platform(running, called=BARRIER)
    assert verbs(await platform.type(await platform.incoming(), "5555")) == [f"Dial {FALLBACK}"]
    await settle(running)
    assert [(e.status, e.actuator) for e in entries(running)] == [("ERR", "actuator_failed")]


async def test_twilios_withheld_caller_ids_can_still_type_a_code(start_daemon: Any) -> None:
    """Twilio spells a withheld number +266696687 (ANONYMOUS): a visitor who withholds
    theirs is not refused as a malformed number."""
    running = await start_daemon(twiml_table())
    platform = Platform(running, caller="+266696687")
    answer = await platform.type(await platform.incoming(), FLAT_12)
    assert verbs(answer)[1] == "Play 9w9"
    await settle(running)
    assert [(e.caller, e.reason) for e in entries(running)] == [(None, "granted_code")]


# -- who may ask ---------------------------------------------------------------------------

def _tamper(kind: str, platform: Platform) -> tuple[str, dict[str, str], dict[str, str]]:
    """(URL, params, headers) of a /code request whose signature does not hold."""
    url = f"{PUBLIC}/code?attempt=1"
    params = {**platform.params, "Digits": FLAT_12}
    good = platform.signature(url, params)
    if kind == "wrong token":
        return url, params, {"X-Twilio-Signature": RequestValidator(
            "f" * 32).compute_signature(url, params)}
    if kind == "missing":
        return url, params, {}
    if kind == "empty":
        return url, params, {"X-Twilio-Signature": ""}
    if kind == "signed for the address behind the proxy":
        local = platform.local + "/code?attempt=1"
        return url, params, {"X-Twilio-Signature": platform.signature(local, params)}
    if kind == "another number after signing":
        return url, {**params, "To": BARRIER}, {"X-Twilio-Signature": good}
    assert kind == "another attempt after signing"
    return f"{PUBLIC}/code?attempt=2", params, {"X-Twilio-Signature": good}


@pytest.mark.parametrize("kind", ["wrong token", "missing", "empty",
                                  "signed for the address behind the proxy",
                                  "another number after signing", "another attempt after signing"])
async def test_a_bad_signature_is_refused_and_nothing_is_evaluated(start_daemon: Any,
                                                                   kind: str) -> None:
    """403 with one log line; no decision, no entry, no relay, and the digits nowhere."""
    running = await start_daemon(twiml_table())
    platform = Platform(running, called=BARRIER)
    url, params, headers = _tamper(kind, platform)
    params["Digits"] = "471123"
    with capture_logs() as logs:
        status, text = await platform.send(url, params, headers=headers)
    assert (status, text) == (403, "forbidden\n")
    assert [(e["event"], e.get("why")) for e in logs] == [
        ("refused", "bad or missing signature")]
    assert "471123" not in repr(logs)
    await settle(running)
    assert entries(running) == []
    assert states(running.pin(17)) == [False]


async def test_forwarded_headers_do_not_choose_the_url_that_is_checked(
        start_daemon: Any) -> None:
    """Only public_url is signed for: a request naming another host in the proxy headers,
    signed for that host, is refused; the real one passes through any proxy headers."""
    running = await start_daemon(twiml_table())
    platform = Platform(running)
    forged = "https://attacker.example/twiml"
    headers = {"X-Forwarded-Host": "attacker.example", "X-Forwarded-Proto": "https",
               "Host": "attacker.example"}
    status, _ = await platform.send(PUBLIC, platform.params, headers={
        **headers, "X-Twilio-Signature": platform.signature(forged, platform.params)})
    assert status == 403
    status, _ = await platform.send(PUBLIC, platform.params, headers={
        **headers, "X-Twilio-Signature": platform.signature(PUBLIC, platform.params)})
    assert status == 200


async def test_a_signature_from_signalwire_is_checked_the_same_way(start_daemon: Any) -> None:
    """SignalWire signs cXML webhooks like Twilio, in X-SignalWire-Signature."""
    running = await start_daemon(twiml_table())
    platform = Platform(running)
    good = platform.signature(PUBLIC, platform.params)
    assert (await platform.send(PUBLIC, platform.params,
                                headers={"X-SignalWire-Signature": good}))[0] == 200
    assert (await platform.send(PUBLIC, platform.params,
                                headers={"X-SignalWire-Signature": good[::-1]}))[0] == 403


async def test_without_an_auth_token_the_token_is_asked_and_carried_along(
        start_daemon: Any) -> None:
    """No auth_token: ?token= one of [server] tokens, carried into the action URL; a wrong
    or missing one is 403."""
    running = await start_daemon(twiml_table(auth=None))
    platform = Platform(running, auth=None)
    assert (await platform.send(PUBLIC, platform.params))[0] == 403
    assert (await platform.send(f"{PUBLIC}?token=not-the-token-000", platform.params))[0] == 403
    answer = await platform.incoming(f"{PUBLIC}?token={TOKEN}")
    action = urllib.parse.urlsplit(answer.find("Gather").get("action", ""))  # type: ignore[union-attr]
    assert urllib.parse.parse_qs(action.query) == {"attempt": ["1"], "token": [TOKEN]}
    assert verbs(await platform.type(answer, FLAT_12))[:2] == ["Say Welkom.", "Play 9w9"]


async def test_configured_texts_are_escaped_in_every_answer(start_daemon: Any) -> None:
    """Prompts, names and numbers with &, < and quotes come out as well-formed XML that
    says exactly the configured text."""
    prompt = 'Press <your> code & then "#", it\'s fine'
    wrong = "Tom & Jerry's <gate> \"says\" no"
    running = await start_daemon(twiml_table(prompt=prompt, wrong=wrong, welcome="A&B <c>")
                                 + '\n[[codes]]\nname = "Odd"\ncode = "8642"\n'
                                 'gates = ["barrier"]\ncallername = "Q&A <\\"x\\"> \'y\'"\n',
                                 pulse=0.05)
    platform = Platform(running, called=BARRIER)
    status, text = await platform.send(PUBLIC, platform.params)
    assert status == 200 and "&amp;" in text and "&lt;your&gt;" in text
    answer = parse(text)
    assert verbs(answer)[1] == f"  Say {prompt}"
    assert verbs(await platform.type(answer, "000000"))[0] == f"Say {wrong}"
    # A call that opened decides no more: each code in a call of its own.
    for n, (digits, said) in enumerate([("8642", "Say Q&A <\"x\"> 'y'"),
                                        ("5555", "Say A&B <c>")]):
        call = _another_call(running, f"CA{n:032d}", called=BARRIER)
        assert verbs(await call.type(await call.incoming(), digits))[0] == said


# -- replays ---------------------------------------------------------------------------------
# Twilio's signature covers the URL and the parameters, and no time: whoever captured one
# signed request (a proxy's log, a debugging dump) can send it again, and it still holds.

def _asked(platform: Platform, answer: ET.Element, digits: str) -> tuple[str, dict[str, str]]:
    """(URL, params) of the signed request typing ``digits`` at the answer's <Gather>."""
    gather = answer.find("Gather")
    assert gather is not None, verbs(answer)
    return gather.get("action", ""), {**platform.params, "CallStatus": "in-progress",
                                      "Digits": digits}


def _another_call(running: Any, sid: str, **kwargs: Any) -> Platform:
    other = Platform(running, **kwargs)
    other.params["CallSid"] = sid
    return other


@pytest.mark.parametrize("captured", ["digits", "resident's call"])
async def test_a_replayed_signed_request_opens_the_gate_once(start_daemon: Any,
                                                             captured: str) -> None:
    """A captured signed request of a call that opened the gate, sent twice more, opens
    nothing: each replay is answered with the TwiML a fresh refusal gets there (nothing
    tells it apart) and recorded replayed_call; the relay pulsed once."""
    running = await start_daemon(twiml_table(), pulse=0.05)
    barrier = running.pin(17)
    if captured == "digits":
        platform = Platform(running, called=BARRIER)
        url, params = _asked(platform, await platform.incoming(), "471123")
        # A fresh refusal at the same attempt: a wrong code in another call.
        other = _another_call(running, "CA" + "6" * 32, called=BARRIER)
        refusal = await other.send(*_asked(other, await other.incoming(), "000000"))
        granted, heard = "granted_code", ["Say Welcome", "Dial 201"]
    else:
        platform = Platform(running, caller=RESIDENT, called=BARRIER)
        url, params = PUBLIC, platform.params
        # A fresh refusal of an incoming call: one to no gate's number.
        other = _another_call(running, "CA" + "6" * 32, called="+31209999999")
        refusal = await other.send(PUBLIC, other.params)
        granted, heard = "granted_caller", ["Say Welkom.", "Hangup"]
    status, text = await platform.send(url, params)
    assert (status, verbs(parse(text))) == (200, heard)
    await eventually(lambda: states(barrier) == [False, True, False])
    assert refusal[0] == 200
    with capture_logs() as logs:
        for _ in range(2):
            assert await platform.send(url, params) == refusal
    await settle(running)
    assert states(barrier) == [False, True, False]
    assert [e.reason for e in entries(running) if e.call_id == CALL_SID] == [
        granted, "replayed_call", "replayed_call"]
    assert "471123" not in repr(logs)


async def test_a_captured_call_decides_at_most_attempts_times(start_daemon: Any) -> None:
    """A call's signed digits request sent again and again is decided only as often as the
    call has attempts (here 2); later copies are answered as the wrong code was, decide
    nothing and count as no further guess."""
    running = await start_daemon(twiml_table(attempts=2))
    platform = Platform(running)
    url, params = _asked(platform, await platform.incoming(), "000000")
    answers = [await platform.send(url, params) for _ in range(4)]
    assert answers == [answers[0]] * 4
    assert verbs(parse(answers[0][1]))[:2] == [f"Say {WRONG}", "Gather 2"]
    await settle(running)
    assert [e.reason for e in entries(running)] == [
        "unknown_code", "unknown_code", "replayed_call", "replayed_call"]
    strikes = running.daemon.gatekeeper.ledger.lockout.strikes(VISITOR)
    assert strikes is not None and strikes.failures == 2


async def test_digits_for_a_call_this_site_never_asked_open_nothing(start_daemon: Any) -> None:
    """A signed digits request for a call this site never asked for a code (one it has
    forgotten since, or never saw) is answered as a wrong code is and opens nothing."""
    running = await start_daemon(twiml_table(), pulse=0.05)
    platform = Platform(running, called=BARRIER)
    params = {**platform.params, "CallStatus": "in-progress", "Digits": "471123"}
    status, text = await platform.send(f"{PUBLIC}/code?attempt=1", params)
    assert (status, verbs(parse(text))) == (
        200, [f"Say {WRONG}", "Gather 2", f"  Say {PROMPT}", f"Dial {FALLBACK}"])
    await settle(running)
    assert states(running.pin(17)) == [False]
    assert [(e.status, e.reason) for e in entries(running)] == [("NAK", "replayed_call")]


async def test_a_call_that_opened_opens_nothing_after_a_restart(start_daemon: Any,
                                                                 tmp_path: Path) -> None:
    """What a call has decided is kept in the store file: after a restart its replayed
    digits still open nothing, and a call asked for its code before the restart still
    opens with it after."""
    running = await start_daemon(twiml_table(), pulse=0.05)
    platform = Platform(running, called=BARRIER)
    url, params = _asked(platform, await platform.incoming(), "471123")
    assert verbs(parse((await platform.send(url, params))[1])) == ["Say Welcome", "Dial 201"]
    waiting = _another_call(running, "CA" + "7" * 32, called=BARRIER)
    asked = await waiting.incoming()
    await running.stop()

    again = await start_daemon(config=tmp_path / "gated.toml")
    barrier = again.pin(17)
    await eventually(lambda: not barrier.state)
    before = states(barrier)
    status, text = await Platform(again, called=BARRIER).send(url, params)
    assert (status, verbs(parse(text))[:2]) == (200, [f"Say {WRONG}", "Gather 2"])
    assert states(barrier) == before
    waiting = _another_call(again, "CA" + "7" * 32, called=BARRIER)
    assert verbs(await waiting.type(asked, "471123")) == ["Say Welcome", "Dial 201"]
    assert states(barrier)[len(before):][:1] == [True]
    await settle(again)
    assert [(e.call_id[-1], e.reason) for e in entries(again)] == [
        ("5", "granted_code"), ("5", "replayed_call"), ("7", "granted_code")]


async def test_the_calls_a_site_remembers_are_bounded(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A call is remembered two days (Twilio ends every call within one), and at most
    MAX_CALLS of them, oldest forgotten first, in memory and in the store file alike; a
    forgotten call's digits still open nothing, for it was never asked here since."""
    from gated.core import decide as decide_mod
    from gated.core.decide import KEEP_CALLS, Request, decide
    from gated.core.lockout import Policy

    monkeypatch.setattr(decide_mod, "MAX_CALLS", 3)
    book = compiler.load(write_config(tmp_path, twiml_table())).book
    store = Store.open(tmp_path / "calls.sqlite3")
    writer = asyncio.create_task(store.run())
    ledger = store.load_ledger(Policy())
    now = 1_790_000_000.0

    def ask(sid: str, at: float) -> None:
        request = Request(BARRIER, VISITOR, call_id=sid, attempts=2)
        assert decide(request, book, ledger, at).reason == "unknown_caller"
        store.submit(None, ledger.asked(request, at), ledger)

    def digits(sid: str, at: float) -> str:
        request = Request(BARRIER, VISITOR, code="471123", call_id=sid, attempts=2,
                          follows=True)
        decision = decide(request, book, ledger, at)
        store.submit(None, ledger.apply(request, decision, at), ledger)
        return decision.reason

    def stored() -> list[str]:
        return [sid for (sid,) in sqlite3.connect(store.path).execute(
            "SELECT id FROM calls ORDER BY began")]

    try:
        ask("CA1", now)
        assert digits("CA1", now + 10) == "granted_code"
        for n, sid in enumerate(("CA2", "CA3", "CA4"), 1):
            ask(sid, now + 20 + n)
        await store.flush()
        assert list(ledger.calls) == stored() == ["CA2", "CA3", "CA4"]
        assert digits("CA1", now + 30) == "replayed_call"
        ask("CA5", now + KEEP_CALLS + 22.5)  # CA2 and CA3 are two days old by now
        await store.flush()
        assert list(ledger.calls) == stored() == ["CA4", "CA5"]
        assert list(store.load_ledger(Policy(), now + KEEP_CALLS + 30).calls) == ["CA5"]
    finally:
        writer.cancel()
        store.close()


async def test_a_request_from_another_account_is_refused_unevaluated(
        start_daemon: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """With [twiml] account_sid, a request signed with the right token but naming another
    AccountSid is 403 with one log line, nothing decided or recorded; the site's own
    account's calls go on, and `gated call --twiml` names that account."""
    account = "AC" + "1" * 32
    running = await start_daemon(twiml_table(account_sid=account), pulse=0.05)
    platform = Platform(running, caller=RESIDENT, called=BARRIER)
    with capture_logs() as logs:
        assert await platform.send(PUBLIC, platform.params) == (403, "forbidden\n")
    assert [(e["event"], e.get("why")) for e in logs] == [("refused", "another account")]
    await settle(running)
    assert entries(running) == []
    assert states(running.pin(17)) == [False]
    platform.params["AccountSid"] = account
    assert verbs(await platform.incoming()) == ["Say Welkom.", "Hangup"]
    host, port = running.daemon.listening[0]
    capsys.readouterr()
    with capture_logs():
        code = await asyncio.to_thread(main, [
            "-c", str(tmp_path / "gated.toml"), "call", "--twiml", "--url",
            f"http://{host}:{port}/twiml", "--from", VISITOR, "--to", LOBBY, "--code", FLAT_12])
    assert code == 0, capsys.readouterr().out


# -- one site, two platforms ---------------------------------------------------------------

async def test_twiml_and_voipgrid_guesses_share_one_lockout(start_daemon: Any) -> None:
    """Wrong codes from one number count together whichever PBX carried them; once locked,
    the right code over TwiML is told it is wrong, and recorded locked_out."""
    running = await start_daemon(twiml_table(attempts=5) + textwrap.dedent("""
        [lockout]
        caller_failures = 4
        site_failures = 30
        """))
    for code in ("100001", "100002"):
        assert await running.get(code=code, did=LOBBY, callerid=VISITOR) == (200, "status=NAK")
    platform = Platform(running)
    answer = await platform.incoming()
    for code in ("100003", "100004"):
        answer = await platform.type(answer, code)
    answer = await platform.type(answer, FLAT_12)
    assert verbs(answer)[0] == f"Say {WRONG}"
    assert await running.get(code=FLAT_12, did=LOBBY, callerid=VISITOR) == (200, "status=NAK")
    await settle(running)
    assert [(e.source, e.reason) for e in entries(running)] == [
        ("pbx", "unknown_code"), ("pbx", "unknown_code"), ("twiml", "unknown_code"),
        ("twiml", "unknown_code"), ("twiml", "locked_out"), ("pbx", "locked_out")]


async def test_twiml_and_voipgrid_guessers_fill_one_site_lock(start_daemon: Any) -> None:
    """Guesses from different numbers on both platforms count towards the one site-wide
    limit; once it locks, a third caller's right code over TwiML is refused."""
    running = await start_daemon(twiml_table(attempts=5) + textwrap.dedent("""
        [lockout]
        caller_failures = 10
        site_failures = 4
        """))
    for code in ("100001", "100002"):
        assert await running.get(code=code, did=LOBBY, callerid="+31611111111") == (
            200, "status=NAK")
    guesser = Platform(running, caller="+31622222222")
    answer = await guesser.incoming()
    for code in ("100003", "100004"):
        answer = await guesser.type(answer, code)
    resident = Platform(running, caller="+31633333333")
    assert verbs(await resident.type(await resident.incoming(), FLAT_12))[0] == f"Say {WRONG}"
    await settle(running)
    assert [(e.source, e.caller[-1], e.reason) for e in entries(running)] == [
        ("pbx", "1", "unknown_code"), ("pbx", "1", "unknown_code"),
        ("twiml", "2", "unknown_code"), ("twiml", "2", "unknown_code"),
        ("twiml", "3", "locked_out")]


async def test_a_call_box_gate_opened_from_a_voipgrid_call_is_err_needs_call(
        start_daemon: Any) -> None:
    """A VoIPGRID answer cannot carry a tone: the right code is ERR, actuator needs_call,
    and a use-limited code keeps its use."""
    running = await start_daemon(twiml_table() + textwrap.dedent("""
        [[codes]]
        name = "Once"
        code = "135790"
        gates = ["lobby"]
        max_uses = 1
        """))
    assert await running.get(code=FLAT_12, did=LOBBY, callerid=VISITOR) == (200, "status=ERR")
    assert await running.get(code="135790", did=LOBBY, callerid=VISITOR) == (200, "status=ERR")
    platform = Platform(running)
    assert verbs(await platform.type(await platform.incoming(), "135790"))[1] == "Play 9w9"
    await settle(running)
    assert [(e.source, e.status, e.reason, e.actuator) for e in entries(running)] == [
        ("pbx", "ERR", "granted_code", "needs_call"),
        ("pbx", "ERR", "granted_code", "needs_call"),
        ("twiml", "ACK", "granted_code", "dtmf")]


async def test_a_call_box_gate_opened_remotely_is_err_needs_call(
        broker: Mosquitto, probe: Probe, start_daemon: Any) -> None:
    """A remote open over MQTT has no call to play a tone into: ERR needs_call."""
    running = await start_daemon(mqtt_table(broker) + twiml_table())
    await mqtt_ready(running)
    await probe.publish("gated/test/gates/lobby/open", open_payload())
    await eventually(lambda: bool(entries(running)))
    assert [(e.gate, e.source, e.status, e.reason, e.actuator) for e in entries(running)] == [
        ("lobby", "mqtt", "ERR", "granted_remote", "needs_call")]


async def test_home_assistant_offers_no_open_button_for_a_call_box_gate(
        broker: Mosquitto, probe: Probe, start_daemon: Any) -> None:
    """Discovery announces the call box's entries but no Open button that could only ever
    answer needs_call."""
    await probe.subscribe("homeassistant/+/+/+/config")
    running = await start_daemon(mqtt_table(broker) + twiml_table())
    await mqtt_ready(running)
    announced = await probe.wait_for("homeassistant/+/+/+/config", 6)
    assert sorted(m.topic for m in announced if "lobby" in m.topic) == [
        "homeassistant/event/gated_test/lobby/config"]
    assert "homeassistant/button/gated_test/barrier_open/config" in {m.topic for m in announced}


# -- config, store, command line -----------------------------------------------------------

@pytest.mark.parametrize(("extra", "path", "message"), [
    ('[gates.lobby]\nnumbers = ["+31201234567"]\nactuator = { type = "dtmf", digits = "9x" }\n',
     "gates.lobby.actuator.digits", "0-9, * and #, w for a half-second pause"),
    ('[gates.lobby]\nnumbers = ["+31201234567"]\nactuator = { type = "dtmf", digits = "9" }\n',
     "gates.lobby.actuator.type", "needs a [twiml] table"),
    (twiml_table() + '\n[gates.lobby.sensor]\ntype = "gpio"\npin = 22\n',
     "gates.lobby.sensor", "cannot confirm"),
    (twiml_table().replace('path = "/twiml"', 'path = "/voipgrid"'), "twiml.path", "overlap"),
    (twiml_table().replace(PUBLIC, PUBLIC + "?x=1"), "twiml.public_url", "no query"),
    (twiml_table().replace(PUBLIC, "gate.example.nl/twiml"), "twiml.public_url", "full URL"),
    (twiml_table(fallback="reception"), "twiml.fallback", "phone number"),
    (twiml_table(attempts=0), "twiml.attempts", "at least 1"),
])
def test_call_box_and_twiml_settings_are_checked_at_load(tmp_path: Path, extra: str, path: str,
                                                         message: str) -> None:
    """A bad [twiml] table or dtmf gate stops gated at start, naming the key."""
    config = write_config(tmp_path, extra)
    with pytest.raises(ConfigError) as caught:
        compiler.load(config)
    assert caught.value.path == path and message in caught.value.detail


async def test_twiml_texts_and_token_reload_and_its_path_needs_a_restart(
        start_daemon: Any, tmp_path: Path) -> None:
    """A reload applies new texts and a new auth token to the next call (a rotated token
    refuses the old one); a new path is refused and named, not quietly ignored."""
    running = await start_daemon(twiml_table())
    path = tmp_path / "gated.toml"
    path.write_text(path.read_text().replace(WRONG, "Helaas.").replace(AUTH, "f" * 32))
    assert await running.daemon.reload("test")
    assert (await Platform(running).send(PUBLIC, Platform(running).params))[0] == 403
    platform = Platform(running, auth="f" * 32)
    assert verbs(await platform.type(await platform.incoming(), "000000"))[0] == "Say Helaas."
    path.write_text(path.read_text().replace('path = "/twiml"', 'path = "/call"'))
    with capture_logs() as logs:
        assert not await running.daemon.reload("test")
    assert logs[-1]["changed"] == ["twiml.path"]
    assert (await platform.send(PUBLIC, platform.params))[0] == 200


def test_the_dtmf_digits_may_be_every_key_and_a_pause(tmp_path: Path) -> None:
    """0-9, * and # and w (half a second) are a tone; they load as written."""
    config = write_config(tmp_path, twiml_table().replace('"9w9"', '"0123456789*#w"'))
    assert compiler.load(config).config.gates["lobby"].actuator.digits == "0123456789*#w"  # type: ignore[union-attr]


WITHOUT_TWILIO = "import sys; sys.modules['twilio'] = None; from gated.cli import main; " \
                 "sys.exit(main(sys.argv[1:]))"


def _without_twilio(*args: str) -> subprocess.CompletedProcess[str]:
    """The gated command on a machine where the twilio extra is not installed."""
    return subprocess.run([sys.executable, "-c", WITHOUT_TWILIO, *args], capture_output=True,
                          text=True, timeout=60, check=False)


def test_signatures_without_the_twilio_extra_stop_check_config_and_the_daemon(
        tmp_path: Path) -> None:
    """With auth_token and no twilio package, check-config and run both say, in one line,
    what to install."""
    config = str(write_config(tmp_path, twiml_table()))
    for command in (["check-config", config], ["-c", config, "run"]):
        done = _without_twilio(*command)
        assert done.returncode == 2
        assert done.stdout == ""
        assert done.stderr.splitlines() == [
            f"config error: {config}:{_line(config, 'auth_token')}: twiml.auth_token: checking "
            "the signature needs the twilio package: pip install 'gated[twilio]'"]
    assert not (tmp_path / "state" / "entries.sqlite3").exists()


def test_token_mode_needs_no_twilio_package(tmp_path: Path) -> None:
    """Without auth_token the answers are built and the config loads with no twilio."""
    config = str(write_config(tmp_path, twiml_table(auth=None)))
    done = _without_twilio("check-config", config)
    assert done.returncode == 0, done.stderr
    assert "twiml     https://gate.example.nl/twiml" in done.stdout


def _line(path: str, key: str) -> int:
    return next(n for n, line in enumerate(Path(path).read_text().splitlines(), 1)
                if line.startswith(key))


def test_an_older_store_gains_the_call_id_and_keeps_its_entries(tmp_path: Path) -> None:
    """A store of the schema before call_id reads as it is (gated log before the daemon
    migrated it), then opens, keeps its entries (call_id empty) and is at the current
    schema."""
    path = tmp_path / "old.sqlite3"
    old = sqlite3.connect(path)
    before = next(n for n, step in enumerate(MIGRATIONS) if "call_id" in step)
    old.executescript("".join(MIGRATIONS[:before]))
    old.execute("INSERT INTO entries (time, status, reason) VALUES (1.0, 'ACK', 'granted_code')")
    old.execute(f"PRAGMA user_version = {before:d}")
    old.commit()
    old.close()
    assert [(e.reason, e.call_id) for e in read_entries(path)] == [("granted_code", "")]
    Store.open(path).close()
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    assert [(e.reason, e.call_id) for e in read_entries(path)] == [("granted_code", "")]


async def test_gated_call_twiml_plays_a_whole_call(start_daemon: Any, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """`gated call --twiml` signs every request for the public URL, follows the Gather,
    never prints the digits, and says what the caller hears and the box receives."""
    running = await start_daemon(twiml_table())
    host, port = running.daemon.listening[0]
    config = tmp_path / "gated.toml"
    capsys.readouterr()
    with capture_logs():  # the daemon's own log lines, not the command's output
        code = await asyncio.to_thread(main, [
            "-c", str(config), "call", "--twiml", "--url", f"http://{host}:{port}/twiml",
            "--from", VISITOR, "--to", LOBBY, "--code", "111111", "--code", FLAT_12])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "111111" not in out and FLAT_12 not in out
    lines = out.splitlines()
    assert lines[0].startswith("call CA") and lines[0].endswith(f"from {VISITOR} to {LOBBY}")
    assert [line for line in lines if line.startswith(("  ", "caller", "->"))] == [
        f'  caller hears  "{PROMPT}" (nl-NL, Polly.Lotte)',
        f"  waits 6 s for digits ending in #, then POST {PUBLIC}/code?attempt=1",
        "caller types ******#",
        f'  caller hears  "{WRONG}" (nl-NL, Polly.Lotte)',
        f'  caller hears  "{PROMPT}" (nl-NL, Polly.Lotte)',
        f"  waits 6 s for digits ending in #, then POST {PUBLIC}/code?attempt=2",
        "caller types ******#",
        '  caller hears  "Welkom." (nl-NL, Polly.Lotte)',
        "  call box hears the tones 9w9: the door opens",
        "  call ends",
        "-> admitted: the call box got its tone",
    ]
    await settle(running)
    assert [e.reason for e in entries(running)] == ["unknown_code", "granted_code"]


async def test_gated_call_twiml_with_nothing_typed_ends_at_the_fallback(
        start_daemon: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """No --code: the caller types nothing, and the command says where the call went."""
    running = await start_daemon(twiml_table())
    host, port = running.daemon.listening[0]
    capsys.readouterr()
    with capture_logs():
        code = await asyncio.to_thread(main, [
            "-c", str(tmp_path / "gated.toml"), "call", "--twiml", "--url",
            f"http://{host}:{port}/twiml", "--from", VISITOR, "--to", LOBBY])
    out = capsys.readouterr().out
    assert code == 1
    assert out.splitlines()[-3:] == ["  (the caller types nothing)", f"  put through to {FALLBACK}",
                                     "-> not admitted: no input, the call went to the fallback"]


async def test_gated_call_twiml_says_when_the_signature_is_refused(
        start_daemon: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Signed with another auth token than the daemon's: 403, and what to check."""
    running = await start_daemon(twiml_table())
    host, port = running.daemon.listening[0]
    other = tmp_path / "other"
    other.mkdir()
    config = write_config(other, twiml_table(auth="e" * 32))
    capsys.readouterr()
    with capture_logs():
        code = await asyncio.to_thread(main, [
            "-c", str(config), "call", "--twiml", "--url", f"http://{host}:{port}/twiml",
            "--from", VISITOR, "--to", LOBBY, "--code", FLAT_12])
    assert code == 2
    assert capsys.readouterr().out.splitlines()[-2:] == [
        "HTTP 403: forbidden", "-> refused: check [twiml] auth_token and public_url (the URL "
        "the platform signs), or the token"]


def test_pulse_refuses_a_call_box_gate(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                       ) -> None:
    """`gated pulse` on a dtmf gate says how to try it instead of pretending to open."""
    config = write_config(tmp_path, twiml_table())
    assert main(["-c", str(config), "pulse", "lobby"]) == 2
    assert "gated call --twiml" in capsys.readouterr().err


def test_the_example_config_documents_twiml(tmp_path: Path) -> None:
    """The example's commented [twiml] table, uncommented, is a valid config."""
    lines = (Path(__file__).parent.parent / "config" / "gated.example.toml").read_text(
        ).splitlines()
    block = []
    for line in lines[lines.index("# [twiml]"):]:
        if line == "#":
            break
        block.append(line.removeprefix("# "))
    text = config_text(tmp_path, "\n".join(block))
    path = tmp_path / "example.toml"
    path.write_text(text)
    assert compiler.load(path).config.twiml is not None
