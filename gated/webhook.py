"""The VoIPGRID webhook: GET (what the platform sends) or POST with a form body.

Only an authenticated request is decided: a wrong token, or a client outside
``allow_from``, gets 403 and one log line, and nothing is evaluated.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import structlog
from aiohttp import web
from multidict import MultiDict, MultiDictProxy

from gated.decide import Status
from gated.gatekeeper import Gatekeeper, RawCall
from gated.keys import GATEKEEPER, WEBHOOK
from gated.pbx import Answer

log = structlog.get_logger("gated.webhook")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# The gatekeeper bounds itself by the deadline; this net only catches a bug.
SAFETY_MARGIN = 0.5


@dataclass(frozen=True, slots=True)
class WebhookSettings:
    tokens: tuple[bytes, ...]
    allow_from: tuple[Network, ...]
    nak_word: str
    deadline: float

    @classmethod
    def build(cls, tokens: Sequence[str], allow_from: Sequence[str], nak_word: str,
              deadline: float) -> WebhookSettings:
        return cls(tuple(t.encode() for t in tokens),
                   tuple(ipaddress.ip_network(c, strict=False) for c in allow_from),
                   nak_word, deadline)

    def token_ok(self, given: str) -> bool:
        """Constant time in the token's content; every token is compared every time."""
        candidate = given.encode("utf-8", "surrogateescape")
        ok = False
        for token in self.tokens:
            ok |= hmac.compare_digest(candidate, token)
        return ok

    def client_ok(self, remote: str | None) -> bool:
        if not self.allow_from:
            return True
        try:
            address = ipaddress.ip_address(remote or "")
        except ValueError:
            return False
        return any(address in network for network in self.allow_from)


def _text(response: str, status: int = 200) -> web.Response:
    return web.Response(text=response, status=status, content_type="text/plain")


async def _params(request: web.Request) -> Mapping[str, str] | web.Response:
    params: MultiDict[str] = MultiDict(request.query)
    if request.method == "POST":
        try:
            form: MultiDictProxy[str | object] = await request.post()  # type: ignore[assignment]
        except UnicodeDecodeError:
            return _text("bad request: body is not UTF-8\n", 400)
        except ValueError:
            return _text("bad request: unreadable form body\n", 400)
        for key, value in form.items():
            if not isinstance(value, str):
                return _text("bad request: files are not accepted\n", 400)
            params.add(key, value)
    return params


async def voipgrid(request: web.Request) -> web.Response:
    settings = request.app[WEBHOOK]
    params = await _params(request)
    if isinstance(params, web.Response):
        log.warning("bad request", remote=request.remote, status=params.status)
        return params
    if not settings.client_ok(request.remote):
        log.warning("refused", remote=request.remote, why="not in allow_from")
        return _text("forbidden\n", 403)
    if not settings.token_ok(params.get("token", "")):
        log.warning("refused", remote=request.remote, why="bad or missing token")
        return _text("forbidden\n", 403)
    raw = RawCall(code=params.get("code"), did=params.get("did"),
                  callerid=params.get("callerid"), callername=params.get("callername"))
    gatekeeper: Gatekeeper = request.app[GATEKEEPER]
    try:
        async with asyncio.timeout(settings.deadline + SAFETY_MARGIN):
            answer = await gatekeeper.call(raw)
    except Exception:  # any failure answers ERR, never a 5xx or a hung call
        log.exception("call failed", remote=request.remote)
        answer = Answer(Status.ERR, "internal_error")
    return _text(answer.body(settings.nak_word))
