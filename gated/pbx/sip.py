"""gated's own SIP endpoint: the call's logic, over the call-engine port.

The engine (``gated.pbx.engine``) answers, plays and hangs up; this module
decides what it does. A call rings: a trunk's call from an address outside
``trunk_from`` is hung up unanswered and nothing is decided; at ``max_calls``
calls a new one is hung up unanswered (busy). Otherwise it is answered and
decided as any call (source ``sip``): a caller that opens or is routed without
a code is served at once; any other hears the prompt, and its digits, ended by
``#`` or a pause, are decided. ACK plays a call box's tone, then transfers to
the code's destination or hangs up; NAK prompts again until ``attempts``, then
the call goes to ``fallback`` (or is hung up), as ERR does. Transfers go only to
numbers written in the config: a destination that arrived any other way (a
visitor code over the broker) hangs up instead, so no code can make the site
pay for a call to a number of its choosing. Each call is bounded by ``max_call``
seconds. The digits typed are never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import ipaddress
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field

import structlog

from gated.book.config import Config
from gated.core.decide import Status
from gated.core.errors import EngineError, NumberError
from gated.core.numbers import normalise
from gated.core.printable import printable
from gated.pbx.engine import CallEngine, Digit, Ended, Incoming
from gated.site.gatekeeper import Answer, Gatekeeper, RawCall

log = structlog.get_logger("gated.sip")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# The user part of a SIP or tel URI, display name and parameters left out.
_USER = re.compile(r"(?:sips?|tel):([^@;>?]+)", re.IGNORECASE)
# A user part that is a phone number (anything else, "anonymous", a name, is none).
_NUMBER = re.compile(r"\+?[0-9]{2,20}")
_CALL_ID = re.compile(r"[A-Za-z0-9:._-]{1,64}")
KEYS = frozenset("0123456789*#")


def number_of(uri: str) -> str | None:
    """The phone number a SIP URI's user part holds, or None (anonymous, a name)."""
    found = _USER.search(uri)
    if found is None:
        return None
    user = found.group(1).strip()
    return user if _NUMBER.fullmatch(user) else None


def call_id(value: str) -> str:
    """The call's id as the store keeps it: a SIP Call-ID that is not plain, hashed."""
    if _CALL_ID.fullmatch(value):
        return value
    return "~" + hashlib.blake2b(value.encode(), digest_size=16).hexdigest()


def source_allowed(source: str | None, allowed: tuple[Network, ...]) -> bool:
    """Whether a call from ``source`` ("host" or "host:port") may be taken."""
    if source is None:
        return False
    host = source.rsplit(":", 1)[0] if source.count(":") == 1 else source
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return any(address in network for network in allowed)


@dataclass(frozen=True, slots=True)
class SipSettings:
    attempts: int = 3
    input_timeout: float = 5.0  # a pause this long ends the digits
    max_digits: int = 32
    fallback: str = ""  # where a failed call is transferred; empty: hang up
    # The numbers a call may be transferred to: those written in the config.
    transfers: frozenset[str] = frozenset()
    # Trunk mode: INVITEs only from these; None: register mode, where the engine
    # takes calls only through its registration.
    trunk_from: tuple[Network, ...] | None = None
    max_calls: int = 4
    max_call: float = 120.0  # seconds a call may last, whatever happens in it

    @staticmethod
    def networks(values: Iterable[str]) -> tuple[Network, ...]:
        return tuple(ipaddress.ip_network(v, strict=False) for v in values)


@dataclass(slots=True)
class _Call:
    incoming: Incoming
    digits: asyncio.Queue[str] = field(default_factory=asyncio.Queue)
    task: asyncio.Task[None] | None = None


class SipCalls:
    """The calls an engine brings, each decided through the gatekeeper."""

    def __init__(self, engine: CallEngine, gatekeeper: Gatekeeper, settings: SipSettings) -> None:
        self.engine = engine
        self.gatekeeper = gatekeeper
        self.settings = settings
        self.calls: dict[str, _Call] = {}

    async def run(self) -> None:
        """Serve the engine's events until they end; calls in progress end with them."""
        try:
            async for event in self.engine.events():
                if isinstance(event, Incoming):
                    await self._incoming(event)
                elif isinstance(event, Digit):
                    call = self.calls.get(event.call)
                    if call is not None and event.digit in KEYS:
                        call.digits.put_nowait(event.digit)
                elif isinstance(event, Ended):
                    call = self.calls.pop(event.call, None)
                    if call is not None and call.task is not None:
                        call.task.cancel()  # it is gone: nothing left to say to it
        finally:
            tasks = [c.task for c in self.calls.values() if c.task is not None]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.calls.clear()

    async def _incoming(self, event: Incoming) -> None:
        settings = self.settings
        if event.call in self.calls:
            return  # the engine told of it twice
        if settings.trunk_from is not None and not source_allowed(event.source,
                                                                   settings.trunk_from):
            log.warning("sip call refused", why="not from trunk_from", source=event.source,
                        call_id=call_id(event.call))
            await self._hang_up(event.call)
            return
        if len(self.calls) >= settings.max_calls:
            log.warning("sip call refused", why="busy", calls=len(self.calls),
                        call_id=call_id(event.call))
            await self._hang_up(event.call)
            return
        call = self.calls[event.call] = _Call(event)
        call.task = asyncio.create_task(self._serve(call), name=f"sip call {call_id(event.call)}")

    async def _serve(self, call: _Call) -> None:
        engine_id = call.incoming.call
        try:
            async with asyncio.timeout(self.settings.max_call):
                await self._converse(call)
        except TimeoutError:
            log.warning("sip call too long: hung up", seconds=self.settings.max_call,
                        call_id=call_id(engine_id))
            await self._hang_up(engine_id)
        except asyncio.CancelledError:
            raise
        except Exception:  # the engine failed us mid-call: end the call, keep serving
            log.exception("sip call failed", call_id=call_id(engine_id))
            await self._hang_up(engine_id)
        finally:
            if self.calls.get(engine_id) is call:
                del self.calls[engine_id]

    async def _converse(self, call: _Call) -> None:
        settings, engine, incoming = self.settings, self.engine, call.incoming
        await engine.answer(incoming.call)
        raw = RawCall(code=None, did=number_of(incoming.called),
                      callerid=number_of(incoming.caller),
                      source="sip", can_play_tones=engine.plays_tones, can_ask_for_code=True,
                      call_id=call_id(incoming.call), attempts=settings.attempts)
        answer = await self._decide(raw)
        if not answer.wants_code:
            await self._finish(incoming.call, answer)
            return
        follow = RawCall(did=raw.did, callerid=raw.callerid, source="sip",
                         can_play_tones=raw.can_play_tones,
                         call_id=raw.call_id, attempts=settings.attempts)
        for attempt in range(1, settings.attempts + 1):
            await engine.play(incoming.call, "prompt" if attempt == 1 else "wrong")
            code = await self._read_digits(call)
            if not code:
                log.info("sip call: no digits", call_id=raw.call_id)
                await self._fallback(incoming.call)
                return
            answer = await self._decide(dataclasses.replace(follow, code=code))
            if answer.status is not Status.NAK or attempt == settings.attempts:
                break
        await self._finish(incoming.call, answer)

    async def _decide(self, raw: RawCall) -> Answer:
        try:
            return await self.gatekeeper.call(raw)
        except Exception:  # as the webhooks do: a failure is ERR, never a hung call
            log.exception("sip call: deciding failed", call_id=raw.call_id)
            return Answer(Status.ERR, "internal_error")

    async def _read_digits(self, call: _Call) -> str:
        """Digits until ``#``, a pause of ``input_timeout`` or ``max_digits``."""
        typed: list[str] = []
        while len(typed) < self.settings.max_digits:
            try:
                async with asyncio.timeout(self.settings.input_timeout):
                    digit = await call.digits.get()
            except TimeoutError:
                break
            if digit == "#":
                break
            typed.append(digit)
        return "".join(typed)

    async def _finish(self, call: str, answer: Answer) -> None:
        if answer.status is not Status.ACK:
            await self._fallback(call)
            return
        if answer.tones:
            await self.engine.send_tones(call, answer.tones)
        if answer.destination:
            await self._transfer(call, answer.destination)
        else:
            await self.engine.hang_up(call)

    async def _fallback(self, call: str) -> None:
        if self.settings.fallback:
            await self._transfer(call, self.settings.fallback)
        else:
            await self.engine.hang_up(call)

    async def _transfer(self, call: str, number: str) -> None:
        if number not in self.settings.transfers:
            # Not written in the config (a visitor code's, from the broker):
            # a transfer there would be a call the site pays for.
            log.warning("sip transfer refused: not a number in the config",
                        destination=printable(number)[:32], call_id=call_id(call))
            await self.engine.hang_up(call)
            return
        await self.engine.transfer(call, number)

    async def _hang_up(self, call: str) -> None:
        with contextlib.suppress(Exception):  # the call may be gone with the engine
            await self.engine.hang_up(call)


def settings_for(config: Config) -> SipSettings:
    """The call's settings from ``[sip]``; EngineError when the registrar has no address."""
    sip = config.sip
    assert sip is not None
    region = config.site.region
    fallback = ""
    if sip.fallback:
        with contextlib.suppress(NumberError):
            fallback = normalise(sip.fallback, region) or ""
    # What a call may be transferred to: the numbers written in the config, as written
    # (a credential answers its destination so) and normalised.
    written = [c.destination for c in config.codes] + [t.destination for t in config.totp]
    written += [r.destination for r in config.routes]
    transfers = {d for d in written if d} | ({fallback} if fallback else set())
    for number in list(transfers):
        with contextlib.suppress(NumberError):
            transfers.add(normalise(number, region) or number)
    allowed = list(sip.trunk_from)
    if sip.account is not None:
        # Register mode: INVITEs come through the registrar; anyone else who finds
        # the engine's port is refused like a caller outside a trunk.
        allowed += registrar_addresses(sip.account.split("@", 1)[1].split(";", 1)[0])
    return SipSettings(attempts=sip.attempts, input_timeout=float(sip.input_timeout),
                       fallback=fallback, transfers=frozenset(transfers),
                       trunk_from=SipSettings.networks(allowed), max_calls=1,
                       max_call=float(sip.max_call))


def registrar_addresses(domain: str) -> list[str]:
    host = domain.rsplit(":", 1)[0] if domain.count(":") == 1 else domain
    try:
        found = socket.getaddrinfo(host.strip("[]"), None, proto=socket.IPPROTO_UDP)
    except OSError as exc:
        raise EngineError(f"sip.account: cannot find the registrar {host}: {exc}") from None
    return sorted({str(info[4][0]) for info in found})
