"""The VoIPGRID webhook: GET (what the platform sends) or POST with a form body.

Only an authenticated request is decided: a wrong token, or a forwarded client
outside ``allow_from``, gets 403 and one log line, and nothing is evaluated (a
direct client outside it is closed at accept, by ``LiveSettings.admits``).

The answer: ``status=ACK&callername=...&destination=...``, built with
urllib.parse.urlencode, byte for byte what VoIPGRID integrations expect, and
parsed back the same way by ``gated call``.
"""

from __future__ import annotations

import functools
import hmac
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import structlog
from aiohttp import web
from multidict import MultiDict, MultiDictProxy

from gated.book.config import ServerConfig
from gated.core.decide import Status
from gated.pbx import GATEKEEPER
from gated.site import forwarded
from gated.site.gatekeeper import Answer, Gatekeeper, RawCall
from gated.site.sockets import waited

log = structlog.get_logger("gated.webhook")

WHAT_THE_DIAL_PLAN_DOES = {
    "ACK": "access granted: the dial plan takes its 'success' branch",
    "NAK": "wrong input: in IVR mode the PBX plays its wrong-input message and asks again",
    "ERR": "gated could not do it: the dial plan takes its failure branch (usually a person)",
}

@dataclass(frozen=True, slots=True)
class WebhookSettings:
    tokens: tuple[bytes, ...]
    allow_from: tuple[forwarded.Network, ...]
    nak_word: str
    deadline: float
    trusted_proxies: tuple[forwarded.Network, ...] = ()

    @classmethod
    def build(cls, tokens: Sequence[str], allow_from: Sequence[str], nak_word: str,
              deadline: float, trusted_proxies: Sequence[str] = ()) -> WebhookSettings:
        return cls(tuple(t.encode() for t in tokens), forwarded.networks(allow_from), nak_word,
                   deadline, forwarded.networks(trusted_proxies))

    def client(self, request: web.Request) -> str | None:
        """The caller's address: X-Forwarded-For only when it came from a trusted proxy
        (``gated.site.forwarded``)."""
        return forwarded.client(request.remote, request.headers.getall("X-Forwarded-For", []),
                                self.trusted_proxies)

    def token_ok(self, given: str) -> bool:
        """Constant time in the token's content; every token is compared every time."""
        candidate = given.encode("utf-8", "surrogateescape")
        ok = False
        for token in self.tokens:
            ok |= hmac.compare_digest(candidate, token)
        return ok

    def client_ok(self, remote: str | None) -> bool:
        return not self.allow_from or forwarded.within(remote, self.allow_from)

    def proxy(self, address: str) -> bool:
        return bool(self.trusted_proxies) and forwarded.within(address, self.trusted_proxies)


def body(answer: Answer, nak_word: str = "NAK") -> str:
    return _body(answer.status, answer.callername, answer.destination, nak_word)


# A site answers with a few distinct bodies (a word, and each credential's
# callername and destination from config, never anything a caller typed);
# urlencode was ~4% of the event loop's time under load.
@functools.lru_cache(maxsize=1024)
def _body(status: Status, callername: str, destination: str, nak_word: str) -> str:
    word = nak_word if status is Status.NAK else status.value
    fields = [("status", word)]
    if status is Status.ACK:
        if callername:
            fields.append(("callername", callername))
        if destination:
            fields.append(("destination", destination))
    return urllib.parse.urlencode(fields)


def parse_body(text: str) -> dict[str, str]:
    return dict(urllib.parse.parse_qsl(text, keep_blank_values=True))


class LiveSettings:
    """The settings in force. A call reads them once; a reload replaces them between calls.

    Also the listener's ``Admission``: who is heard at accept, before a byte is read.
    """

    __slots__ = ("current", "shared")

    def __init__(self, current: WebhookSettings, *, shared: bool = False) -> None:
        self.current = current
        # Other paths on the listener (TwiML) answer clients allow_from does not name.
        self.shared = shared

    def admits(self, address: str) -> bool:
        """A trusted proxy is heard (its client is named in its header); anyone else
        must be in allow_from."""
        current = self.current
        return self.shared or current.client_ok(address) or current.proxy(address)

    def vouched(self, address: str) -> bool:
        """A trusted proxy speaks for many clients, and an address allow_from names is
        the PBX's own: neither is counted for max_per_address."""
        current = self.current
        return current.proxy(address) or (bool(current.allow_from)
                                           and current.client_ok(address))


# The webhook's settings now (tokens and allow_from change on reload).
WEBHOOK: web.AppKey[LiveSettings] = web.AppKey("webhook")


def _text(response: str, status: int = 200) -> web.Response:
    return web.Response(text=response, status=status, content_type="text/plain")


async def read_form(request: web.Request) -> MultiDict[str] | web.Response:
    """A POST's form fields, or the 400 that says why there are none to read."""
    try:
        form: MultiDictProxy[str | object] = await request.post()  # type: ignore[assignment]
    except ConnectionError:  # closed while its body trickled in: past the deadline
        return _text("request timeout\n", 408)
    except UnicodeDecodeError:
        return _text("bad request: body is not UTF-8\n", 400)
    except ValueError:
        return _text("bad request: unreadable form body\n", 400)
    fields: MultiDict[str] = MultiDict()
    for key, value in form.items():
        if not isinstance(value, str):
            return _text("bad request: files are not accepted\n", 400)
        fields.add(key, value)
    return fields


def gone(request: web.Request) -> bool:
    """Whether the request's connection is closed: one gated.sockets closed as too
    slow (and counted in its own log line) is not logged again."""
    transport = request.transport
    return transport is None or transport.is_closing()


async def _params(request: web.Request) -> Mapping[str, str] | web.Response:
    params: MultiDict[str] = MultiDict(request.query)
    if request.method == "POST":
        form = await read_form(request)
        if isinstance(form, web.Response):
            return form
        params.extend(form)
    return params


async def voipgrid(request: web.Request) -> web.Response:
    settings = request.app[WEBHOOK].current
    client = settings.client(request)
    if not settings.client_ok(client):
        log.warning("refused", remote=client, why="not in allow_from")
        return _text("forbidden\n", 403)
    params = await _params(request)
    if isinstance(params, web.Response):
        if not gone(request):
            log.warning("bad request", remote=client, status=params.status)
        return params
    if not settings.token_ok(params.get("token", "")):
        log.warning("refused", remote=client, why="bad or missing token")
        return _text("forbidden\n", 403)
    gatekeeper: Gatekeeper = request.app[GATEKEEPER]
    # The deadline runs from when the request reached the machine, however
    # long it then waited to be accepted.
    received = gatekeeper.clock.monotonic() - waited(request.transport)
    raw = RawCall(code=params.get("code"), did=params.get("did"),
                  callerid=params.get("callerid"), callername=params.get("callername"),
                  received=received)
    try:
        answer = await gatekeeper.call(raw)  # bounded by the deadline, from ``received``
    except Exception:  # any failure answers ERR, never a 5xx or a hung call
        log.exception("call failed", remote=client)
        answer = Answer(Status.ERR, "internal_error")
    return _text(body(answer, settings.nak_word))


def webhook_settings(server: ServerConfig) -> WebhookSettings:
    """The webhook's settings as ``[server]`` gives them."""
    return WebhookSettings.build(server.tokens, server.allow_from, server.nak_word,
                                 server.answer_deadline, server.trusted_proxies)
