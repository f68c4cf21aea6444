"""The TwiML webhook: Twilio and the platforms that run the same XML.

``POST {path}``: a call comes in (From, To, CallSid, ...). A caller whom no
credential admits without a code is asked for one with ``<Gather>``, and
nothing is recorded yet; anyone else is decided and answered at once.
``POST {path}/code?attempt=N``: the digits typed, decided like a VoIPGRID
call. The attempt rides in the action URL, which the signature covers.

Only an authenticated request is decided: with ``auth_token`` the
``X-Twilio-Signature`` (SignalWire: ``X-SignalWire-Signature``) is checked
with Twilio's own validator against ``public_url``, the URL as the platform
called it; without, ``?token=`` one of ``[server] tokens``. A bad or missing
one is 403 and one log line, and nothing is evaluated.

Answers are built with ElementTree, so every configured text is escaped; the
digits a caller typed are never in one. The twilio package (an optional
extra) is needed only to check signatures.
"""

from __future__ import annotations

import functools
import hashlib
import re
import urllib.parse
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import structlog
from aiohttp import web

from gated.book.config import TwimlConfig
from gated.core.decide import Status
from gated.core.numbers import normalise
from gated.pbx import GATEKEEPER
from gated.pbx.voipgrid import WEBHOOK, gone, read_form
from gated.site.gatekeeper import Answer, Gatekeeper, RawCall
from gated.site.sockets import waited

log = structlog.get_logger("gated.twiml")

SIGNATURE_HEADERS = ("X-Twilio-Signature", "X-SignalWire-Signature")
# Twilio spells a withheld caller id as a number: ANONYMOUS, RESTRICTED,
# BLOCKED, UNKNOWN and UNAVAILABLE typed on a keypad.
WITHHELD = frozenset({"+266696687", "+7378742833", "+2562533", "+8656696", "+86282452253"})
# Twilio's CallSid is CA + 32 hex; others use UUIDs or their own ids (a SIP
# Call-ID). Anything else is kept as a hash: as it is, it would end up in the
# store and the log, and without it the call could not be held to its attempts.
_CALL_ID = re.compile(r"[A-Za-z0-9:._-]{1,64}")
DECLARATION = '<?xml version="1.0" encoding="UTF-8"?>'


class Validator(Protocol):
    """twilio.request_validator.RequestValidator, as far as it is used here."""

    def validate(self, uri: str, params: Any, signature: str) -> bool: ...


@dataclass(frozen=True, slots=True)
class TwimlSettings:
    path: str
    public_url: str
    validator: Validator | None
    language: str
    voice: str
    prompt: str
    wrong: str
    welcome: str
    attempts: int
    input_timeout: int
    fallback: str
    account_sid: str | None

    @classmethod
    def build(cls, config: TwimlConfig, region: str) -> TwimlSettings:
        validator: Validator | None = None
        if config.auth_token is not None:
            # The config check has said to install the extra if it is missing.
            from twilio.request_validator import RequestValidator

            validator = RequestValidator(config.auth_token)
        fallback = (normalise(config.fallback, region) or "") if config.fallback else ""
        return cls(config.path.rstrip("/"), config.public_url, validator, config.language,
                   config.voice, config.prompt, config.wrong, config.welcome, config.attempts,
                   config.input_timeout, fallback, config.account_sid)

    def signed_url(self, request: web.Request, suffix: str) -> str:
        """The URL the platform signed: ``public_url``, whatever a proxy made of it."""
        query = request.rel_url.raw_query_string
        return f"{self.public_url}{suffix}" + (f"?{query}" if query else "")

    def signature_ok(self, request: web.Request, suffix: str, form: Mapping[str, str]) -> bool:
        assert self.validator is not None
        signature = next((request.headers[h] for h in SIGNATURE_HEADERS if h in request.headers),
                         "")
        return bool(signature) and self.validator.validate(
            self.signed_url(request, suffix), form, signature)


class LiveTwiml:
    """The TwiML settings in force; a reload replaces them between calls."""

    __slots__ = ("current",)

    def __init__(self, current: TwimlSettings) -> None:
        self.current = current


TWIML: web.AppKey[LiveTwiml] = web.AppKey("twiml")


# -- the answers -------------------------------------------------------------------------

# A site answers with a few distinct documents, each made of config only (the
# token is one that authenticated): built once each.
@functools.lru_cache(maxsize=1024)
def render(settings: TwimlSettings, answer: Answer, *, attempt: int, token: str | None) -> str:
    """The TwiML for ``answer`` to the request of ``attempt`` (0: the incoming call)."""
    root = ET.Element("Response")
    if answer.wants_code:
        _gather(root, settings, 1, token)
        _fallback(root, settings)
    elif answer.status is Status.ACK:
        _say(root, settings, answer.callername or settings.welcome)
        if answer.tones:
            ET.SubElement(root, "Play", digits=answer.tones)
        if answer.destination:
            ET.SubElement(root, "Dial").text = answer.destination
        else:
            ET.SubElement(root, "Hangup")
    elif answer.status is Status.NAK and attempt > 0:
        _say(root, settings, settings.wrong)
        if attempt < settings.attempts:
            _gather(root, settings, attempt + 1, token)
        _fallback(root, settings)
    else:  # ERR, or refused before any code (unknown number, locked caller)
        _fallback(root, settings)
    return DECLARATION + ET.tostring(root, encoding="unicode")


def no_input(settings: TwimlSettings) -> str:
    root = ET.Element("Response")
    _fallback(root, settings)
    return DECLARATION + ET.tostring(root, encoding="unicode")


def _say(parent: ET.Element, settings: TwimlSettings, text: str) -> None:
    say = ET.SubElement(parent, "Say", language=settings.language)
    if settings.voice:
        say.set("voice", settings.voice)
    say.text = text


def _gather(parent: ET.Element, settings: TwimlSettings, attempt: int, token: str | None) -> None:
    query = {"attempt": str(attempt)}
    if token is not None:
        query["token"] = token
    action = f"{settings.public_url}/code?{urllib.parse.urlencode(query)}"
    gather = ET.SubElement(parent, "Gather", input="dtmf", action=action, method="POST",
                           finishOnKey="#", timeout=str(settings.input_timeout))
    _say(gather, settings, settings.prompt)


def _fallback(parent: ET.Element, settings: TwimlSettings) -> None:
    if settings.fallback:
        ET.SubElement(parent, "Dial").text = settings.fallback
    else:
        ET.SubElement(parent, "Hangup")


# -- the handlers ------------------------------------------------------------------------

def _xml(body: str) -> web.Response:
    return web.Response(text=body, content_type="text/xml", charset="utf-8")


def _text(body: str, status: int) -> web.Response:
    return web.Response(text=body, status=status, content_type="text/plain")


def _caller(value: str | None) -> str | None:
    return None if value in WITHHELD else value


def _call_id(value: str | None) -> str:
    if not value or _CALL_ID.fullmatch(value):
        return value or ""
    return "~" + hashlib.blake2b(value.encode(), digest_size=16).hexdigest()


async def incoming(request: web.Request) -> web.Response:
    return await _handle(request, "")


async def digits(request: web.Request) -> web.Response:
    return await _handle(request, "/code")


async def _handle(request: web.Request, suffix: str) -> web.Response:
    settings = request.app[TWIML].current
    webhook = request.app[WEBHOOK].current
    client = webhook.client(request)
    form = await read_form(request)
    if isinstance(form, web.Response):
        if not gone(request):
            log.warning("bad request", remote=client, status=form.status)
        return form
    token: str | None = None
    if settings.validator is not None:
        if not settings.signature_ok(request, suffix, form):
            log.warning("refused", remote=client, why="bad or missing signature")
            return _text("forbidden\n", 403)
    else:
        token = request.query.get("token", "")
        if not webhook.token_ok(token):
            log.warning("refused", remote=client, why="bad or missing token")
            return _text("forbidden\n", 403)
    if settings.account_sid is not None and form.get("AccountSid") != settings.account_sid:
        # Signed, but for a call of another account that shares the token.
        log.warning("refused", remote=client, why="another account")
        return _text("forbidden\n", 403)
    attempt = 0
    code: str | None = None
    if suffix:
        try:
            attempt = min(int(request.query.get("attempt", "1")), settings.attempts)
        except ValueError:
            attempt = 0
        if attempt < 1:
            return _text("bad request: attempt\n", 400)
        code = form.get("Digits", "").strip()
        if not code.removesuffix("#"):
            # Nothing typed (the platform may still post): the no-input branch.
            return _xml(no_input(settings))
    gatekeeper: Gatekeeper = request.app[GATEKEEPER]
    # The deadline runs from when the request reached the machine, as for VoIPGRID.
    received = gatekeeper.clock.monotonic() - waited(request.transport)
    raw = RawCall(code=code, did=form.get("To"), callerid=_caller(form.get("From")),
                  callername=form.get("CallerName"), source="twiml", can_play_tones=True,
                  can_ask_for_code=not suffix, call_id=_call_id(form.get("CallSid")),
                  received=received, attempts=settings.attempts)
    try:
        answer = await gatekeeper.call(raw)  # bounded by the deadline, from ``received``
    except Exception:  # any failure answers as ERR does (the fallback), never a 5xx
        log.exception("call failed", remote=client)
        answer = Answer(Status.ERR, "internal_error")
    return _xml(render(settings, answer, attempt=attempt, token=token))
