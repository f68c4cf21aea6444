"""Codes handed out in bulk from a spreadsheet: ``gated codes import FILE.csv``.

Reads a CSV file of codes and checks every line with the rules gated itself
applies to a managed code (``managed.parse`` against the site's config), so a
file that reads cleanly is a file gated will accept line by line (but for
clashes with codes already in force, which only gated sees). No MQTT
here: what this returns is what ``gated codes put`` would publish, one
message's fields per line.

The file (docs/import.md):

- The first line is the header: the column names, in any order, from
  ``name,code,gates,valid_from,valid_until,schedule,max_uses,callers,
  callername,destination`` and ``id``. ``name`` and ``code`` are required; an
  unknown column is an error naming it.
- ``,`` or ``;`` between the fields: a header line with ``;`` and no ``,`` is
  a ``;`` file (Excel writes those where ``,`` is the decimal comma). No
  column name holds either, so the header alone decides, before any value is
  read. A UTF-8 byte-order mark (Excel's "CSV UTF-8") and CRLF line ends are
  fine; blank lines are skipped.
- Several values in one cell (``gates``, ``schedule``, ``callers``) are
  separated by ``;``, not ``,``: a schedule window lists its days with commas
  (``mon,wed 08:00-12:00``), and a ``,`` in a ``,`` file needs the cell
  quoted, which hand-edited files forget. (A ``;`` file needs such a cell
  quoted; Excel does that by itself.) ``*`` in ``gates`` is every gate.
- An empty cell is a field left out, as an option left out of ``codes put``
  (which always sends ``gates``, ``[]`` when there are none: so does this).
  Column names are read in lower case, as a route's CSV file's are.
- ``id`` is the code's id on the broker. Empty or absent, it is made from the
  name alone (``derive_id``), so importing the file again gives every line
  whose name did not change the same id: the same retained message is
  replaced, not a second code added beside it.

All or nothing: every line is read and checked, and any bad line makes the
whole file an error (``BadFile``) naming up to ``MAX_REPORTED`` lines as
``file:line: column: what is wrong``, then how many more; nothing is
returned, so nothing is published. Errors never hold a code's digits: a bad
code cell says what a code must be, a repeated code names the two lines.

The file is streamed: a 100,000-line file holds its rows in memory and little
else (the rows are what the caller publishes).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as dt
import gc
import hashlib
import re
import unicodedata
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import msgspec

from gated.book.config import Config
from gated.book.messages import ID_RE, NotHere, Rejected, Scope, parse
from gated.core.console import parse_time
from gated.core.credential import CODE_RE
from gated.core.errors import ConfigError, GatedError

# In the order ``staff.build_body`` puts them in a message.
FIELDS = ("name", "code", "gates", "valid_from", "valid_until", "schedule", "max_uses",
          "callers", "callername", "destination")
COLUMNS = ("id", *FIELDS)
REQUIRED = ("name", "code")
# Between the values of one cell; see the module docstring for why not ",".
SEPARATOR = ";"
MAX_REPORTED = 20
# A line's bytes: every field of a code at its longest (1,000 callers) fits.
MAX_LINE = 64 * 1024
CODE_RULE = "a code is 4 to 16 digits"
HEADER_NEEDED = (f"expected a header line first: {','.join(FIELDS)} "
                 "(or some of them, separated by , or ;)")
# A derived id: the name's slug, "-", and this many hex digits of its hash.
_SUFFIX = 6
_SLUG_MAX = 64 - 1 - _SUFFIX
_NOT_SLUG = re.compile(r"[^a-z0-9]+")
_DIGITS = re.compile(r"[0-9]{4,}")


class BadFile(GatedError):
    """A CSV file of codes with bad lines; ``problems`` names each (up to MAX_REPORTED).

    One bad line reads as that one line; several as a count, then a line each.
    """

    def __init__(self, path: Path, problems: list[ConfigError], total: int) -> None:
        self.path = path
        self.problems = problems
        self.total = total
        lines = [str(p) for p in problems]
        if total > len(problems):
            lines.append(f"... and {total - len(problems)} more")
        if total == 1 and len(problems) == 1:
            message = lines[0]
        else:
            message = "\n  ".join([f"{path}: {total} bad lines, nothing imported:", *lines])
        super().__init__(message)


@dataclasses.dataclass(frozen=True, slots=True)
class Row:
    """One line of the file: a code's id and the fields of its message."""

    id: str
    # JSON-ready, as ``staff.build_body`` makes them; holds the digits.
    fields: dict[str, Any] = dataclasses.field(repr=False)
    line: int
    # False for a fleet code that names none of this site's gates (other sites may).
    here: bool = True


def derive_id(name: str) -> str:
    """The id of a line without one: made from its name alone, so it is stable.

    A name that is already an id (``flat-12``) is its own id. Any other is its
    slug plus six hex digits of a hash of the name: ``Flat 12`` and ``flat 12``
    get different ids, and each the same one on every import. (A suffix added
    only when two names share a slug would change a line's id when another
    line's name changed: the old code would stay on the broker beside the new.)
    """
    if ID_RE.fullmatch(name):
        return name
    # NFC first: the same name typed on macOS and on Windows is the same id.
    normal = name if name.isascii() else unicodedata.normalize("NFC", name)
    plain = normal if normal.isascii() else (
        unicodedata.normalize("NFKD", normal).encode("ascii", "ignore").decode())
    slug = _NOT_SLUG.sub("-", plain.lower()).strip("-")[:_SLUG_MAX].rstrip("-")
    digest = hashlib.sha256(normal.encode()).hexdigest()[:_SUFFIX]
    return f"{slug or 'code'}-{digest}"


class _Problems:
    """The bad lines found so far: the first MAX_REPORTED kept, all counted.

    A check that echoes a cell (a gate's name, a time) must not echo a code
    that a shifted column put there, this line's or another's: such messages
    are made into errors only at the end, when every code of the file is known.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.kept: list[tuple[int | None, str, str, bool]] = []
        self.total = 0
        self.digits: set[str] = set()  # each run of 4 or more digits in a code cell

    def __call__(self, line: int | None, column: str, message: str, *,
                 echoes: bool = False) -> None:
        self.total += 1
        if len(self.kept) < MAX_REPORTED:
            self.kept.append((line, column, message, echoes))

    def code_cell(self, cell: str) -> None:
        self.digits.update(_DIGITS.findall(cell))

    def error(self) -> BadFile:
        def hide(match: re.Match[str]) -> str:
            return "…" if match[0] in self.digits else match[0]

        return BadFile(self.path, [
            ConfigError(_DIGITS.sub(hide, message) if echoes else message,
                        file=str(self.path), line=line, path=column)
            for line, column, message, echoes in self.kept], self.total)


def read(path: Path, config: Config, *, scope: Scope,
         progress: Callable[[int], None] | None = None) -> list[Row]:
    """The file's codes, each checked as gated would check it; BadFile if any line is bad.

    ``scope`` is where they go: ``site`` codes or ``fleet`` codes (a fleet
    code naming none of this site's gates is kept, with ``here`` False).
    A file that cannot be read at all is a BadFile too.
    """
    problems = _Problems(path)
    rows: list[Row] = []
    # Every row made lives on: collections while they pile up would scan them
    # all again and again, for nothing collected (as compiler.parse does).
    collecting = gc.isenabled()
    gc.disable()
    try:
        with path.open("rb") as stream:
            rows = _read(_Lines(stream), config, scope, problems, progress)
    except OSError as exc:
        problems(None, "", f"cannot read: {exc.strerror or exc}")
    finally:
        if collecting:
            gc.enable()
    if problems.total:
        raise problems.error()
    return rows


def _read(lines: _Lines, config: Config, scope: Scope, problems: _Problems,
          progress: Callable[[int], None] | None = None) -> list[Row]:
    rows: list[Row] = []
    codes: dict[str, int] = {}
    start = 1
    try:
        first = lines.first()
        if first is None:
            problems(1, "", HEADER_NEEDED)
            return rows
        delimiter = ";" if ";" in first and "," not in first else ","
        reader = csv.reader(lines, delimiter=delimiter, strict=True)
        header = _header(next(reader), problems)
        start = reader.line_num + 1
        if header is None:
            return rows
        code_at = header.index("code")
        ids: dict[str, int] = {}
        for cells in reader:
            line, start = start, reader.line_num + 1
            if progress is not None and not line % 1000:
                progress(line)
            if not any(cell.strip() for cell in cells):
                continue
            if len(cells) != len(header):
                problems(line, "", f"expected {len(header)} fields, got {len(cells)}")
                continue
            code = cells[code_at].strip()
            row = _row(dict(zip(header, cells, strict=True)), line, config, scope, problems)
            if row is None:
                problems.code_cell(code)
            elif row.id in ids:
                # Not the id itself: staff may have made an id of the digits.
                problems(line, "id", f"the same id as line {ids[row.id]} (the same name? "
                         "give each line an id)")
            elif code in codes:
                problems(line, "code", f"the same code as line {codes[code]}")
            else:
                ids[row.id] = codes[code] = line
                if not problems.total:
                    rows.append(row)  # once a line is bad, none will be returned
    except csv.Error as exc:
        # The parser's place in the file is lost: the rest cannot be read.
        problems(start, "", f"not valid CSV: {exc}")
    except _Unreadable as exc:
        # Every line after it would be read wrong, or fail the same way.
        problems(lines.number, "", str(exc))
    finally:
        problems.digits.update(codes)
    return rows


class _Unreadable(Exception):
    """A line that cannot be read as text (``_Lines.number`` is its number)."""


class _Lines:
    """The file's lines as text, decoded one at a time.

    Decoding line by line names the line that is not UTF-8 (a whole-file
    decoder only knows a byte offset), and never holds more than a line: a
    line longer than any code's could be is refused before it is all read.
    """

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self.number = 0
        self._first: str | None = None

    def _next(self) -> str | None:
        raw = self._stream.readline(MAX_LINE + 1)
        if not raw:
            return None
        self.number += 1
        if len(raw) > MAX_LINE:
            raise _Unreadable(f"a line of more than {MAX_LINE} bytes: not a file of codes")
        try:
            # Excel's "CSV UTF-8" starts with a byte-order mark.
            return raw.decode("utf-8-sig" if self.number == 1 else "utf-8")
        except UnicodeDecodeError:
            raise _Unreadable('not UTF-8 text: save the sheet as "CSV UTF-8"') from None

    def first(self) -> str | None:
        """The header line, read ahead (None: none there); iteration starts with it."""
        self._first = self._next()
        return self._first if self._first is not None and self._first.strip() else None

    def __iter__(self) -> Iterator[str]:
        assert self._first is not None
        yield self._first
        while (line := self._next()) is not None:
            yield line


def _header(cells: list[str], problem: _Problems) -> list[str] | None:
    names = [cell.strip().lower() for cell in cells]
    if not set(names) & set(COLUMNS):
        # Never echoed: a file without its header starts with a code.
        problem(1, "", HEADER_NEEDED)
        return None
    bad = False
    for name in names:
        if name not in COLUMNS:
            shown = repr(name) if not _DIGITS.search(name) else "with digits"
            problem(1, "", f"unknown column {shown}; the columns are {','.join(COLUMNS)}")
            bad = True
    for name in dict.fromkeys(n for n in names if n in COLUMNS and names.count(n) > 1):
        problem(1, "", f"column {name!r} is there twice")
        bad = True
    for name in REQUIRED:
        if name not in names:
            problem(1, "", f"the {name!r} column is required")
            bad = True
    return None if bad else names


def _row(cells: dict[str, str], line: int, config: Config, scope: Scope,
         problem: _Problems) -> Row | None:
    values = {column: value.strip() for column, value in cells.items()}
    code = values["code"]
    if not CODE_RE.fullmatch(code):
        # Never the value: a near-miss code is most of the digits of a real one.
        problem(line, "code", CODE_RULE)
        return None

    def fail(column: str, message: str) -> None:
        # Some checks echo a cell, which may hold this line's code (a column
        # shifted by hand) within other digits, or another line's code.
        problem(line, column, message.replace(code, "…"), echoes=True)

    name = values["name"]
    code_id = values.get("id", "")
    if code_id and not ID_RE.fullmatch(code_id):
        fail("id", "a code id is 1 to 64 letters, digits, '_', '.' or '-'")
        return None
    if not name and not code_id:
        fail("name", "give a name (or an id)")
        return None
    code_id = code_id or derive_id(name)
    fields: dict[str, Any] = {"name": name or code_id, "code": code,
                              "gates": _split(values.get("gates", ""))}
    for column in ("valid_from", "valid_until"):
        text = values.get(column, "")
        if text:
            try:
                parse_time(text, dt.UTC, column)  # checks; the zone is the daemon's
            except argparse.ArgumentTypeError as exc:
                fail(column, str(exc).removeprefix(f"{column}: "))
                return None
            fields[column] = dt.datetime.fromisoformat(text).isoformat()
    if values.get("schedule"):
        fields["schedule"] = _split(values["schedule"])
    if values.get("max_uses"):
        if not values["max_uses"].isdigit() or not values["max_uses"].isascii():
            fail("max_uses", "a whole number, 1 or more")
            return None
        fields["max_uses"] = int(values["max_uses"])
    if values.get("callers"):
        fields["callers"] = _split(values["callers"])
    for column in ("callername", "destination"):
        if values.get(column):
            fields[column] = values[column]
    body = msgspec.json.encode(fields)
    here = True
    try:
        parse(scope, code_id, body, config)
    except Rejected as exc:
        column, sep, message = str(exc).partition(": ")
        if sep and re.fullmatch(r"[a-z_]+(\[\d+\])?", column):
            fail(column, message)
        else:
            fail("", str(exc))
        return None
    except NotHere:
        here = False  # a fleet code: for the sites that have these gates
    return Row(code_id, fields, line, here)


def _split(cell: str) -> list[str]:
    return [value.strip() for value in cell.split(SEPARATOR) if value.strip()]
