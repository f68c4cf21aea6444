"""The staff page's aiohttp app: the guard in front of every page, and the pages.

The contract (URLs and form fields) is DESIGN §16. Every state change is a
POST carrying the session's CSRF token from the page's own origin; a page
without a session goes to /login; a role too low for a page is 403.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import datetime as dt
import functools
import hmac
import io
import json
import secrets
import sqlite3
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote, urlsplit

import aiohttp_jinja2
import jinja2
import segno
import structlog
from aiohttp import web
from aiohttp_sse import sse_response
from markupsafe import Markup

from gated.book import files, sitekey
from gated.book.config import Config
from gated.book.messages import VISITOR_PREFIX, ManagedCode, Rejected
from gated.book.messages import parse as parse_code
from gated.core.clock import Clock
from gated.core.errors import BrokerError
from gated.site import events, forwarded, visitors
from gated.site.gatekeeper import Gatekeeper, RawCall
from gated.site.store import (
    ENTRY_COLUMNS,
    VISITOR_COLUMNS,
    Entry,
    VisitorRow,
    add_visitor,
    connect,
    query_entries,
)
from gated.web import texts as texts_mod
from gated.web import users as users_mod
from gated.web.backoff import Backoff
from gated.web.sessions import Session, Sessions
from gated.web.texts import Texts
from gated.web.users import ROLES, Role, User, UserError, UserFile

log = structlog.get_logger("gated.web")

HERE = Path(__file__).resolve().parent
COOKIE = "gated_session"
LOGIN_COOKIE = "gated_login"
PAGE_SIZE = 50
CSV_BATCH = 5000
MAX_FORM = 16 * 1024
SMS_LIMIT = 160
LIVE_QUEUE = 256
END = ""  # in a live log's queue: its reader fell behind and ends
STATUSES = ("ACK", "NAK", "ERR", "ALARM")
# Each argon2id check (a login, a new password) holds 64 MiB: two at once at most,
# a bounded queue behind them, and past it the backoff's 429.
PASSWORD_CHECKS = 2
PASSWORD_QUEUE = 16
PASSWORD_WAIT = 30.0
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cache-Control": "no-store",
}


class PasswordChecks:
    """At most ``limit`` argon2id checks at once; a bounded queue waits for them."""

    def __init__(self, limit: int = PASSWORD_CHECKS, queue: int = PASSWORD_QUEUE,
                 wait: float = PASSWORD_WAIT) -> None:
        self._slots = asyncio.Semaphore(limit)
        self.queue = queue
        self.wait = wait
        self.running = 0
        self.waiting = 0

    async def run(self, check: Callable[..., bool], *args: Any) -> bool | None:
        """The check's answer, run in a thread; None when too many wait already."""
        if self.waiting >= self.queue:
            return None
        self.waiting += 1
        try:
            async with asyncio.timeout(self.wait):
                await self._slots.acquire()
        except TimeoutError:
            return None
        finally:
            self.waiting -= 1
        self.running += 1
        try:
            return await asyncio.to_thread(check, *args)
        finally:
            self.running -= 1
            self._slots.release()


class BrokerCodes(Protocol):
    """The site's broker, for its visitor codes (``gated.mqtt.bridge.Bridge``, with
    ``[mqtt]``): a code issued here goes there, as ``gated codes issue`` sends it."""

    @property
    def connected(self) -> bool:
        """Connected now: a code sent would reach the broker."""
        ...

    def visitor_codes(self) -> list[ManagedCode]:
        """The site's visitor codes from the broker (ids ``v-…``) in force here."""
        ...

    async def put_code(self, code_id: str, body: bytes, *, within: float) -> str | None:
        """Publish a site code retained (empty: delete it) and wait for this site to apply
        it: None, or why it was refused; BrokerError, or TimeoutError once published."""
        ...


@dataclass
class StaffPage:
    """What the pages need, handed in by the daemon (the one assembly point)."""

    gatekeeper: Gatekeeper
    config: Callable[[], Config]
    state_dir: Path
    store_path: Path
    clock: Clock
    tls: bool = False
    sensors: Callable[[], dict[str, bool]] = dict
    # With [mqtt]: visitor codes are issued, extended and revoked there, never locally.
    broker: BrokerCodes | None = None
    users: UserFile = field(init=False)
    sessions: Sessions = field(init=False)
    backoff: Backoff = field(default_factory=Backoff)
    live: set[asyncio.Queue[str]] = field(default_factory=set)
    texts: Texts = field(default_factory=texts_mod.language)
    checks: PasswordChecks = field(default_factory=PasswordChecks)

    def __post_init__(self) -> None:
        self.users = UserFile(users_mod.users_path(self.state_dir))
        self.sessions = Sessions(self.state_dir / "web-sessions.db")

    def entry(self, entry: Entry) -> None:
        """An entry listener: each entry to every live log, as docs/mqtt.md's event."""
        if not self.live:
            return
        config = self.config()
        data = json.dumps(events.event(entry, site=config.site.id, tz=config.tz))
        for queue in list(self.live):
            try:
                queue.put_nowait(data)
            except asyncio.QueueFull:
                # A reader that fell this far behind ends; its browser reconnects.
                self.live.discard(queue)
                while not queue.empty():
                    queue.get_nowait()
                queue.put_nowait(END)


def _hours(page: StaffPage) -> float:
    web_config = page.config().web
    return web_config.session_hours if web_config is not None else 12.0


PAGE: web.AppKey[StaffPage] = web.AppKey("staff_page")


@dataclass(frozen=True, slots=True)
class Visit:
    """Who is asking: the user and their session."""

    user: User
    session: Session


SESSION: web.RequestKey[Visit] = web.RequestKey("session", Visit)


def _page(request: web.Request) -> StaffPage:
    return request.app[PAGE]


def _same_origin(request: web.Request) -> bool:
    """The request came from one of this site's own pages (Django's check, both headers)."""
    fetch_site = request.headers.get("Sec-Fetch-Site")
    if fetch_site is not None and fetch_site != "same-origin":
        return False
    origin = request.headers.get("Origin")
    if origin is not None:
        parts = urlsplit(origin)
        if origin == "null" or parts.netloc.lower() != request.host.lower():
            return False
    referer = request.headers.get("Referer")
    if origin is None and referer is not None:
        return urlsplit(referer).netloc.lower() == request.host.lower()
    return True


# A proxy on this machine is believed without being named in the config.
LOOPBACK = ("127.0.0.1/32", "::1/128")


@functools.lru_cache(maxsize=8)
def _proxies(configured: tuple[str, ...]) -> tuple[forwarded.Network, ...]:
    return forwarded.networks((*LOOPBACK, *configured))


def _trusted(request: web.Request) -> tuple[forwarded.Network, ...]:
    """Whose X-Forwarded-* headers are believed: this machine's, and [server]
    trusted_proxies (the webhook's TLS proxies, on this machine or another)."""
    return _proxies(tuple(_page(request).config().server.trusted_proxies))


def _secure(request: web.Request) -> bool:
    page = _page(request)
    if page.tls or request.secure:
        return True
    # The TLS proxy of docs/tls.md says so; from anyone else, the header is the client's.
    return forwarded.within(request.remote, _trusted(request)) and (
        request.headers.get("X-Forwarded-Proto") == "https")


def _address(request: web.Request) -> str:
    """Who is asking: behind a trusted proxy, the client it names.

    Else every login through the proxy would share one address, and one guesser's
    backoff would hold every member of staff out. The chain is walked from the
    right past the trusted proxies' own hops: anything left of those was written
    by the client.
    """
    client = forwarded.client(request.remote, request.headers.getall("X-Forwarded-For", []),
                              _trusted(request))
    return (client or request.remote or "?")[:64]


def _visit(request: web.Request) -> Visit | None:
    page = _page(request)
    token = request.cookies.get(COOKIE)
    if not token:
        return None
    session = page.sessions.find(token, page.clock.now())
    if session is None:
        return None
    user = page.users.get(session.user)
    # A new password (or role) stamps the user anew: older sessions end.
    if user is None or user.changed != session.stamp:
        return None
    return Visit(user, session)


def _see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


def _t(request: web.Request) -> Texts:
    return _page(request).texts


def _forbidden(text: str) -> web.HTTPForbidden:
    return web.HTTPForbidden(text=text, content_type="text/plain")


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PUBLIC = frozenset({"/login"})


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response = await _guarded(request, handler)
    except web.HTTPException as exc:
        exc.headers.update(HEADERS)
        raise
    response.headers.update(HEADERS)
    return response


async def _guarded(request: web.Request, handler: Handler) -> web.StreamResponse:
    public = request.path in PUBLIC or request.path.startswith("/static/")
    if request.method not in ("GET", "HEAD", "POST"):
        raise web.HTTPMethodNotAllowed(request.method, ["GET", "POST"])
    if request.method == "POST" and not _same_origin(request):
        log.warning("staff page: a POST from another origin refused", path=request.path,
                    origin=request.headers.get("Origin", ""), address=request.remote)
        raise _forbidden(_t(request)("refused.origin"))
    if public:
        return await handler(request)
    visit = _visit(request)
    if visit is None:
        if request.method == "POST" or request.path in ("/events", "/log.csv"):
            raise _forbidden(_t(request)("refused.login_first"))
        raise web.HTTPSeeOther("/login")
    if (request.path == "/users" or request.path.startswith("/users/")) and (
            not visit.user.may("admin")):
        # Every /users URL, routed or not: nothing there tells a non-admin anything.
        log.warning("staff page: refused by role", path=request.path, user=visit.user.name,
                    role=visit.user.role, needs="admin")
        raise _forbidden(_t(request)("refused.role", role="admin"))
    if request.method == "POST":
        form = await request.post()
        given = form.get("csrf")
        if not isinstance(given, str) or not hmac.compare_digest(
                given.encode(), visit.session.csrf.encode()):
            log.warning("staff page: a POST without its token refused", path=request.path,
                        user=visit.user.name)
            raise _forbidden(_t(request)("refused.token"))
    request[SESSION] = visit
    return await handler(request)


def _needs(request: web.Request, role: Role) -> Visit:
    visit: Visit = request[SESSION]
    if not visit.user.may(role):
        log.warning("staff page: refused by role", path=request.path, user=visit.user.name,
                    role=visit.user.role, needs=role)
        raise _forbidden(_t(request)("refused.role", role=role))
    return visit


def _render(request: web.Request, template: str, context: dict[str, Any],
            status: int = 200) -> web.Response:
    page = _page(request)
    visit: Visit | None = request.get(SESSION)
    config = page.config()
    base = {"visit": visit, "csrf": visit.session.csrf if visit else "", "site": config.site.id,
            "t": page.texts,
            "may_open": bool(visit and visit.user.may("staff")),
            "may_issue": bool(visit and visit.user.may("staff")),
            "may_admin": bool(visit and visit.user.may("admin"))}
    return aiohttp_jinja2.render_template(template, request, {**base, **context},
                                          status=status)


def _local(page: StaffPage, ts: float | None) -> str:
    if ts is None:
        return ""
    return dt.datetime.fromtimestamp(ts, page.config().tz).strftime("%Y-%m-%d %H:%M:%S")


# -- login ------------------------------------------------------------------------------

async def login_form(request: web.Request) -> web.Response:
    return _login_page(request, "")


def _login_page(request: web.Request, error: str, status: int = 200) -> web.Response:
    page = _page(request)
    # One token per browser until it logs in: another tab, or the favicon's redirect
    # here, must not make the form already shown stale.
    token = request.cookies.get(LOGIN_COOKIE, "")
    if not 20 <= len(token) <= 64 or not token.replace("-", "").replace("_", "").isalnum():
        token = secrets.token_urlsafe(24)
    response = _render(request, "login.html", {
        "login_csrf": token, "error": error, "no_users": not page.users.current(),
        "first_user": "sudo -u gated gated users add NAME --role admin"},
        status=status)
    response.set_cookie(LOGIN_COOKIE, token, httponly=True, samesite="Strict", path="/login",
                        secure=_secure(request))
    return response


async def login(request: web.Request) -> web.StreamResponse:
    page = _page(request)
    form = await request.post()
    given, expected = form.get("csrf"), request.cookies.get(LOGIN_COOKIE, "")
    if not isinstance(given, str) or not expected or not hmac.compare_digest(
            given.encode(), expected.encode()):
        raise _forbidden(_t(request)("refused.token"))
    name = str(form.get("username", ""))[:64].strip().lower()
    password = str(form.get("password", ""))
    address = _address(request)
    keys = [f"user:{name}", f"address:{address}"]
    now = page.clock.now()
    wait = page.backoff.wait(keys, now)
    if wait > 0:
        log.warning("staff page: login refused, backing off", address=address,
                    seconds=round(wait, 1))
        response = _login_page(request, page.texts("login.backoff", seconds=max(
            1, round(wait))), status=429)
        response.headers["Retry-After"] = str(max(1, round(wait)))
        return response
    user = page.users.get(name)
    ok = await page.checks.run(users_mod.verify, user, password)
    if ok is None:
        log.warning("staff page: login refused, too many at once", address=address)
        response = _login_page(request, page.texts("login.busy"), status=429)
        response.headers["Retry-After"] = "1"
        return response
    if not ok or user is None:
        page.backoff.failed(keys, page.clock.now())
        # Never the name typed: it may be a password typed in the wrong box.
        log.warning("staff page: login failed", address=address)
        return _login_page(request, page.texts("login.wrong"), status=401)
    page.backoff.succeeded(keys)
    token, _ = page.sessions.start(user.name, user.changed, page.clock.now(),
                                   _hours(page))
    log.info("staff page: logged in", user=user.name, role=user.role, address=address)
    response = _see_other("/")
    response.set_cookie(COOKIE, token, httponly=True, samesite="Strict", path="/",
                        secure=_secure(request),
                        max_age=int(_hours(page) * 3600))
    response.del_cookie(LOGIN_COOKIE, path="/login")
    return response


async def logout(request: web.Request) -> web.StreamResponse:
    page = _page(request)
    visit: Visit = request[SESSION]
    page.sessions.end(request.cookies.get(COOKIE, ""))
    log.info("staff page: logged out", user=visit.user.name)
    response = _see_other("/login")
    response.del_cookie(COOKIE, path="/")
    return response


# -- reading the log ---------------------------------------------------------------------

def _query(path: Path, *, gate: str | None, status: str | None, before: int | None,
           limit: int, since: float | None = None) -> list[tuple[int, Entry]]:
    conn = connect(path, readonly=True)
    try:
        return query_entries(conn, gate=gate or None, status=status or None, before=before,
                             limit=limit, since=since)
    finally:
        conn.close()


def _filters(request: web.Request) -> tuple[str | None, str | None, int | None]:
    page = _page(request)
    gate = request.query.get("gate") or None
    if gate is not None and gate not in page.config().gates:
        gate = None
    status = request.query.get("status") or None
    if status is not None and status not in STATUSES:
        status = None
    before_text = request.query.get("before", "")
    before = int(before_text) if before_text.isdigit() and len(before_text) < 19 else None
    return gate, status, before


async def _entries(page: StaffPage, **kwargs: Any) -> list[tuple[int, Entry]]:
    try:
        return await asyncio.to_thread(_query, page.store_path, **kwargs)
    except sqlite3.Error as exc:
        log.error("staff page: cannot read the entry store", error=str(exc))
        raise web.HTTPServiceUnavailable(text=page.texts("refused.store")) from exc


def _rows(page: StaffPage, found: list[tuple[int, Entry]]) -> list[dict[str, Any]]:
    return [{"id": id_, "time": _local(page, e.time), "gate": e.gate or "", "status": e.status,
             "reason": e.reason, "who": e.credential, "caller": e.caller or "",
             "source": e.source} for id_, e in found]


async def index(request: web.Request) -> web.Response:
    page = _page(request)
    config = page.config()
    states = page.sensors()
    gates = [{"name": name, "state": ("open" if states[name] else "closed")
              if name in states else "no sensor",
              "state_key": ("open" if states[name] else "closed") if name in states else "none"}
             for name in config.gates]
    latest = await _entries(page, gate=None, status=None, before=None, limit=10)
    alarms = await _entries(page, gate=None, status="ALARM", before=None, limit=5,
                            since=page.clock.now() - 86400)
    return _render(request, "index.html", {
        "gates": gates, "entries": _rows(page, latest), "alarms": _rows(page, alarms)})


async def log_page(request: web.Request) -> web.Response:
    page = _page(request)
    gate, status, before = _filters(request)
    found = await _entries(page, gate=gate, status=status, before=before, limit=PAGE_SIZE + 1)
    more = len(found) > PAGE_SIZE
    found = found[:PAGE_SIZE]
    older = None
    if more:
        older = "/log?" + "&".join(f"{k}={quote(v)}" for k, v in (
            ("gate", gate or ""), ("status", status or ""), ("before", str(found[-1][0]))) if v)
    return _render(request, "log.html", {
        "entries": _rows(page, found), "gates": list(page.config().gates), "gate": gate or "",
        "status": status or "", "older": older, "statuses": STATUSES,
        "csv": "/log.csv?" + "&".join(f"{k}={quote(v)}" for k, v in (
            ("gate", gate or ""), ("status", status or "")) if v)})


def _cell(value: Any) -> str:
    """A spreadsheet never runs a cell: formula starters are quoted (numbers stay)."""
    text = "" if value is None else str(value)
    if text[:1] in ("=", "@", "\t", "\r") or (
            text[:1] in ("+", "-") and not text[1:2].isdigit()):
        return "'" + text
    return text


async def log_csv(request: web.Request) -> web.StreamResponse:
    page = _page(request)
    gate, status, _ = _filters(request)
    response = web.StreamResponse(headers={
        "Content-Type": "text/csv; charset=utf-8",
        "Content-Disposition": 'attachment; filename="entries.csv"', **HEADERS})
    await response.prepare(request)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["time", *ENTRY_COLUMNS[1:]])
    before: int | None = None
    while True:
        found = await _entries(page, gate=gate, status=status, before=before, limit=CSV_BATCH)
        for _, entry in found:
            writer.writerow([_local(page, entry.time),
                             *(_cell(getattr(entry, c)) for c in ENTRY_COLUMNS[1:])])
        await response.write(buffer.getvalue().encode())
        buffer.seek(0)
        buffer.truncate()
        if len(found) < CSV_BATCH:
            break
        before = found[-1][0]
    await response.write_eof()
    return response


async def live(request: web.Request) -> web.StreamResponse:
    page = _page(request)
    queue: asyncio.Queue[str] = asyncio.Queue(LIVE_QUEUE)
    page.live.add(queue)
    try:
        async with sse_response(request, headers=HEADERS) as stream:
            while stream.is_connected():
                data = await queue.get()
                # A stream outlives no logout, new password or expiry.
                if data == END or _visit(request) is None:
                    break
                await stream.send(data, event="entry")
    finally:
        page.live.discard(queue)
    return stream


# -- opening -----------------------------------------------------------------------------

def _gate(request: web.Request) -> str:
    gate = request.match_info["gate"]
    if gate not in _page(request).config().gates:
        raise web.HTTPNotFound(text=_t(request)("refused.no_gate"))
    return gate


async def open_confirm(request: web.Request) -> web.Response:
    _needs(request, "staff")
    return _render(request, "open.html", {"gate": _gate(request), "result": None})


async def open_gate(request: web.Request) -> web.Response:
    visit = _needs(request, "staff")
    gate = _gate(request)
    page = _page(request)
    answer = await page.gatekeeper.call(RawCall(
        gate=gate, source="web", sent=page.clock.now(), user=visit.user.name))
    log.info("staff page: open", user=visit.user.name, gate=gate, status=answer.status.value,
             reason=answer.reason)
    return _render(request, "open.html", {
        "gate": gate, "result": answer.status.value, "reason": answer.reason},
        status=200 if answer.status.value == "ACK" else 502)


# -- visitor codes -----------------------------------------------------------------------

# How long a code sent to the broker may take to come back applied (as `gated codes
# put` waits for its verdict).
BROKER_WAIT = 5.0


def _visitor_rows(page: StaffPage) -> list[dict[str, Any]]:
    now = page.clock.now()
    credentials = [(c.id.removeprefix("visitor:"), c)
                   for c in page.gatekeeper.book.visitors.values()]
    if page.broker is not None:
        # Issued on the broker (here, or by `gated codes issue`): listed by their id there.
        credentials += [(code.id, code.credential) for code in page.broker.visitor_codes()]
    rows = []
    for visitor_id, credential in credentials:
        if credential.valid_until is not None and credential.valid_until < now:
            continue
        rows.append({"id": visitor_id, "name": credential.name,
                     "gates": ", ".join(sorted(credential.gates)),
                     "until": _local(page, credential.valid_until),
                     "uses": credential.max_uses or ""})
    return sorted(rows, key=lambda r: r["until"])


def _broker_down(page: StaffPage) -> bool:
    return page.broker is not None and not page.broker.connected


def _visitors_page(request: web.Request, error: str = "", status: int = 200) -> web.Response:
    page = _page(request)
    return _render(request, "visitors.html", {
        "visitors": _visitor_rows(page), "gates": list(page.config().gates), "error": error,
        "broker_down": _broker_down(page)}, status=status)


async def visitors_page(request: web.Request) -> web.Response:
    _needs(request, "staff")
    return _visitors_page(request)


def _number(text: str, low: float, high: float) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if low <= value <= high else None


def sms_text(t: Texts, site: str, number: str, code: str, until: str) -> str:
    """The text staff send the visitor: within one SMS (160 GSM-7 characters)."""
    text = t("issued.sms", site=site, number=number, code=code, until=until)
    if len(text) > SMS_LIMIT:
        text = t("issued.sms_short", number=number, code=code, until=until)
    return text[:SMS_LIMIT]


async def issue(request: web.Request) -> web.Response:
    visit = _needs(request, "staff")
    page = _page(request)
    config = page.config()
    form = await request.post()
    name = str(form.get("name", "")).strip()
    gates = [g for g in form.getall("gates", []) if isinstance(g, str)]
    hours = _number(str(form.get("hours", "")), 0.25, 24 * 31)
    uses_text = str(form.get("uses", "")).strip()
    uses = _number(uses_text, 1, 10_000) if uses_text else None
    problem = ""
    if not name or len(name) > 64 or not name.isprintable():
        problem = page.texts("visitors.bad_name")
    elif hours is None:
        problem = page.texts("visitors.bad_hours")
    elif uses_text and (uses is None or uses != int(uses)):
        problem = page.texts("visitors.bad_uses")
    elif not gates or any(g not in config.gates for g in gates):
        problem = page.texts("visitors.bad_gates")
    if problem:
        return _visitors_page(request, problem, status=400)
    assert hours is not None
    if page.broker is not None:
        return await _issue_on_broker(request, page.broker, visit, name=name, gates=gates,
                                      hours=hours, uses=int(uses) if uses is not None else None)
    now = page.clock.now()
    book = page.gatekeeper.book
    try:
        issued = visitors.make(book, name=name, gates=gates, valid_from=None,
                               valid_until=now + hours * 3600,
                               max_uses=int(uses) if uses is not None else None,
                               length=config.visitors.length, now=now)
        if not await page.gatekeeper.store.call(add_visitor, issued.row):
            raise visitors.VisitorError(page.texts("visitors.taken"))
    except (visitors.VisitorError, sqlite3.Error) as exc:
        return _visitors_page(request, page.texts("visitors.not_issued", problem=exc),
                              status=409)
    book.visitors = {**book.visitors, issued.row.digest: visitors.credential(issued.row)}
    log.info("staff page: visitor code issued", user=visit.user.name, visitor=name,
             id=issued.row.id, gates=gates, hours=hours, uses=uses)
    return _issued_page(request, name=name, gates=gates, code=issued.code,
                        until=issued.row.valid_until)


async def _issue_on_broker(request: web.Request, broker: BrokerCodes, visit: Visit, *,
                           name: str, gates: list[str], hours: float,
                           uses: int | None) -> web.Response:
    """With [mqtt], a visitor code goes to the broker as `gated codes issue` sends it: a
    retained keyed hash under codes/v-…, which every gated of the site and Home Assistant
    see, applied here when it comes back. Never a local code in its place."""
    page = _page(request)
    config = page.config()
    book = page.gatekeeper.book
    if not broker.connected:
        log.warning("staff page: no visitor code issued, the broker is not connected",
                    user=visit.user.name)
        return _visitors_page(request, page.texts("visitors.no_broker"), status=503)
    now = page.clock.now()
    until = float(int(now + hours * 3600))  # whole seconds, as the message says it
    try:
        if not book.site_key:
            # The digits would travel in clear (`gated codes put` refuses too).
            raise visitors.VisitorError(page.texts("visitors.no_site_key"))
        # Digits no other credential of this site holds (a clash would be refused).
        issued = visitors.make(book, name=name, gates=gates, valid_from=None,
                               valid_until=until, max_uses=uses,
                               length=config.visitors.length, now=now)
        code_id = VISITOR_PREFIX + issued.row.id
        fields: dict[str, Any] = {
            "name": name, "code_hash": sitekey.code_hash(book.key, issued.code),
            "gates": gates,
            "valid_until": dt.datetime.fromtimestamp(until, config.tz).isoformat()}
        if uses is not None:
            fields["max_uses"] = uses
        body = json.dumps(fields, ensure_ascii=False).encode()
        try:
            parse_code("site", code_id, body, config)  # checked here first, as staff's are
        except Rejected as exc:
            raise visitors.VisitorError(str(exc)) from None
    except visitors.VisitorError as exc:
        return _visitors_page(request, page.texts("visitors.not_issued", problem=exc),
                              status=409)
    try:
        refused = await broker.put_code(code_id, body, within=BROKER_WAIT)
    except BrokerError as exc:
        log.warning("staff page: no visitor code issued, the broker did not take it",
                    user=visit.user.name, error=str(exc))
        return _visitors_page(request, page.texts("visitors.no_broker"), status=503)
    except TimeoutError:
        # On the broker, retained: the site applies it when it comes back. Its digits
        # are shown now or never.
        log.warning("staff page: visitor code on the broker, not yet applied here",
                    user=visit.user.name, id=code_id)
        return _issued_page(request, name=name, gates=gates, code=issued.code, until=until,
                            note=page.texts("issued.unconfirmed"))
    if refused is not None:
        return _visitors_page(request, page.texts("visitors.not_issued", problem=refused),
                              status=409)
    log.info("staff page: visitor code issued on the broker", user=visit.user.name,
             visitor=name, id=code_id, gates=gates, hours=hours, uses=uses)
    return _issued_page(request, name=name, gates=gates, code=issued.code, until=until)


def _issued_page(request: web.Request, *, name: str, gates: list[str], code: str,
                 until: float | None, note: str = "") -> web.Response:
    """The new code, shown this once: an SMS text, a tel: link and its QR."""
    page = _page(request)
    config = page.config()
    numbers = config.gates[gates[0]].numbers
    shown = _local(page, until)[:16]
    number = numbers[0] if numbers else ""
    tel = f"tel:{number},,{code}%23" if number else ""
    qr = ""
    if tel:
        # segno's own SVG of a URI of digits: nothing in it came from a form as markup.
        svg = segno.make(tel, error="m").svg_inline(scale=4, border=2, omitsize=True)
        qr = Markup(svg)  # noqa: S704
    return _render(request, "issued.html", {
        "name": name, "code": code, "until": shown, "gates": ", ".join(gates),
        "sms": sms_text(page.texts, config.site.id, number or page.texts("issued.no_number"),
                        code, shown),
        "tel": tel, "qr": qr, "note": note})


def _on_broker(page: StaffPage, visitor_id: str) -> BrokerCodes | None:
    """The broker, when ``visitor_id`` names one of its codes (``v-…``)."""
    if page.broker is None or not visitor_id.startswith(VISITOR_PREFIX):
        return None
    return page.broker


async def _change_on_broker(request: web.Request, broker: BrokerCodes, visitor_id: str,
                            body: Callable[[ManagedCode], bytes]) -> None:
    """Publish ``body(code)`` for a visitor code on the broker (empty: revoke it)."""
    page = _page(request)
    current = {code.id: code for code in broker.visitor_codes()}.get(visitor_id)
    if current is None:
        raise web.HTTPNotFound(text=page.texts("visitors.no_such"))
    if not broker.connected:
        raise web.HTTPServiceUnavailable(text=page.texts("visitors.no_broker"))
    try:
        refused = await broker.put_code(visitor_id, body(current), within=BROKER_WAIT)
    except BrokerError as exc:
        log.warning("staff page: visitor code not changed, the broker did not take it",
                    id=visitor_id, error=str(exc))
        raise web.HTTPServiceUnavailable(text=page.texts("visitors.no_broker")) from None
    except TimeoutError:
        refused = None  # on the broker; applied here when it comes back
    if refused is not None:
        raise web.HTTPConflict(text=page.texts("visitors.not_changed", problem=refused))


def _delete_visitor(conn: sqlite3.Connection, visitor_id: str) -> int:
    return conn.execute("DELETE FROM visitors WHERE id = ?", (visitor_id,)).rowcount


async def revoke(request: web.Request) -> web.StreamResponse:
    visit = _needs(request, "staff")
    page = _page(request)
    visitor_id = request.match_info["id"]
    broker = _on_broker(page, visitor_id)
    if broker is not None:
        await _change_on_broker(request, broker, visitor_id, lambda _code: b"")
        log.info("staff page: visitor code revoked on the broker", user=visit.user.name,
                 id=visitor_id)
        raise web.HTTPSeeOther("/visitors")
    book = page.gatekeeper.book
    if not await page.gatekeeper.store.call(_delete_visitor, visitor_id):
        raise web.HTTPNotFound(text=page.texts("visitors.no_such"))
    book.visitors = {digest: c for digest, c in book.visitors.items()
                     if c.id != f"visitor:{visitor_id}"}
    log.info("staff page: visitor code revoked", user=visit.user.name, id=visitor_id)
    raise web.HTTPSeeOther("/visitors")


def _extend_visitor(conn: sqlite3.Connection, visitor_id: str, now: float,
                    seconds: float) -> VisitorRow | None:
    # From its end, or from now for a code that has already ended.
    conn.execute("UPDATE visitors SET valid_until = max(valid_until, ?) + ? WHERE id = ?",
                 (now, seconds, visitor_id))
    row = conn.execute(f"SELECT {', '.join(VISITOR_COLUMNS)} FROM visitors "  # noqa: S608
                       "WHERE id = ?", (visitor_id,)).fetchone()
    return VisitorRow.from_row(row) if row is not None else None


def _extended(code: ManagedCode, now: float, seconds: float, tz: dt.tzinfo) -> bytes:
    """A broker visitor code's message, valid ``seconds`` longer: from its end, or from
    now for one that has already ended (as a local code is extended)."""
    fields = json.loads(code.body)  # an object: the bridge applied it
    start = max(code.credential.valid_until or now, now)
    fields["valid_until"] = dt.datetime.fromtimestamp(int(start + seconds), tz).isoformat()
    return json.dumps(fields, ensure_ascii=False).encode()


async def extend(request: web.Request) -> web.StreamResponse:
    visit = _needs(request, "staff")
    page = _page(request)
    form = await request.post()
    hours = _number(str(form.get("hours", "")), 0.25, 24 * 31)
    if hours is None:
        raise web.HTTPBadRequest(text=page.texts("visitors.bad_hours"))
    visitor_id = request.match_info["id"]
    broker = _on_broker(page, visitor_id)
    if broker is not None:
        now, tz = page.clock.now(), page.config().tz
        await _change_on_broker(request, broker, visitor_id,
                                lambda code: _extended(code, now, hours * 3600, tz))
        log.info("staff page: visitor code extended on the broker", user=visit.user.name,
                 id=visitor_id, hours=hours)
        raise web.HTTPSeeOther("/visitors")
    row = await page.gatekeeper.store.call(_extend_visitor, visitor_id, page.clock.now(),
                                           hours * 3600)
    if row is None:
        raise web.HTTPNotFound(text=page.texts("visitors.no_such"))
    book = page.gatekeeper.book
    book.visitors = {**book.visitors, row.digest: visitors.credential(row)}
    log.info("staff page: visitor code extended", user=visit.user.name, id=visitor_id,
             hours=hours)
    raise web.HTTPSeeOther("/visitors")


# -- users (admins only) -----------------------------------------------------------------

USER_ENTRY = {"add": "user-added", "role": "user-role", "password": "user-password",
              "remove": "user-removed"}


def _user_rows(page: StaffPage) -> list[dict[str, str]]:
    return [{"name": u.name, "role": u.role}
            for u in sorted(page.users.current().values(), key=lambda u: u.name)]


def _users_page(request: web.Request, *, error: str = "", done: str = "",
                status: int = 200) -> web.Response:
    page = _page(request)
    return _render(request, "users.html", {
        "users": _user_rows(page), "roles": list(reversed(ROLES)), "error": error,
        "done": done}, status=status)


async def users_page(request: web.Request) -> web.Response:
    _needs(request, "admin")
    return _users_page(request)


class _Refused(Exception):
    """A user change refused, with the text that says why."""

    def __init__(self, key: str, status: int = 400) -> None:
        super().__init__(key)
        self.key = key
        self.status = status


def _admins(users: dict[str, User]) -> int:
    return sum(1 for u in users.values() if u.role == "admin")


async def _new_password(page: StaffPage, name: str, role: Role,
                        form: Any) -> User:
    password = str(form.get("password", ""))
    if not users_mod.MIN_PASSWORD <= len(password) <= users_mod.MAX_PASSWORD:
        raise _Refused("users.bad_password")
    if not hmac.compare_digest(password.encode(), str(form.get("password2", "")).encode()):
        raise _Refused("users.mismatch")
    # Hashing holds argon2id's 64 MiB like a login's check: it takes a slot too.
    made: list[User] = []

    def make() -> bool:
        made.append(users_mod.make(name, role, password))
        return True

    if await page.checks.run(make) is None:
        raise _Refused("login.busy", status=429)
    return made[0]


async def _change(request: web.Request, action: str) -> web.Response:
    visit = _needs(request, "admin")
    page = _page(request)
    form = await request.post()
    target = request.match_info.get("name") or str(form.get("name", "")).strip().lower()
    try:
        # A first look, to refuse before a password is hashed; the change itself
        # is checked again against the file as it is when written (below).
        users = users_mod.load(page.users.path)
        current = users.get(target)
        if action == "add":
            try:
                users_mod.check_name(target)
            except UserError:
                raise _Refused("users.bad_name") from None
            if current is not None:
                raise _Refused("users.exists", status=409)
        elif current is None:
            raise _Refused("users.no_such", status=404)
        role = str(form.get("role", current.role if current else ""))
        if role not in ROLES:
            raise _Refused("users.bad_role")
        new_role = ROLES[ROLES.index(role)]
        if current is not None and current.role == "admin" and _admins(users) <= 1 and (
                action == "remove" or (action == "role" and new_role != "admin")):
            raise _Refused("users.last_admin", status=409)
        made: User | None = None
        if action in ("add", "password"):
            made = await _new_password(page, target, current.role if current else new_role,
                                       form)
        elif action == "role" and current is not None and new_role == current.role:
            return _users_page(request)

        def apply(latest: dict[str, User]) -> User | None:
            # Under the file's lock, on the file as it is now: a change made
            # meanwhile (the command line, another admin) is kept, not overwritten.
            now = latest.get(target)
            if action == "add":
                if now is not None:
                    raise _Refused("users.exists", status=409)
                assert made is not None
                latest[target] = made
            elif now is None:
                raise _Refused("users.no_such", status=404)
            elif action == "password":
                assert made is not None
                latest[target] = User(target, now.role, made.hash, made.changed)
            elif action == "role":
                # A new stamp: every session made under the old role ends.
                latest[target] = User(target, new_role, now.hash,
                                      max(users_mod.make_stamp(), now.changed + 1e-6))
            else:
                del latest[target]
            if _admins(latest) < 1:
                raise _Refused("users.last_admin", status=409)
            return latest.get(target)

        # The lock may be held by `gated users`: wait for it off the event loop.
        changed = await asyncio.to_thread(users_mod.update, page.users.path, apply)
    except _Refused as refused:
        log.warning("staff page: user change refused", user=visit.user.name, action=action,
                    target=target if users_mod.NAME.fullmatch(target) else "?",
                    why=refused.key)
        return _users_page(request, error=page.texts(refused.key), status=refused.status)
    except (UserError, files.FileError, OSError) as exc:
        log.error("staff page: cannot change the users file", error=str(exc))
        return _users_page(request, error=page.texts("users.unreadable"), status=503)
    if action == "add":
        done = page.texts("users.added", name=target)
    elif action == "password":
        done = page.texts("users.password_changed", name=target)
    elif action == "role":
        done = page.texts("users.role_changed", name=target,
                          role=page.texts(f"users.role_{new_role}"))
    else:
        done = page.texts("users.removed", name=target)
    if action != "add":
        page.sessions.end_all(target)
    log.info("staff page: user changed", user=visit.user.name, action=action, target=target,
             role=changed.role if changed is not None else "")
    await page.gatekeeper.note(Entry(
        time=page.clock.now(), gate=None, caller=None, did=None, status="ACK",
        reason=USER_ENTRY[action], credential=visit.user.name, credential_id=f"user:{target}",
        kind="user", source="web"))
    if target == visit.user.name and action != "add":
        raise web.HTTPSeeOther("/login")  # their own session has just ended
    return _users_page(request, done=done)


async def user_add(request: web.Request) -> web.Response:
    return await _change(request, "add")


async def user_role(request: web.Request) -> web.Response:
    return await _change(request, "role")


async def user_password(request: web.Request) -> web.Response:
    return await _change(request, "password")


async def user_remove(request: web.Request) -> web.Response:
    return await _change(request, "remove")


# -- the app -----------------------------------------------------------------------------

def make_web_app(page: StaffPage) -> web.Application:
    app = web.Application(middlewares=[guard], client_max_size=MAX_FORM)
    app[PAGE] = page
    aiohttp_jinja2.setup(app, loader=jinja2.FileSystemLoader(HERE / "templates"),
                         autoescape=jinja2.select_autoescape(default=True))
    page.gatekeeper.listeners.append(page.entry)
    app.router.add_get("/login", login_form)
    app.router.add_post("/login", login)
    app.router.add_post("/logout", logout)
    app.router.add_get("/", index)
    app.router.add_get("/log", log_page)
    app.router.add_get("/log.csv", log_csv)
    app.router.add_get("/events", live)
    app.router.add_get("/visitors", visitors_page)
    app.router.add_post("/visitors", issue)
    app.router.add_post("/visitors/{id}/revoke", revoke)
    app.router.add_post("/visitors/{id}/extend", extend)
    app.router.add_get("/gates/{gate}/open", open_confirm)
    app.router.add_post("/gates/{gate}/open", open_gate)
    app.router.add_get("/users", users_page)
    app.router.add_post("/users", user_add)
    app.router.add_post("/users/{name}/role", user_role)
    app.router.add_post("/users/{name}/password", user_password)
    app.router.add_post("/users/{name}/remove", user_remove)
    app.router.add_static("/static/", HERE / "static")

    async def closing(app: web.Application) -> None:
        with contextlib.suppress(ValueError):
            page.gatekeeper.listeners.remove(page.entry)
        page.sessions.close()

    app.on_cleanup.append(closing)
    return app


