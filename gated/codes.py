"""The code book: gates, caller lists and credentials compiled for O(1) lookup.

Static codes are looked up by a keyed hash of the digits (HMAC-SHA256), never
by comparing digits: the lookup costs the same for 10 or 100,000 codes, and
its timing tells a guesser nothing about how close a guess was. TOTP codes
live in a table of the currently valid codes of every person, rebuilt once per
time step, so a request costs one dict lookup, not one HMAC per person.
"""

from __future__ import annotations

import datetime as dt
import functools
import hmac
import os
import re
import zoneinfo
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import pyotp

from gated import sitekey
from gated.errors import ConfigError, NumberError
from gated.numbers import normalise
from gated.routes import RouteTable, compile_routes
from gated.schedule import Schedule, ScheduleError, parse_schedule

if TYPE_CHECKING:
    from pathlib import Path

    from gated.config import CodeConfig, Config, TotpConfig
    from gated.tomlpos import Key

Kind = Literal["code", "totp", "visitor", "route"]
CODE_RE = re.compile(r"[0-9]{4,16}")
# What a caller may type: digits only; longer input is refused unread.
TYPED_RE = re.compile(r"[0-9]{1,32}")
# How many TOTP steps either side of now are accepted (clock drift, slow typing).
TOTP_WINDOW = 1


@dataclass(frozen=True, slots=True)
class Gate:
    name: str
    numbers: frozenset[str]
    callers: frozenset[str]


@dataclass(frozen=True, slots=True)
class Credential:
    id: str
    name: str
    kind: Kind
    gates: frozenset[str]
    valid_from: float | None = None  # epoch seconds
    valid_until: float | None = None
    schedule: Schedule | None = None
    max_uses: int | None = None
    callers: frozenset[str] = frozenset()
    callername: str = ""
    destination: str = ""

    @property
    def route_only(self) -> bool:
        """Answers the PBX with a route but opens nothing."""
        return not self.gates


@dataclass(slots=True)
class TotpUser:
    credential: Credential
    otp: pyotp.TOTP
    # The decoded secret and the digest's name, so a table rebuild costs one
    # one-shot HMAC per user and time step, not pyotp's base32 decode and
    # HMAC object each time.
    key: bytes = field(init=False, repr=False)
    digest: str = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.key = self.otp.byte_secret()
        self.digest = self.otp.digest().name


def _hotp(key: bytes, counter: bytes, digest: str, digits: int) -> str:
    """The same digits as pyotp's ``generate_otp`` (RFC 4226 truncation)."""
    mac = hmac.digest(key, counter, digest)
    offset = mac[-1] & 0x0F
    value = int.from_bytes(mac[offset:offset + 4], "big") & 0x7FFF_FFFF
    return str(value % 10**digits).zfill(digits)


@dataclass(slots=True)
class TotpTable:
    """The codes every TOTP user may type, one table per time step.

    A table is built once per step (one HMAC per user) and looked up by the
    digits, so a request costs a few dict lookups however many users there are.
    """

    users: list[TotpUser]
    period: int = 30
    steps: dict[int, dict[str, list[TotpUser]]] = field(default_factory=dict)

    def lookup(self, code: str, now: float) -> list[tuple[Credential, int]]:
        step = int(now) // self.period
        found: list[tuple[Credential, int]] = []
        for timecode in range(step - TOTP_WINDOW, step + TOTP_WINDOW + 1):
            table = self.steps.get(timecode)
            if table is None:
                table = self.install(timecode, self.build(timecode))
            found.extend((user.credential, timecode) for user in table.get(code, ()))
        return found

    def build(self, timecode: int) -> dict[str, list[TotpUser]]:
        """The table for one step; touches no shared state, so it may run in a thread."""
        table: dict[str, list[TotpUser]] = {}
        counter = timecode.to_bytes(8, "big")
        for user in self.users:
            code = _hotp(user.key, counter, user.digest, user.otp.digits)
            found = table.get(code)
            if found is None:
                table[code] = [user]
            else:
                found.append(user)
        return table

    def install(self, timecode: int, table: dict[str, list[TotpUser]]) -> dict[str, list[TotpUser]]:
        for old in [s for s in self.steps if abs(s - timecode) > 2 * TOTP_WINDOW + 1]:
            del self.steps[old]
        self.steps[timecode] = table
        return table

    def missing(self, now: float) -> list[int]:
        """Steps a lookup soon will need that are not built yet."""
        step = int(now) // self.period
        return [t for t in range(step - TOTP_WINDOW, step + TOTP_WINDOW + 2)
                if t not in self.steps]


@dataclass(slots=True)
class CodeBook:
    """Everything decide() needs to know about gates and credentials."""

    gates: dict[str, Gate]
    by_number: dict[str, str]
    codes: dict[bytes, Credential]
    totp: dict[int, TotpTable]  # by period
    tz: zoneinfo.ZoneInfo
    region: str
    # Without a site key the book uses a throw-away one: lookups work the
    # same, but no code_hash can be checked.
    key: bytes = field(default_factory=lambda: os.urandom(32))
    site_key: bool = False
    # Codes issued at run time (`gated codes issue`), by digest.
    visitors: dict[bytes, Credential] = field(default_factory=dict)
    # Static codes by credential id, so one can be replaced or removed at run
    # time (codes managed over MQTT) without rebuilding the book.
    code_ids: dict[str, bytes] = field(default_factory=dict)
    # Smart routing by caller: [[routes]] and routes over MQTT.
    routes: RouteTable = field(default_factory=RouteTable)

    def gate_for(self, did: str | None) -> Gate | None:
        """The gate a called number selects; a one-gate site may omit numbers
        (its gate then takes every number but the routes' lines)."""
        if did is not None and did in self.by_number:
            return self.gates[self.by_number[did]]
        if len(self.gates) == 1:
            only = next(iter(self.gates.values()))
            if did is None or (not only.numbers and did not in self.routes.numbers):
                return only
        return None

    def is_line(self, did: str | None) -> bool:
        """A called number of no gate that routes answer on."""
        return did is not None and did in self.routes.numbers and did not in self.by_number

    def digest(self, code: str) -> bytes:
        return sitekey.digest(self.key, code)

    def match(self, code: str, now: float) -> list[tuple[Credential, int | None]]:
        """Credentials that ``code`` is: static, then visitor, then TOTP."""
        found: list[tuple[Credential, int | None]] = []
        digest = self.digest(code)
        static = self.codes.get(digest)
        if static is not None:
            found.append((static, None))
        visitor = self.visitors.get(digest)
        if visitor is not None:
            found.append((visitor, None))
        for table in self.totp.values():
            found.extend(table.lookup(code, now))
        return found

    def has_id(self, credential_id: str) -> bool:
        if credential_id in self.code_ids:
            return True
        return any(user.credential.id == credential_id
                   for table in self.totp.values() for user in table.users)

    def add_code(self, credential: Credential, digest: bytes) -> None:
        """Add one static code; CodeClash if its id or its digits are taken.

        The clash message never names the other credential: whoever may add
        codes must not learn whose digits they guessed.
        """
        if self.has_id(credential.id):
            raise CodeClash(f"id {credential.id!r} is already used by another credential")
        if digest in self.codes or digest in self.visitors:
            raise CodeClash("these digits are already another credential's code")
        self.codes[digest] = credential
        self.code_ids[credential.id] = digest

    def remove_code(self, credential_id: str) -> Credential | None:
        """Remove a static code by credential id; the credential, or None if absent."""
        digest = self.code_ids.pop(credential_id, None)
        return None if digest is None else self.codes.pop(digest, None)

    @property
    def credential_count(self) -> int:
        return len(self.codes) + sum(len(t.users) for t in self.totp.values())

    def credentials(self) -> Iterable[Credential]:
        yield from self.codes.values()
        for table in self.totp.values():
            for user in table.users:
                yield user.credential


class CodeClash(ValueError):
    """A code's id or digits are already another credential's."""


ErrorFactory = Callable[["Key", str], ConfigError]
NumberParser = Callable[[str, "Key"], str]


def _plain_error(key: Key, message: str) -> ConfigError:
    from gated.tomlpos import format_path

    return ConfigError(message, path=format_path(key))


def compile_book(config: Config, *, error: ErrorFactory = _plain_error,
                 key: bytes | None = None, folder: Path | None = None) -> CodeBook:
    """Build the code book, raising ``error(key_path, message)`` on the first problem.

    ``folder``: where a route's ``file`` is looked up (the config file's folder).
    """
    tz = zoneinfo.ZoneInfo(config.site.timezone)
    number = number_parser(config.site.region, error)

    gates: dict[str, Gate] = {}
    by_number: dict[str, str] = {}
    for name, gate in config.gates.items():
        numbers = []
        for index, raw in enumerate(gate.numbers):
            value = number(raw, ("gates", name, "numbers", index))
            if value in by_number:
                raise error(("gates", name, "numbers", index),
                            f"{value} already selects gate {by_number[value]!r}")
            by_number[value] = name
            numbers.append(value)
        callers = [number(raw, ("gates", name, "callers", i)) for i, raw in enumerate(gate.callers)]
        gates[name] = Gate(name, frozenset(numbers), frozenset(callers))

    book = CodeBook(gates=gates, by_number=by_number, codes={}, totp={}, tz=tz,
                    region=config.site.region)
    if key is not None:
        book.key = key
        book.site_key = True
    ids: dict[str, Key] = {}

    def claim_id(cred_id: str, where: Key) -> None:
        if cred_id in ids:
            raise error(where, f"id {cred_id!r} is used twice; give one an explicit id")
        ids[cred_id] = where

    for index, code in enumerate(config.codes):
        where: Key = ("codes", index)
        credential = compile_code(code, where, config, tz, number, error)
        claim_id(credential.id, (*where, "name"))
        digest = code_digest(book, code.code, code.code_hash, where, error)
        if digest in book.codes:
            raise error((*where, "code" if code.code is not None else "code_hash"),
                        f"the same digits as code {book.codes[digest].name!r}")
        book.codes[digest] = credential
        book.code_ids[credential.id] = digest

    for index, totp in enumerate(config.totp):
        where = ("totp", index)
        credential = compile_totp(totp, where, config, error)
        claim_id(credential.id, (*where, "name"))
        try:
            otp = pyotp.TOTP(totp.secret, digits=totp.digits, interval=totp.period)
            otp.generate_otp(0)
        except (ValueError, TypeError) as exc:
            raise error((*where, "secret"),
                        f"not a usable base32 TOTP secret ({exc})") from None
        table = book.totp.setdefault(totp.period, TotpTable(users=[], period=totp.period))
        table.users.append(TotpUser(credential, otp))
    if config.routes:
        from gated.config import resolve_in

        book.routes = compile_routes(
            [(("routes", i), route, resolve_in(folder, route.file) if route.file else None)
             for i, route in enumerate(config.routes)], number, error, config.site.region)
    return book


def code_digest(book: CodeBook, code: str | None, hashed: str | None, where: Key,
                error: ErrorFactory) -> bytes:
    """The lookup digest of a credential given as digits or as a keyed hash."""
    if (code is None) == (hashed is None):
        raise error((*where, "code"), "give exactly one of code and code_hash")
    if code is not None:
        if not CODE_RE.fullmatch(code):
            raise error((*where, "code"), "a code is 4 to 16 digits")
        return book.digest(code)
    assert hashed is not None
    digest = sitekey.parse_hash(hashed)
    if digest is None:
        raise error((*where, "code_hash"), "expected hmac-sha256: and 64 hex digits "
                    "(made by `gated codes hash`)")
    if not book.site_key:
        raise error((*where, "code_hash"), "code_hash needs the site key file "
                    "(see [site] key_file; `gated codes hash` creates it)")
    return digest


def number_parser(region: str, error: ErrorFactory) -> NumberParser:
    """Normalise a configured phone number to E.164, or raise ``error`` at its key."""

    def number(raw: str, where: Key) -> str:
        try:
            value = normalise(raw, region)
        except NumberError as exc:
            raise error(where, f"{exc}: {raw!r}") from None
        if value is None:
            raise error(where, f"not a phone number: {raw!r}")
        return value

    return number


# Credentials by the thousand share a few gate sets, caller sets and
# schedules: one shared immutable object each, not a copy per code (a
# frozenset is 216 bytes even when empty, a two-window schedule ~700).
# Bounded; a miss only costs the copy it would have made anyway.
@functools.lru_cache(maxsize=4096)
def _shared_set(items: tuple[str, ...]) -> frozenset[str]:
    return frozenset(items)


@functools.lru_cache(maxsize=1024)
def _shared_schedule(specs: tuple[str, ...]) -> Schedule:
    return parse_schedule(specs)


def _gates(names: list[str], where: Key, config: Config, error: ErrorFactory) -> frozenset[str]:
    for index, name in enumerate(names):
        if name not in config.gates:
            raise error((*where, "gates", index), f"no gate named {name!r}")
    return _shared_set(tuple(names))


def _epoch(value: dt.datetime | None, tz: zoneinfo.ZoneInfo) -> float | None:
    if value is None:
        return None
    if value.tzinfo is None:  # times without an offset are site-local
        value = value.replace(tzinfo=tz)
    return value.timestamp()


def compile_code(code: CodeConfig, where: Key, config: Config, tz: zoneinfo.ZoneInfo,
                 number: Callable[[str, Key], str], error: ErrorFactory,
                 kind: Kind = "code") -> Credential:
    try:
        schedule = _shared_schedule(tuple(code.schedule)) if code.schedule else None
    except ScheduleError as exc:
        raise error((*where, "schedule"), str(exc)) from None
    valid_from = _epoch(code.valid_from, tz)
    valid_until = _epoch(code.valid_until, tz)
    if valid_from is not None and valid_until is not None and valid_until <= valid_from:
        raise error((*where, "valid_until"), "must be after valid_from")
    gates = _gates(code.gates, where, config, error)
    if not gates and not (code.callername or code.destination):
        raise error((*where, "gates"),
                    "a code needs gates to open, or callername/destination to route")
    callers = _shared_set(tuple(number(raw, (*where, "callers", i))
                                for i, raw in enumerate(code.callers)))
    return Credential(
        id=code.id or code.name, name=code.name, kind=kind, gates=gates,
        valid_from=valid_from, valid_until=valid_until, schedule=schedule,
        max_uses=code.max_uses, callers=callers,
        callername=code.callername, destination=code.destination,
    )


def compile_totp(totp: TotpConfig, where: Key, config: Config,
                 error: ErrorFactory) -> Credential:
    gates = _gates(totp.gates, where, config, error)
    if not gates:
        raise error((*where, "gates"), "a TOTP user needs at least one gate")
    return Credential(id=totp.id or totp.name, name=totp.name, kind="totp", gates=gates,
                      callername=totp.callername, destination=totp.destination)
