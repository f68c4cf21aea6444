"""Codes managed over MQTT, checked and applied to the code book one at a time.

Staff publish one retained JSON message per code (the fields of a ``[[codes]]``
entry) under ``<prefix>/codes/<id>``, or under the fleet prefix for a code
valid at every site. Each message is checked on its own: a bad one is refused
with a reason and the previous version of that code stays in force. Managed
codes sit in the same book as the file's codes; a clash of ids or digits is
refused, never merged. No I/O here: the MQTT bridge feeds messages in and
publishes, persists and logs what comes out.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec

from gated.book import config as config_mod
from gated.book import sitekey
from gated.book.codes import ELSEWHERE, CodeBook, CodeClash
from gated.book.compiler import compile_code, number_parser
from gated.book.config import CodeConfig, Config
from gated.book.routes import Route, RouteError, RouteTable, caller_key, compile_route
from gated.core.credential import CODE_RE, Credential, Kind
from gated.core.errors import ConfigError
from gated.core.numbers import NumberParser
from gated.core.tomlpos import Key, format_path

Scope = Literal["site", "fleet"]
# Managed codes issued by `gated codes issue` (see gated.commands.codes).
VISITOR_PREFIX = "v-"
ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# In a managed code's gates: every gate of the site (fleet codes mostly want this).
ALL_GATES = "*"
# A code's fields fit in a few hundred bytes; anything near this is not a code,
# and is refused before it is parsed or kept.
MAX_BODY = 64 * 1024
# What a publisher hears when a code takes another credential's digits. Saying
# why would tell whoever may publish codes which digits open the gate.
NOT_ACCEPTED = "not accepted"


class Rejected(Exception):
    """A managed code that cannot be applied; the message is safe to publish.

    ``detail`` is for the site's own log, when it says more than the message.
    """

    def __init__(self, message: str, *, detail: str | None = None) -> None:
        super().__init__(message)
        self.detail = detail if detail is not None else message


class Clash(Rejected):
    """A managed code whose digits are already another credential's."""

    def __init__(self, detail: str) -> None:
        super().__init__(NOT_ACCEPTED, detail=detail)


class NotHere(Exception):
    """A fleet code that names none of this site's gates: nothing to apply here."""


@dataclass(frozen=True, slots=True)
class ManagedCode:
    scope: Scope
    id: str
    body: bytes = field(repr=False)  # the message as received: the local copy
    credential: Credential
    code: str | None = field(repr=False)  # the digits, needed to rebuild a book's digest
    code_hash: bytes | None = field(default=None, repr=False)  # or the keyed hash

    def digest(self, book: CodeBook) -> bytes:
        """The lookup digest: under the site key, or the fleet key for a fleet code
        (whose ``code_hash`` is made with the fleet key)."""
        if self.code is not None:
            if self.scope == "fleet" and book.fleet is not None:
                return book.fleet.digest(self.code)
            return book.digest(self.code)
        assert self.code_hash is not None
        return self.code_hash


def _fail(key: Key, message: str) -> ConfigError:
    return ConfigError(message, path=format_path(key))


def parse(scope: Scope, code_id: str, body: bytes, config: Config) -> ManagedCode:
    """Check one code message against the site's config.

    Raises Rejected (with a publishable reason that never holds the digits),
    or NotHere for a fleet code meant for other sites' gates.
    """
    if not ID_RE.fullmatch(code_id):
        raise Rejected("a code id is 1 to 64 letters, digits, '_', '.' or '-'")
    if len(body) > MAX_BODY:
        raise Rejected(f"message too large (at most {MAX_BODY} bytes)")
    try:
        raw: Any = msgspec.json.decode(body)
    except msgspec.DecodeError:
        raise Rejected("not valid JSON") from None
    except RecursionError:
        # A code is an object of strings and lists of strings: depth 2.
        raise Rejected("not valid JSON: too deeply nested") from None
    if not isinstance(raw, dict):
        raise Rejected("expected a JSON object with the fields of a [[codes]] entry")
    raw = dict(raw)
    if raw.get("id", code_id) != code_id:
        raise Rejected("id: must be the id in the topic, or left out")
    raw["id"] = code_id
    raw.setdefault("name", code_id)
    code, credential = _check(scope, raw, config, _kind(scope, code_id))
    hashed = None if code.code_hash is None else sitekey.parse_hash(code.code_hash)
    return ManagedCode(scope, code_id, body, credential, code.code, hashed)


def _kind(scope: Scope, code_id: str) -> Kind:
    """What a code from the broker is, as entries, events and `codes ls` name it."""
    if scope == "fleet":
        return "fleet"
    return "visitor" if code_id.startswith(VISITOR_PREFIX) else "managed"


def compile_policy(fields: dict[str, Any], config: Config, scope: Scope = "fleet"
                   ) -> Credential:
    """A fleet set's policy as this site applies it (``ELSEWHERE``: for other sites).

    Raises Rejected when this site cannot apply it (a caller number its
    region cannot read, say); the set's other codes still apply.
    """
    raw = {**fields, "name": "policy", "code_hash": sitekey.PREFIX + "0" * 64}
    try:
        return _check("fleet", raw, config, _kind(scope, ""))[1]
    except NotHere:
        return ELSEWHERE


def _check(scope: Scope, raw: dict[str, Any], config: Config, kind: Kind
           ) -> tuple[CodeConfig, Credential]:
    gates = raw.get("gates")
    if isinstance(gates, list) and all(isinstance(g, str) for g in gates):
        if ALL_GATES in gates:
            raw["gates"] = list(config.gates)
        elif scope == "fleet":
            # A fleet code opens the gates of that name wherever they exist.
            here = [g for g in gates if g in config.gates]
            if gates and not here and not (raw.get("callername") or raw.get("destination")):
                raise NotHere(f"names none of this site's gates ({', '.join(config.gates)})")
            raw["gates"] = here
    try:
        code = config_mod.convert(raw, CodeConfig, (), _fail)
        if (code.code is None) == (code.code_hash is None):
            raise _fail(("code",), "give exactly one of code and code_hash")
        if code.code is not None and not CODE_RE.fullmatch(code.code):
            raise _fail(("code",), "a code is 4 to 16 digits")
        if code.code_hash is not None and sitekey.parse_hash(code.code_hash) is None:
            raise _fail(("code_hash",), "expected hmac-sha256: and 64 hex digits")
        credential = compile_code(code, (), config, config.tz,
                                  number_parser(config.site.region, _fail), _fail,
                                  kind=kind)
    except ConfigError as exc:
        raise Rejected(str(exc)) from None
    return code, credential


@dataclass
class ClashWatch:
    """Counts digit clashes in a sliding window, to raise one alarm per burst.

    One clash is staff picking digits already in use; a burst is someone
    probing which digits open the gate, one refused code at a time.
    """

    limit: int = 5
    window: float = 600.0
    _times: deque[float] = field(default_factory=deque)
    _alarmed: float | None = None

    def clashed(self, now: float) -> bool:
        """Record a clash at ``now`` (monotonic); True when it is time for the alarm:
        ``limit`` clashes within ``window``, at most once per window."""
        self._times.append(now)
        # Only the last ``limit`` matter: a flood of probes keeps five floats.
        if len(self._times) > self.limit:
            self._times.popleft()
        if len(self._times) < self.limit or self._times[0] <= now - self.window:
            return False
        if self._alarmed is not None and now - self._alarmed < self.window:
            return False
        self._alarmed = now
        return True


@dataclass
class ManagedCodes:
    """The managed codes now in force, by credential id (one namespace with the file's)."""

    applied: dict[str, ManagedCode] = field(default_factory=dict)

    def get(self, scope: Scope, code_id: str) -> ManagedCode | None:
        code = self.applied.get(code_id)
        return code if code is not None and code.scope == scope else None

    def ids(self, scope: Scope) -> set[str]:
        return {code.id for code in self.applied.values() if code.scope == scope}

    def put(self, book: CodeBook, code: ManagedCode) -> ManagedCode | None:
        """Apply ``code`` in place of its previous version; that version, or None.

        Raises Rejected when it clashes with another credential (Clash when
        its digits are taken); the previous version then stays in force.
        """
        previous = self.applied.get(code.id)
        if previous is not None and previous.scope != code.scope:
            raise Rejected(f"id {code.id!r} is already used by a {previous.scope} code")
        if code.scope == "site" and book.fleet is not None and book.fleet.static.has_id(code.id):
            # Uses are counted by id: a site code must not share one with the fleet's set.
            raise Rejected(f"id {code.id!r} is already used by a fleet code")
        if previous is not None:
            _remove(book, previous.scope, previous.id)
        try:
            _add(book, code)
        except CodeClash as exc:
            # Ids are names staff choose, not secrets: an id clash is said plainly.
            taken_id = book.has_id(code.id)
            if previous is not None:
                _add(book, previous)
            raise (Rejected(str(exc)) if taken_id else Clash(str(exc))) from None
        self.applied[code.id] = code
        return previous

    def delete(self, book: CodeBook, scope: Scope, code_id: str) -> ManagedCode | None:
        """Withdraw a code; the one withdrawn, or None if it was not in force."""
        code = self.get(scope, code_id)
        if code is None:
            return None
        _remove(book, scope, code_id)
        del self.applied[code_id]
        return code

    def discard(self, book: CodeBook, code_id: str) -> None:
        """Take a code out, whatever its scope (nothing if it is not in force)."""
        code = self.applied.pop(code_id, None)
        if code is not None:
            _remove(book, code.scope, code_id)


def _add(book: CodeBook, code: ManagedCode) -> None:
    if code.scope == "fleet" and book.fleet is not None:
        book.add_fleet_code(code.credential, code.digest(book))
    else:
        book.add_code(code.credential, code.digest(book))


def _remove(book: CodeBook, scope: Scope, code_id: str) -> None:
    if scope == "fleet" and book.fleet is not None:
        book.remove_fleet_code(code_id)
    else:
        book.remove_code(code_id)


Dropped = list[tuple[ManagedCode, "Rejected | NotHere"]]


def rebased(codes: list[ManagedCode], book: CodeBook,
            config: Config) -> tuple[ManagedCodes, Dropped]:
    """``codes`` applied to a book that is not in use yet, in a new ManagedCodes.

    Touches nothing shared, so a reload runs it in a thread: with tens of
    thousands of managed codes it takes seconds that calls must not wait for.
    """
    fresh = ManagedCodes()
    dropped: Dropped = []
    for old in codes:
        try:
            # Compiled again: the site's time zone, region or key may have changed.
            fresh.put(book, parse(old.scope, old.id, old.body, config))
        except (Rejected, NotHere) as exc:
            dropped.append((old, exc))
    return fresh, dropped


# -- routes over MQTT: the fields of a [[routes]] entry, one message each ---------------


@dataclass(frozen=True, slots=True)
class ManagedRoute:
    scope: str  # "site" or "fleet"
    id: str
    body: bytes = field(repr=False)  # the message as received: the local copy
    route: Route


def parse_route(scope: str, route_id: str, body: bytes, config: Config) -> ManagedRoute:
    """Check one route message (the fields of a [[routes]] entry but ``file``)
    against the site's config; RouteError with a publishable reason."""
    import msgspec


    if not ID_RE.fullmatch(route_id):
        raise RouteError("a route id is 1 to 64 letters, digits, '_', '.' or '-'")
    if len(body) > MAX_BODY:
        raise RouteError(f"message too large (at most {MAX_BODY} bytes)")
    try:
        raw = msgspec.json.decode(body)
    except msgspec.DecodeError:
        raise RouteError("not valid JSON") from None
    except RecursionError:
        raise RouteError("not valid JSON: too deeply nested") from None
    if not isinstance(raw, dict):
        raise RouteError("expected a JSON object with the fields of a [[routes]] entry")
    raw = dict(raw)
    if raw.pop("id", route_id) != route_id:
        raise RouteError("id: must be the id in the topic, or left out")
    raw.setdefault("name", route_id)

    def fail(key: Key, message: str) -> ConfigError:
        return ConfigError(message, path=format_path(key))

    try:
        fields = config_mod.convert(raw, config_mod.RouteFields, (), fail)
        number = number_parser(config.site.region, fail)
        route = compile_route(fields, (), (1, route_id), route_id, number, fail)
        if route.numbers:
            # A number the route names becomes a line unless a gate has it: on a
            # one-gate site without numbers it would take the gate's calls (codes
            # refused, residents routed). Only the site's file makes lines (§15).
            known = site_numbers(config, number)
            for i, raw_number in enumerate(fields.numbers):
                if number(raw_number, ("numbers", i)) not in known:
                    raise fail(("numbers", i), f"{raw_number!r} is no line of this site: a "
                               "route over MQTT answers only on its gates' numbers and the "
                               "lines its file's [[routes]] name")
        keys = tuple(dict.fromkeys(caller_key(text, ("callers", i), number, fail)
                                   for i, text in enumerate(fields.callers)))
    except ConfigError as exc:
        raise RouteError(str(exc)) from None
    return ManagedRoute(scope, route_id, body,
                        Route(route.credential, route.numbers, route.order, keys))


def site_numbers(config: Config, number: NumberParser) -> frozenset[str]:
    """The called numbers the site's file answers on by name: its gates' and the lines
    its [[routes]] name."""
    named: list[tuple[Key, str]] = [
        (("gates", gate, "numbers", i), raw) for gate, table in config.gates.items()
        for i, raw in enumerate(table.numbers)]
    named += [(("routes", r, "numbers", i), raw) for r, route in enumerate(config.routes)
              for i, raw in enumerate(route.numbers)]
    return frozenset(number(raw, where) for where, raw in named)


@dataclass
class ManagedRoutes:
    """The routes over MQTT now in force, by id (site and fleet share the ids)."""

    applied: dict[str, ManagedRoute] = field(default_factory=dict)

    def get(self, scope: str, route_id: str) -> ManagedRoute | None:
        route = self.applied.get(route_id)
        return route if route is not None and route.scope == scope else None

    def ids(self, scope: str) -> set[str]:
        return {r.id for r in self.applied.values() if r.scope == scope}

    def put(self, table: RouteTable, route: ManagedRoute) -> ManagedRoute | None:
        previous = self.applied.get(route.id)
        if previous is not None and previous.scope != route.scope:
            raise RouteError(f"id {route.id!r} is already used by a {previous.scope} route")
        table.put(route.route)
        self.applied[route.id] = route
        return previous

    def delete(self, table: RouteTable, scope: str, route_id: str) -> ManagedRoute | None:
        route = self.get(scope, route_id)
        if route is None:
            return None
        table.remove(route_id)
        del self.applied[route_id]
        return route

    def rebase(self, table: RouteTable, config: Config) -> list[tuple[ManagedRoute, RouteError]]:
        """Apply every managed route to a freshly loaded table (a config reload)."""
        dropped: list[tuple[ManagedRoute, RouteError]] = []
        current, self.applied = self.applied, {}
        for old in current.values():
            try:
                self.put(table, parse_route(old.scope, old.id, old.body, config))
            except RouteError as exc:
                dropped.append((old, exc))
        return dropped
