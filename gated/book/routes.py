"""Smart routing: where the PBX puts a known caller through to (DESIGN §11).

A route answers a call that typed no code with ``status=ACK&callername=…&destination=…``
and opens nothing. Callers are E.164 numbers or prefixes ending in ``*``; a
route's CSV file adds one caller a row, with that row's own destination and
callername.

Lookups cost the same for 10 rows or 100,000: an exact number is one dict
lookup, and prefixes sit in one dict per prefix length, probed from the
longest length present to the shortest (at most one probe per length, so at
most 16). The first row found that is valid now on the called number wins,
which is the order §11 asks for: an exact number before any prefix, a longer
prefix before a shorter one, then the rows' own order (the file's routes in
file order, a route's CSV rows at its place, then routes over MQTT by id).

No I/O here but reading a route's CSV file while the config is compiled.
"""

from __future__ import annotations

import bisect
import csv
import datetime as dt
import io
import re
import sys
import zoneinfo
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from gated.book.config import MAX_CALLERNAME, MAX_DESTINATION
from gated.core.errors import ConfigError, NumberError
from gated.core.numbers import normalise_uncached
from gated.core.printable import printable
from gated.core.schedule import ScheduleError, parse_schedule

if TYPE_CHECKING:
    from gated.book.config import ErrorFactory, RouteFields
    from gated.core.credential import Credential
    from gated.core.numbers import NumberParser
    from gated.core.tomlpos import Key

PREFIX_RE = re.compile(r"\+[0-9]{1,15}\*")
CSV_COLUMNS = ("number", "destination", "callername")
# Order of a route among all routes: (0, index) for the file's, (1, id) for MQTT's.
Order = tuple[int, int | str]


class RouteError(ValueError):
    """A route that cannot be applied; the message names the field."""


@dataclass(frozen=True, slots=True, eq=False)
class Route:
    credential: Credential  # name, id and kind "route" for the entry; its schedule
    numbers: frozenset[str] | None  # the called numbers it answers on; None: every one
    order: Order
    callers: tuple[str, ...] = ()  # its keys in the table (routes over MQTT only)


# One caller of a route: the route, then the destination and callername to answer.
Row = tuple[Route, str, str]
Bucket = Row | list[Row]


def _rows(bucket: Bucket) -> list[Row] | tuple[Row]:
    return bucket if isinstance(bucket, list) else (bucket,)


@dataclass(slots=True)
class RouteTable:
    """Every route's callers, for the lookup a call without a code makes."""

    exact: dict[str, Bucket] = field(default_factory=dict)
    # By prefix length (the digits before "*", with the "+"), then by prefix.
    prefixes: dict[int, dict[str, Bucket]] = field(default_factory=dict)
    lengths: tuple[int, ...] = ()  # of ``prefixes``, longest first
    # Called numbers named by routes, with how many routes name each.
    numbers: dict[str, int] = field(default_factory=dict)
    managed: dict[str, Route] = field(default_factory=dict)  # routes over MQTT, by id
    routes: int = 0
    rows: int = 0
    files: list[tuple[str, int]] = field(default_factory=list)  # (file, rows), for a summary

    def find(self, did: str | None, caller: str | None, now: float,
             tz: zoneinfo.ZoneInfo) -> Row | None:
        """The best row for ``caller`` valid at ``now`` on ``did``, or None."""
        if caller is None or not self.rows:
            return None
        local: list[dt.datetime] = []  # the site's time, worked out once if needed

        def first(bucket: Bucket) -> Row | None:
            for row in _rows(bucket):
                route = row[0]
                if route.numbers is not None and did not in route.numbers:
                    continue
                schedule = route.credential.schedule
                if schedule is not None:
                    if not local:
                        local.append(dt.datetime.fromtimestamp(now, tz))
                    if not schedule.contains(local[0]):
                        continue
                return row
            return None

        bucket = self.exact.get(caller)
        if bucket is not None and (row := first(bucket)) is not None:
            return row
        size = len(caller)
        for length in self.lengths:
            if length <= size:
                bucket = self.prefixes[length].get(caller[:length])
                if bucket is not None and (row := first(bucket)) is not None:
                    return row
        return None

    def add(self, route: Route, key: str, destination: str, callername: str) -> None:
        """Add one caller (a number, or a prefix ending in ``*``) of ``route``."""
        # A CRM export names a few desks thousands of times: one string each.
        row: Row = (route, sys.intern(destination) if destination else
                    route.credential.destination, callername or route.credential.callername)
        if key.endswith("*"):
            key = key[:-1]
            table = self.prefixes.get(len(key))
            if table is None:
                table = self.prefixes[len(key)] = {}
                self.lengths = tuple(sorted(self.prefixes, reverse=True))
        else:
            table = self.exact
        bucket = table.get(key)
        if bucket is None:
            table[key] = row
        else:
            rows = _rows(bucket)
            if any(other[0] is route for other in rows):
                return  # a route's first row for a caller is the one that counts
            merged = list(rows)
            bisect.insort(merged, row, key=lambda r: r[0].order)
            table[key] = merged
        self.rows += 1

    def name_numbers(self, route: Route, count: int) -> None:
        for number in route.numbers or ():
            total = self.numbers.get(number, 0) + count
            if total:
                self.numbers[number] = total
            else:
                del self.numbers[number]

    def put(self, route: Route) -> Route | None:
        """Apply a route managed over MQTT in place of its previous version."""
        previous = self.remove(route.credential.id)
        for key in route.callers:
            self.add(route, key, "", "")
        self.name_numbers(route, 1)
        self.managed[route.credential.id] = route
        self.routes += 1
        return previous

    def remove(self, route_id: str) -> Route | None:
        """Withdraw a route managed over MQTT; the one withdrawn, or None."""
        route = self.managed.pop(route_id, None)
        if route is None:
            return None
        for key in route.callers:
            prefix = key.endswith("*")
            table = self.prefixes.get(len(key) - 1, {}) if prefix else self.exact
            stripped = key[:-1] if prefix else key
            bucket = table.get(stripped)
            if bucket is None:
                continue
            rows = [row for row in _rows(bucket) if row[0] is not route]
            self.rows -= len(_rows(bucket)) - len(rows)
            if not rows:
                del table[stripped]
            else:
                table[stripped] = rows[0] if len(rows) == 1 else rows
        self.name_numbers(route, -1)
        self.routes -= 1
        return route


def caller_key(raw: str, where: Key, number: NumberParser, error: ErrorFactory) -> str:
    """A caller as the table keys it: E.164, or an E.164 prefix ending in ``*``."""
    text = raw.strip()
    if text.endswith("*"):
        if not PREFIX_RE.fullmatch(text):
            raise error(where, f"a prefix is + and 1 to 15 digits, then * (as +3120*): {raw!r}")
        return text
    return number(raw, where)


def compile_route(fields: RouteFields, where: Key, order: Order, route_id: str,
                  number: NumberParser, error: ErrorFactory,
                  *, has_file: bool = False) -> Route:
    """Check a route's fields (file or MQTT) and build it; its callers are added apart."""
    from gated.core.credential import Credential

    # A route with a file may leave its answer to the rows (§11): each row that
    # carries none is refused as the file is read; its own callers have no row.
    if not (fields.destination or fields.callername) and (fields.callers or not has_file):
        raise error((*where, "destination"),
                    "a route needs a destination or a callername to answer with")
    if not fields.callers and not has_file:
        raise error((*where, "callers"), "a route needs callers (or a file of them)")
    for key in ("destination", "callername"):
        value = getattr(fields, key)
        if printable(value) != value:
            raise error((*where, key), "control characters are not allowed")
    try:
        schedule = parse_schedule(fields.schedule) if fields.schedule else None
    except ScheduleError as exc:
        raise error((*where, "schedule"), str(exc)) from None
    numbers = (frozenset(number(raw, (*where, "numbers", i)) for i, raw in
                         enumerate(fields.numbers)) if fields.numbers else None)
    credential = Credential(id=route_id, name=fields.name, kind="route", gates=frozenset(),
                            schedule=schedule, callername=fields.callername,
                            destination=fields.destination)
    return Route(credential, numbers, order)


def compile_routes(routes: Iterable[tuple[Key, RouteFields, Path | None]],
                   number: NumberParser, error: ErrorFactory, region: str) -> RouteTable:
    """The file's routes, in file order, each followed by its CSV rows."""
    table = RouteTable()
    for index, (where, fields, path) in enumerate(routes):
        route = compile_route(fields, where, (0, index), fields.name, number, error,
                              has_file=path is not None)
        for i, raw in enumerate(fields.callers):
            table.add(route, caller_key(raw, (*where, "callers", i), number, error), "", "")
        if path is not None:
            before = table.rows
            answered = bool(fields.destination or fields.callername)
            for key, destination, callername in read_csv(path, (*where, "file"), region,
                                                         answered=answered):
                table.add(route, key, destination, callername)
            table.files.append((str(path), table.rows - before))
        table.name_numbers(route, 1)
        table.routes += 1
    return table


# -- CSV files ----------------------------------------------------------------------


def read_csv(path: Path, where: Key, region: str,
             *, answered: bool = True) -> Iterator[tuple[str, str, str]]:
    """(caller key, destination, callername) per row; ConfigError naming file:line.

    ``answered`` False: the route gives no destination or callername of its own,
    so each row must carry one.
    """
    from gated.core.tomlpos import format_path

    def fail(line: int | None, message: str) -> ConfigError:
        return ConfigError(message, file=str(path), line=line, path=format_path(where))

    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise fail(None, f"cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise fail(None, "not UTF-8 text") from None
    if not text.strip():
        raise fail(1, "empty; expected a header row: number,destination,callername")
    first = text.partition("\n")[0]
    # Spreadsheets in many locales export with ";" between the fields.
    delimiter = ";" if ";" in first and "," not in first else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    try:
        header = [cell.strip().lower() for cell in next(reader)]
        unknown = [c for c in header if c not in CSV_COLUMNS]
        if unknown or "number" not in header or len(set(header)) != len(header):
            raise fail(1, "expected a header row of number, destination and callername "
                       f"(number first or not), got {','.join(header)!r}")
        number_at, destination_at, callername_at = (
            header.index(c) if c in header else None for c in CSV_COLUMNS)
        assert number_at is not None
        width = len(header)
        normal = Normaliser(region)
        for cells in reader:
            if len(cells) != width:
                if not cells or (len(cells) == 1 and not cells[0].strip()):
                    continue
                raise fail(reader.line_num, f"expected {width} fields, got {len(cells)}")
            raw = cells[number_at].strip()
            destination = cells[destination_at].strip() if destination_at is not None else ""
            callername = cells[callername_at].strip() if callername_at is not None else ""
            for name, value, most in (("destination", destination, MAX_DESTINATION),
                                      ("callername", callername, MAX_CALLERNAME)):
                if len(value) > most:
                    raise fail(reader.line_num, f"{name}: at most {most} characters")
                if not value.isprintable():
                    raise fail(reader.line_num, f"{name}: control characters are not allowed")
            if not (answered or destination or callername):
                raise fail(reader.line_num, "a row needs a destination or a callername "
                           "(the route gives neither)")
            if raw.endswith("*"):
                if not PREFIX_RE.fullmatch(raw):
                    raise fail(reader.line_num, "a prefix is + and 1 to 15 digits, then * "
                               f"(as +3120*): {raw!r}")
                key = raw
            else:
                try:
                    key = normal(raw)
                except NumberError as exc:
                    raise fail(reader.line_num, f"{exc}: {raw!r}") from None
            yield key, destination, callername
    except csv.Error as exc:
        raise fail(reader.line_num, f"not valid CSV: {exc}") from None


# Separators people and spreadsheets put in numbers; phonenumbers ignores them too.
_SEPARATORS = re.compile(r"[ ()./-]")
_SHAPED = re.compile(r"(\+|0)[0-9]{7,20}")
TAIL = 5


class Normaliser:
    """Numbers of a CSV file to E.164, fast enough for 100,000 rows.

    phonenumbers takes ~30 us a number: 3 s for a large CRM export. What it
    does to a number (the country code added, a trunk prefix dropped) is
    decided by its leading digits and its length, not by its last few digits:
    so the first number of each shape (all but its last five digits) goes
    through phonenumbers, and the rest of that shape take its answer with
    their own last digits. A number whose answer does not end in the digits it
    was given, or that phonenumbers refuses, leaves its shape to phonenumbers
    for every number. (A later number of a good shape that phonenumbers would
    refuse is kept as its digits say; only a caller id of those digits can
    match it.) tests/test_routes.py checks the two agree across regions.
    """

    def __init__(self, region: str) -> None:
        self.region = region
        self.heads: dict[str, str | None] = {}

    def __call__(self, raw: str) -> str:
        text = _SEPARATORS.sub("", raw)
        if not _SHAPED.fullmatch(text):
            return self._exact(raw)
        shape, tail = text[:-TAIL], text[-TAIL:]
        head = self.heads.get(shape, "")
        if head:
            return head + tail
        if head is None:
            return self._exact(raw)
        try:
            value = self._exact(raw)
        except NumberError:
            self.heads[shape] = None
            raise
        self.heads[shape] = value[:-TAIL] if value.endswith(tail) else None
        return value

    def _exact(self, raw: str) -> str:
        value = normalise_uncached(raw, self.region)
        if value is None:
            raise NumberError("not a phone number")
        return value
