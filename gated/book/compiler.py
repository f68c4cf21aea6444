"""From the config file to the code book: compile, keep, map.

``gated.book.config`` reads the file into checked values; this module turns those
into the code book, and owns the compiled book in the state directory
(``gated.book.bookfile``):

- the daemon's start maps the compiled book when its sources are unchanged
  (a restart answers at once, whatever the size), and otherwise has a child
  process compile it (``python -m gated _compile CONFIG``) and maps the
  result, so the daemon never holds the parsed TOML of a large file;
- a reload does the same in the background: the child compiles, the daemon
  maps the new book and swaps it in between two calls;
- commands (``gated check-config``, ``codes ls``...) compile in their own
  process from the file and keep nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import gc
import json
import mmap
import os
import re
import signal
import subprocess
import sys
import zoneinfo
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import pyotp
import structlog

from gated.book import bookfile, files, sitekey
from gated.book import config as config_mod
from gated.book.codes import (
    NAME_LENGTH,
    RECORD,
    TOTP_DIGESTS,
    TOTP_RECORD,
    CodeBook,
    StaticCodes,
    as_u64,
    digest_prefix,
    id_hash,
)
from gated.book.config import CodeConfig, Config, ErrorFactory, LogConfig, TotpConfig
from gated.book.routes import RouteTable, compile_routes
from gated.core.credential import CODE_RE, Credential, Gate, Kind
from gated.core.errors import ConfigError, NumberError
from gated.core.numbers import NumberParser, normalise
from gated.core.schedule import Schedule, ScheduleError, parse_schedule

if TYPE_CHECKING:
    from gated.core.tomlpos import Key

# The hidden command of ``python -m gated`` that runs ``main`` in the compiling child
# (``gated/__main__.py``).
CHILD_COMMAND = "_compile"
log = structlog.get_logger("gated.compiler")



def _plain_error(key: Key, message: str) -> ConfigError:
    from gated.core.tomlpos import format_path

    return ConfigError(message, path=format_path(key))


class Loaded(msgspec.Struct, frozen=True):
    """A validated config, where it came from, and its compiled code book."""

    config: Config
    # The file as it was named (absolute, a symlink left a symlink): a reload
    # reads what this names then, so `ln -sfn` to another file takes effect.
    path: Path
    book: CodeBook
    # The file ``path`` named when this was read. Relative paths in the config
    # are relative to its folder (the link's target's, not the link's).
    source: Path
    # How the book came to be: "parsed" here, "mapped" (compiled before, by
    # the same sources), "compiled" (by a child process just now).
    origin: str = "parsed"
    # Why the daemon compiled it here instead of keeping it in the state
    # directory ("" when it did not have to).
    unkept: str = ""

    @property
    def store_path(self) -> Path:
        return config_mod.resolve_state(self.source, self.config.log.path)

    @property
    def mqtt_ca_file(self) -> Path | None:
        """``[mqtt] tls_ca``, resolved against the config file's folder."""
        mqtt = self.config.mqtt
        return (config_mod.resolve(self.source, mqtt.tls_ca)
                if mqtt is not None and mqtt.tls_ca else None)

    @property
    def key_path(self) -> Path:
        return config_mod.key_path(self.source, self.config)


def without_credentials(loaded: Loaded) -> Loaded:
    """The same, minus the parsed [[codes]] and [[totp]] tables.

    Once compiled into the code book they are only weight: with 100,000 codes
    about 50 MB that a running daemon never reads again.
    """
    if not loaded.config.codes and not loaded.config.totp:
        return loaded
    slim = msgspec.structs.replace(loaded.config, codes=[], totp=[])
    return msgspec.structs.replace(loaded, config=slim)


def route_files(loaded: Loaded) -> list[Path]:
    """The CSV files of [[routes]]: a reload follows them as it follows the config."""
    return [config_mod.resolve(loaded.source, route.file)
            for route in loaded.config.routes if route.file]


# -- compiling ----------------------------------------------------------------

class Policy(msgspec.Struct, array_like=True, frozen=True):
    """What a code carries besides its digits and names: shared by many codes."""

    kind: str
    gates: tuple[str, ...]
    valid_from: float | None
    valid_until: float | None
    schedule: tuple[str, ...]
    max_uses: int | None
    callers: tuple[str, ...]
    callername: str
    destination: str


@dataclass(frozen=True)
class TotpRow:
    name: str
    id: str
    policy: int
    key: bytes
    digits: int
    digest: str
    period: int


@dataclass
class _Compiled:
    """A book's contents before they become bytes."""

    policies: dict[Policy, int]
    codes: list[tuple[bytes, int, str, str]]  # digest, policy, name, id
    totp: list[TotpRow]

    def policy(self, credential: Credential, schedule: list[str]) -> int:
        key = Policy(credential.kind, tuple(sorted(credential.gates)), credential.valid_from,
                     credential.valid_until, tuple(schedule), credential.max_uses,
                     tuple(sorted(credential.callers)), credential.callername,
                     credential.destination)
        return self.policies.setdefault(key, len(self.policies))

    def sections(self, config: Config) -> dict[str, bytes]:
        self.codes.sort(key=lambda code: (digest_prefix(code[0]), code[0]))
        prefixes = bytearray()
        records = bytearray()
        names = bytearray()
        ids: list[int] = []

        def named(name: str, credential_id: str) -> int:
            at = len(names)
            encoded = name.encode()
            own_id = b"" if credential_id == name else credential_id.encode()
            names.extend(NAME_LENGTH.pack(len(encoded)) + encoded + bytes([len(own_id)])
                         + own_id)
            ids.append(id_hash(credential_id) << 32 | len(ids))
            return at

        for digest, policy, name, credential_id in self.codes:
            prefixes += digest[:8]
            records += RECORD.pack(digest[8:], policy, named(name, credential_id))
        totp = bytearray()
        keys = bytearray()
        # Ordered by period: each period's users are one run of records.
        for user in sorted(self.totp, key=lambda user: user.period):
            totp += TOTP_RECORD.pack(len(keys), user.policy, named(user.name, user.id),
                                     user.period, len(user.key), user.digits,
                                     TOTP_DIGESTS.index(user.digest))
            keys += user.key
        ids.sort()
        slim = msgspec.structs.replace(config, codes=[], totp=[])
        return {
            "prefixes": bytes(prefixes), "records": bytes(records),
            "ids": b"".join(i.to_bytes(8, "little") for i in ids), "names": bytes(names),
            "policies": msgspec.msgpack.encode(list(self.policies)),
            "totp": bytes(totp), "keys": bytes(keys),
            "config": msgspec.msgpack.encode(slim),
        }


def _compile(config: Config, fail: ErrorFactory, key: bytes, site_key: bool,
             folder: Path | None, codes: Iterable[CodeConfig] | None = None
             ) -> tuple[_Compiled, RouteTable | None]:
    """Check every credential and gather the book's contents, raising ``fail(key, message)``
    on the first problem. ``codes``: the [[codes]] when they are not in ``config``."""
    tz = zoneinfo.ZoneInfo(config.site.zone)
    number = number_parser(config.site.region, fail)
    compile_gates(config, number, fail)
    compiled = _Compiled({}, [], [])
    ids: set[str] = set()
    digests: dict[bytes, str] = {}

    def claim_id(cred_id: str, where: Key) -> None:
        if cred_id in ids:
            raise fail(where, f"id {cred_id!r} is used twice; give one an explicit id")
        ids.add(cred_id)

    for index, code in enumerate(config.codes if codes is None else codes):
        where: Key = ("codes", index)
        credential = compile_code(code, where, config, tz, number, fail)
        claim_id(credential.id, (*where, "name"))
        digest = code_digest(key, site_key, code.code, code.code_hash, where, fail)
        if digest in digests:
            raise fail((*where, "code" if code.code is not None else "code_hash"),
                       f"the same digits as code {digests[digest]!r}")
        digests[digest] = code.name
        compiled.codes.append((digest, compiled.policy(credential, code.schedule),
                               credential.name, credential.id))
    del digests
    for index, totp in enumerate(config.totp):
        where = ("totp", index)
        credential = compile_totp(totp, where, config, fail)
        claim_id(credential.id, (*where, "name"))
        try:
            otp = pyotp.TOTP(totp.secret, digits=totp.digits, interval=totp.period)
            otp.generate_otp(0)
        except (ValueError, TypeError) as exc:
            raise fail((*where, "secret"),
                       f"not a usable base32 TOTP secret ({exc})") from None
        secret = otp.byte_secret()
        if len(secret) > 0xFFFF or otp.digest().name not in TOTP_DIGESTS:
            raise fail((*where, "secret"), "not a usable TOTP secret (too long)")
        compiled.totp.append(TotpRow(credential.name, credential.id,
                                     compiled.policy(credential, []), secret, totp.digits,
                                     otp.digest().name, totp.period))
    # Built to check the routes' CSV files; a caller that builds the book in
    # this process uses the table instead of reading them again.
    routes = _routes(config, folder, number, fail) if config.routes else None
    return compiled, routes


def compile_gates(config: Config, number: NumberParser,
                  fail: ErrorFactory) -> tuple[dict[str, Gate], dict[str, str]]:
    gates: dict[str, Gate] = {}
    by_number: dict[str, str] = {}
    for name, gate in config.gates.items():
        numbers = []
        for index, raw in enumerate(gate.numbers):
            value = number(raw, ("gates", name, "numbers", index))
            if value in by_number:
                raise fail(("gates", name, "numbers", index),
                           f"{value} already selects gate {by_number[value]!r}")
            by_number[value] = name
            numbers.append(value)
        callers = [number(raw, ("gates", name, "callers", i)) for i, raw in enumerate(gate.callers)]
        gates[name] = Gate(name, frozenset(numbers), frozenset(callers))
    return gates, by_number


def _routes(config: Config, folder: Path | None, number: NumberParser,
            fail: ErrorFactory) -> RouteTable:
    return compile_routes(
        [(("routes", i), route, config_mod.resolve_in(folder, route.file) if route.file else None)
         for i, route in enumerate(config.routes)], number, fail, config.site.region)


def open_book(image: bookfile.Image, config: Config, *, key: bytes, site_key: bool,
              folder: Path | None, fail: ErrorFactory = _plain_error,
              routes: RouteTable | None = None) -> CodeBook:
    """The code book over a compiled image; gates and routes come from ``config``.

    ``key``: the key the image's digests were made with (the site key, or a
    throw-away one when there is none: ``site_key`` False).
    """
    tz = zoneinfo.ZoneInfo(config.site.zone)
    number = number_parser(config.site.region, fail)
    gates, by_number = compile_gates(config, number, fail)
    policies = [_credential(policy) for policy in image.decode("policies", list[Policy])]
    static = StaticCodes(as_u64(image.section("prefixes")), image.section("records"),
                         as_u64(image.section("ids")), image.section("names"), policies,
                         image.section("totp"), image.section("keys"))
    book = CodeBook(gates=gates, by_number=by_number, totp=static.totp_tables(key), tz=tz,
                    region=config.site.region, static=static, key=key, site_key=site_key)
    if config.routes:
        book.routes = routes if routes is not None else _routes(config, folder, number, fail)
    return book


def _credential(policy: Policy) -> Credential:
    """A policy as a credential without id or name (``Credential.named`` gives them)."""
    kind: Kind = policy.kind  # type: ignore[assignment]
    return Credential(
        id="", name="", kind=kind, gates=_shared_set(policy.gates),
        valid_from=policy.valid_from, valid_until=policy.valid_until,
        schedule=_shared_schedule(policy.schedule) if policy.schedule else None,
        max_uses=policy.max_uses, callers=_shared_set(policy.callers),
        callername=policy.callername, destination=policy.destination)


def compile_image(config: Config, fail: ErrorFactory, *, key: bytes, site_key: bool,
                  folder: Path | None, sources: dict[str, tuple[str, bytes]],
                  codes: Iterable[CodeConfig] | None = None
                  ) -> tuple[bytes, RouteTable | None]:
    """The compiled book's bytes, and the route table built while checking."""
    compiled, routes = _compile(config, fail, key, site_key, folder, codes)
    return bookfile.build(compiled.sections(config), codes=len(compiled.codes),
                          sources=sources), routes


def code_digest(key: bytes, site_key: bool, code: str | None, hashed: str | None,
                where: Key, error: ErrorFactory) -> bytes:
    """The lookup digest of a credential given as digits or as a keyed hash."""
    if (code is None) == (hashed is None):
        raise error((*where, "code"), "give exactly one of code and code_hash")
    if code is not None:
        if not CODE_RE.fullmatch(code):
            raise error((*where, "code"), "a code is 4 to 16 digits")
        return sitekey.digest(key, code)
    assert hashed is not None
    digest = sitekey.parse_hash(hashed)
    if digest is None:
        raise error((*where, "code_hash"), "expected hmac-sha256: and 64 hex digits "
                    "(made by `gated codes hash`)")
    if not site_key:
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


# -- loading ------------------------------------------------------------------

@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while a config is built.

    Parsing makes millions of containers that all live on, and each full
    collection while they pile up scans every one made so far: with 100,000
    codes that was a third of the load time, for nothing collected.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


KeyReader = Callable[[Config], bytes | None]


@_gc_paused()
def parse(text: str, *, source: str = "", key: KeyReader | None = None,
          staff: bool = False) -> tuple[Config, CodeBook]:
    """Parse TOML text into a checked Config and the code book compiled from it
    (in memory: commands and tests; the daemon's goes through a file)."""
    config, fail = config_mod.parse(text, source=source, staff=staff)
    site_key = key(config) if key is not None else None
    folder = Path(source).resolve().parent if source else None
    # Without a site key the book uses a throw-away one: lookups work the
    # same, but no code_hash can be checked.
    lookup_key = site_key if site_key is not None else os.urandom(32)
    data, routes = compile_image(config, fail, key=lookup_key, site_key=site_key is not None,
                                 folder=folder, sources={})
    return config, open_book(bookfile.image(data), config, key=lookup_key,
                             site_key=site_key is not None, folder=folder, fail=fail,
                             routes=routes)


def _read(path: str | os.PathLike[str] | None) -> tuple[Path, Path, bytes]:
    file = Path(path if path is not None else config_mod.default_path())
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", file=str(file)) from exc
    return file, file.resolve(), data


def _text(file: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError("not UTF-8 text", file=str(file)) from exc


def _sources(source: Path, config_digest: bytes, config: Config,
             key_path: Path) -> dict[str, tuple[str, bytes]]:
    return {
        "config": (str(source), config_digest),
        "key": (str(key_path), bookfile.file_digest(key_path)),
        "timezone": (config.site.zone, bookfile.timezone_digest(config.site.zone)),
        "compiler": ("", bookfile.compiler_digest()),
    }


def load(path: str | os.PathLike[str] | None, *, create_key: bool = False,
         staff: bool = False) -> Loaded:
    """Read, parse and check a config file in this process, or raise ConfigError
    naming key and line.

    The code book is compiled with the site key; ``create_key`` makes one
    when there is none yet (the daemon does, a read-only check does not).
    ``staff``: the broker commands' load, for which a staff machine's file of
    ``[site] id`` and ``[mqtt]`` is enough.
    None means the default path ($GATED_CONFIG or /etc/gated/gated.toml).
    """
    file, source, data = _read(path)
    text = _text(file, data)

    def site_key(config: Config) -> bytes | None:
        where = config_mod.key_path(source, config)
        return sitekey.ensure_key(where) if create_key else sitekey.read_key(where)

    config, book = parse(text, source=str(file), key=site_key, staff=staff)
    # Absolute, so a reload still finds it after the daemon changed directory.
    return Loaded(config=config, path=file.absolute(), book=book, source=source)


# Where [log] path is, found without parsing a large file: only a hint. The
# book found there is used only if its recorded sources match this very
# file, so a wrong hint costs a compile, never a wrong book.
# (Searched in the file's bytes, mapped: a 14 MB file costs no copy.)
_LOG_TABLE = re.compile(rb"^[ \t]*\[[ \t]*log[ \t]*\][ \t]*(?:#.*)?$", re.MULTILINE)
_NEXT_TABLE = re.compile(rb"^[ \t]*\[", re.MULTILINE)
_LOG_PATH = re.compile(rb"""^[ \t]*path[ \t]*=[ \t]*(?:"([^"\\\n]*)"|'([^'\n]*)')""",
                       re.MULTILINE)


# Before the first table: ``log.path = "..."`` or ``log = { path = "..." }``.
_TOP_LOG_PATH = re.compile(
    rb"""^[ \t]*log[ \t]*(?:\.[ \t]*|=[ \t]*\{[^}\n]*\b)path[ \t]*=[ \t]*"""
    rb"""(?:"([^"\\\n]*)"|'([^'\n]*)')""", re.MULTILINE)


def _hinted(file: Path) -> Path | None:
    """``hinted_book`` of the file at ``file``, read mapped (None: unreadable or empty:
    the full load says why)."""
    try:
        with file.open("rb") as opened:
            data = mmap.mmap(opened.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError):
        return None
    try:
        return hinted_book(file.resolve(), data)
    finally:
        data.close()


def hinted_store(path: str | os.PathLike[str] | None) -> Path | None:
    """Where the entry store of the config at ``path`` most likely is (None: unreadable)."""
    book = _hinted(Path(path if path is not None else config_mod.default_path()))
    return None if book is None else book.with_name(book.name.removesuffix(".book"))


def hinted_book(source: Path, data: bytes | mmap.mmap) -> Path:
    """Where the compiled book of this config file most likely is."""
    first = _NEXT_TABLE.search(data)
    found = _TOP_LOG_PATH.search(data, 0, first.start() if first else len(data))
    table = _LOG_TABLE.search(data) if found is None else None
    if table is not None:
        end = _NEXT_TABLE.search(data, table.end())
        found = _LOG_PATH.search(data, table.end(), end.start() if end else len(data))
    path = LogConfig().path
    if found is not None:
        raw = found.group(1) if found.group(1) is not None else found.group(2)
        path = raw.decode("utf-8", "replace")
    return bookfile.book_path(config_mod.resolve_state(source, path))


def _fresh(header: bookfile.Header, source: Path, config_digest: bytes) -> bool:
    """Whether a book was compiled from exactly these sources."""
    sources = header.sources
    if sources.get("config") != (str(source), config_digest):
        return False
    if sources.get("compiler", ("", b""))[1] != bookfile.compiler_digest():
        return False
    key_path, key_digest = sources.get("key", ("", b""))
    if not key_digest or bookfile.file_digest(Path(key_path)) != key_digest:
        return False
    zone, zone_digest = sources.get("timezone", ("", b""))
    return bool(zone) and bookfile.timezone_digest(zone) == zone_digest


def _mapped(file: Path, book_file: Path, origin: str = "mapped") -> Loaded:
    """The Loaded of a compiled book file (BookError if it cannot be used)."""
    image = bookfile.map_file(book_file)
    # The file the book was compiled from: what ``file`` named then.
    source = Path(image.header.sources["config"][0])
    try:
        config = image.decode("config", Config)
    except msgspec.ValidationError as exc:
        raise bookfile.BookError(f"config section: {exc}") from None
    # What the file says was checked when it was compiled; what the checks
    # read from this machine (an optional package installed) is checked now.
    try:
        config_mod.check(config, _plain_error)
    except ConfigError as exc:
        # Rare: parse the file after all, for the error with its line.
        file, _, data = _read(file)
        config_mod.parse(_text(file, data), source=str(file))
        raise ConfigError(exc.detail, path=exc.path, file=str(file)) from None
    key_path, key_digest = image.header.sources["key"]
    key = sitekey.read_key(Path(key_path))
    if key is None or bookfile.file_digest(Path(key_path)) != key_digest:
        raise bookfile.BookError("the site key changed")
    book = open_book(image, config, key=key, site_key=True, folder=source.parent,
                     fail=_located(str(file)))
    return Loaded(config=config, path=file.absolute(), book=book, source=source,
                  origin=origin)


def _located(file: str) -> ErrorFactory:
    def fail(key: Key, message: str) -> ConfigError:
        from gated.core.tomlpos import format_path

        return ConfigError(message, path=format_path(key), file=file)

    return fail


def cached(path: str | os.PathLike[str] | None) -> Loaded | None:
    """The compiled book of an unchanged config, mapped; None when it must be compiled."""
    file = Path(path if path is not None else config_mod.default_path())
    book_file = _hinted(file)
    header = None if book_file is None else bookfile.peek(book_file)
    # Hashed from a read buffer, not a mapping: mapped pages would count in
    # this process's memory until unmapped.
    if header is None or not _fresh(header, file.resolve(), bookfile.file_digest(file)):
        return None
    assert book_file is not None
    try:
        return _mapped(file, book_file)
    except (bookfile.BookError, OSError, ValueError):  # replaced or gone meanwhile
        return None


def compile_to_file(path: str | os.PathLike[str]) -> Path:
    """Compile the config at ``path`` into its book file (the child's work), unless
    the one there is fresh and whole; the book's path.

    Raises ConfigError for a bad config, OSError or files.FileError when the
    book cannot be written.
    """
    file, source, data = _read(path)
    hinted = hinted_book(source, data)
    header = bookfile.peek(hinted)
    config_digest = bookfile.sha256(data)
    if header is not None and _fresh(header, source, config_digest):
        try:
            bookfile.map_file(hinted)  # whole, checksum and all
            return hinted
        except bookfile.BookError:
            pass  # damaged: compiled again below
    text = _text(file, data)
    del data
    with _gc_paused():
        config, fail, codes = config_mod.parse_streamed(text, source=str(file))
        key_path = config_mod.key_path(source, config)
        key = sitekey.ensure_key(key_path)
        folder = source.parent
        image, _ = compile_image(config, fail, key=key, site_key=True, folder=folder,
                                 sources=_sources(source, config_digest, config, key_path),
                                 codes=codes)
        target = bookfile.book_path(config_mod.resolve_state(source, config.log.path))
        del config, text, codes
    files.make_dir(target.parent)
    bookfile.write(target, image)
    return target


# -- the child process --------------------------------------------------------

class CompileFailed(ConfigError):
    """The child could not compile (not a config error): crashed, killed, no memory."""


# A reload's compile of 100,000 codes takes seconds here, half a minute on a
# Pi Zero 2 W; one that takes ten minutes is stuck.
RELOAD_COMPILE_TIMEOUT = 600.0


def _command(path: Path) -> list[str]:
    # -P: `-m` would put the working directory first on the import path, and a
    # daemon started beside a clone named gated would compile with the clone's
    # config/ as gated.config. Not -I: that would drop PYTHONPATH too.
    return [sys.executable, "-P", "-m", "gated", CHILD_COMMAND, str(path)]


def _outcome(file: Path, returncode: int, output: bytes) -> Path | str:
    """The book the child wrote, or why it could not write one; raises ConfigError."""
    try:
        said = json.loads(output.decode() or "{}")
    except (UnicodeDecodeError, json.JSONDecodeError):
        said = {}
    if returncode == 0 and "book" in said:
        return Path(said["book"])
    if "error" in said:
        error = said["error"]
        raise ConfigError(error["detail"], path=error.get("path", ""),
                          line=error.get("line"), file=error.get("file", str(file)))
    if "unwritten" in said:
        return str(said["unwritten"])
    if returncode == -signal.SIGKILL:
        why = "killed (out of memory?)"
    elif returncode < 0:
        why = f"killed by signal {-returncode}"
    else:
        why = f"exit status {returncode}"
    raise CompileFailed(f"compiling the code book failed: {why}", file=str(file))


def load_for_daemon(path: str | os.PathLike[str] | None) -> Loaded:
    """The daemon's start: the compiled book if fresh, else compiled by a child and mapped.

    Where the book cannot be written (a full or read-only state directory),
    the daemon compiles in its own process and keeps it in memory: a site
    must come up after a power cut even then.
    """
    hit = cached(path)
    if hit is not None:
        return hit
    file = Path(path if path is not None else config_mod.default_path())
    try:
        done = subprocess.run(_command(file), stdout=subprocess.PIPE, check=False)  # noqa: S603
    except OSError:
        # No child to be had (no processes left, the interpreter unreadable
        # to this user): compile here rather than not start.
        return load(file, create_key=True)
    return _after_child(file, done.returncode, done.stdout)


async def load_in_child(path: Path, *, within: float = RELOAD_COMPILE_TIMEOUT) -> Loaded:
    """A reload: the child compiles (if anything changed), this process maps the result.

    A child still compiling after ``within`` seconds is killed and the reload
    refused: the reloads after it must not queue behind it for ever.
    """
    try:
        child = await asyncio.create_subprocess_exec(*_command(path), stdout=subprocess.PIPE)
    except OSError:
        return await asyncio.to_thread(load, path, create_key=True)
    try:
        async with asyncio.timeout(within):
            output, _ = await child.communicate()
    except TimeoutError:
        child.kill()
        await child.wait()
        raise CompileFailed(f"compiling the code book took over {within:.0f} s; killed",
                            file=str(path)) from None
    except asyncio.CancelledError:  # the daemon stops: leave no compiler behind
        child.kill()
        # Reaped, and its pipe read to the end: nothing of it outlives the stop.
        await child.communicate()
        raise
    assert child.returncode is not None
    return await asyncio.to_thread(_after_child, path, child.returncode, output)


def _after_child(file: Path, returncode: int, output: bytes) -> Loaded:
    book_file = _outcome(file, returncode, output)
    if isinstance(book_file, Path):
        try:
            return _mapped(file, book_file, "compiled")
        except (bookfile.BookError, OSError, ValueError) as exc:
            # Changed again meanwhile, or damaged: compile here instead.
            reason = str(exc)
    else:
        reason = book_file
    return msgspec.structs.replace(load(file, create_key=True), unkept=reason)


NO_TIMEZONE = ("[site] timezone is not set: times without an offset (valid_from, "
               "valid_until, schedules) are read as UTC; set it, e.g. "
               'timezone = "Europe/Amsterdam"')


def warn_unkept(loaded: Loaded) -> None:
    """Log what the daemon should say once the log is set up: a book that could not
    be kept, a site without a time zone."""
    if loaded.config.site.timezone is None:
        log.warning(NO_TIMEZONE)
    if loaded.unkept:
        log.warning("code book not kept in the state directory; compiled in the daemon's "
                    "own process (a restart will compile it again)", reason=loaded.unkept)


def main(argv: list[str] | None = None) -> int:
    """``python -m gated _compile CONFIG``: compile the book; one JSON line on stdout."""
    args = sys.argv[1:] if argv is None else argv
    with contextlib.suppress(OSError):
        os.nice(5)  # the daemon's calls go first
    try:
        book = compile_to_file(args[0])
        said: dict[str, object] = {"book": str(book)}
        status = 0
    except ConfigError as exc:
        said = {"error": {"detail": exc.detail, "path": exc.path, "line": exc.line,
                          "file": exc.file}}
        status = 2
    except OSError as exc:
        said = {"unwritten": exc.strerror or str(exc)}
        status = 3
    except Exception as exc:  # files.FileError and the like: the daemon compiles itself
        said = {"unwritten": str(exc)}
        status = 3
    sys.stdout.write(json.dumps(said) + "\n")
    return status


# -- the config in force: what a reload would be compared with ----------------------


def in_force_path(store_path: Path) -> Path:
    return store_path.with_name(f"{store_path.name}.config.json")


def keep_in_force(loaded: Loaded) -> None:
    """Keep the config the daemon runs with (its credentials left out) beside the store,
    so `gated check-config` can say whether a reload applies an edited file."""
    try:
        files.replace(in_force_path(loaded.store_path), msgspec.json.encode(loaded.config))
    except (files.FileError, OSError) as exc:
        log.warning("the config in force could not be kept; check-config cannot say "
                    "whether a reload applies an edit", error=str(exc))


def read_in_force(store_path: Path) -> Config | None:
    """The config the daemon last ran with, None when none is kept (or it is unreadable)."""
    try:
        data = in_force_path(store_path).read_bytes()
        return msgspec.json.decode(data, type=Config)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return None
