"""The compiled code book: one file in the state directory, mapped at start.

A site with 100,000 codes should not parse 14 MB of TOML and build a million
Python objects after every power cut. The book is compiled once (in a child
process, see ``gated.book.compiler``) into this file, keyed by a digest of
everything it was made from; a start whose sources are unchanged maps the
file and answers at once, and its pages cost the process tens of bytes a code
(and the kernel may drop them under memory pressure and read them back).

Layout: ``MAGIC``, a u32 header length, a msgpack header, then the sections
it lists, each 8-byte aligned:

- ``prefixes``  u64 per code, the digest's first 8 bytes (little-endian), sorted
- ``records``   ``codes.RECORD`` per code, in the same order
- ``ids``       u64 per code and TOTP user, ``id_hash << 32 | record``, sorted
                (TOTP users are records n and on)
- ``names``     per code: u16 length, name, u8 length, id (0: the id is the name)
- ``policies``  msgpack: the distinct policies codes point to
- ``totp``      ``codes.TOTP_RECORD`` per TOTP user, ordered by period
- ``keys``      the TOTP users' decoded secrets
- ``config``    msgpack: the config without its code tables

The header carries a SHA-256 of everything after it (checked on every map: an
SD card's flipped bit must not open a gate) and the sources it was made from,
each with a SHA-256: the config file, the site key, the time-zone rules, the
compiler's own code. A book whose sources differ is compiled again.

A checksum says the bytes are the ones written, not that what wrote them made
a book: a fleet set comes from elsewhere, and anyone who can write the file
can write its checksum. So every book is also checked inside (``check``) once,
as it is mapped, and calls later read it without a check of their own.
"""

from __future__ import annotations

import array
import hashlib
import importlib.resources
import mmap
import operator
import os
import sys
import zoneinfo
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from gated.book import files
from gated.book.codes import RECORD, TOTP_DIGESTS, TOTP_RECORD
from gated.book.config import TOTP_DIGITS, TOTP_PERIOD

MAGIC = b"GATEDBK\x01"
HEADER_LENGTH = 4
ALIGN = 8
SECTIONS = ("prefixes", "records", "ids", "names", "policies", "totp", "keys", "config")
# The modules whose code decides what a compiled book holds: a change to any
# of them (an upgrade) compiles the book again.
COMPILER_MODULES = ("book/bookfile", "book/codes", "book/compiler", "book/config",
                    "core/numbers", "core/schedule", "core/credential", "book/sitekey",
                    "book/routes")


class BookError(Exception):
    """A compiled book that cannot be used (damaged, another format): compile again."""


class Header(msgspec.Struct, frozen=True):
    version: int
    checksum: bytes
    sections: dict[str, tuple[int, int]]  # name -> (offset, length)
    codes: int
    # What the book was made from: name -> (path, sha256 of its bytes or b"").
    sources: dict[str, tuple[str, bytes]]


VERSION = 2


def book_path(store_path: Path) -> Path:
    """Where a site's compiled book lives: beside its store."""
    return store_path.with_name(store_path.name + ".book")


def sha256(data: bytes | memoryview | mmap.mmap) -> bytes:
    return hashlib.sha256(data).digest()


def file_digest(path: Path | None) -> bytes:
    """SHA-256 of a file, b"" when there is none (its absence is a fact too)."""
    if path is None:
        return b""
    try:
        with path.open("rb") as file:
            return hashlib.file_digest(file, "sha256").digest()
    except FileNotFoundError:
        return b""


_compiler: bytes | None = None


def compiler_digest() -> bytes:
    """SHA-256 of the code that compiles books and of the libraries shaping them."""
    global _compiler
    if _compiler is None:
        import phonenumbers

        digest = hashlib.sha256(f"{VERSION} {sys.version} {msgspec.__version__} "
                                f"{phonenumbers.__version__}".encode())
        package = Path(__file__).parent.parent
        for name in COMPILER_MODULES:
            digest.update((package / f"{name}.py").read_bytes())
        _compiler = digest.digest()
    return _compiler


def timezone_digest(key: str) -> bytes:
    """SHA-256 of the rules of time zone ``key``: a tzdata update may move an
    epoch that a code's site-local valid_from was compiled to."""
    for folder in zoneinfo.TZPATH:
        path = Path(folder) / key
        if path.is_file():
            return file_digest(path)
    try:
        resource = importlib.resources.files("tzdata.zoneinfo").joinpath(*key.split("/"))
        return sha256(resource.read_bytes())
    except (ModuleNotFoundError, FileNotFoundError, OSError):
        return sha256(key.encode())


@dataclass(frozen=True)
class Image:
    """A compiled book's bytes (a mapped file, or bytes made in this process)."""

    header: Header
    buffer: memoryview

    def section(self, name: str) -> memoryview:
        offset, length = self.header.sections[name]
        return self.buffer[offset:offset + length]

    def decode(self, name: str, kind: Any) -> Any:
        return msgspec.msgpack.decode(self.section(name), type=kind)


def build(sections: dict[str, bytes], *, codes: int,
          sources: dict[str, tuple[str, bytes]]) -> bytes:
    """The bytes of a compiled book."""
    body = bytearray()
    placed: dict[str, tuple[int, int]] = {}
    for name in SECTIONS:
        data = sections[name]
        body += b"\0" * (-len(body) % ALIGN)
        placed[name] = (len(body), len(data))
        body += data
    checksum = sha256(bytes(body))
    # The header's own length moves every offset, and the offsets its length:
    # settle the two (a step or two; msgpack integers only grow).
    start = 0
    while True:
        shifted = {name: (offset + start, length) for name, (offset, length) in placed.items()}
        header = msgspec.msgpack.encode(Header(VERSION, checksum, shifted, codes, sources))
        needed = _aligned(len(MAGIC) + HEADER_LENGTH + len(header))
        if needed <= start:
            break
        start = needed
    head = MAGIC + len(header).to_bytes(HEADER_LENGTH, "little") + header
    return head + b"\0" * (start - len(head)) + bytes(body)


def _aligned(size: int) -> int:
    return size + (-size % ALIGN)


def read_header(data: bytes | bytearray | memoryview | mmap.mmap) -> tuple[Header, int]:
    """The header and where the body starts; BookError when this is no book."""
    if bytes(data[:len(MAGIC)]) != MAGIC:
        raise BookError("not a compiled code book of this version")
    at = len(MAGIC)
    size = int.from_bytes(data[at:at + HEADER_LENGTH], "little")
    try:
        header = msgspec.msgpack.decode(data[at + HEADER_LENGTH:at + HEADER_LENGTH + size],
                                        type=Header)
    except msgspec.DecodeError as exc:
        raise BookError(f"damaged header ({exc})") from None
    if header.version != VERSION:
        raise BookError(f"format {header.version}, not {VERSION}")
    return header, _aligned(at + HEADER_LENGTH + size)


def image(data: bytes | bytearray | mmap.mmap, *, checksum: bool = True,
          inside: bool = True) -> Image:
    """Check a whole book (header, checksum, insides) and return it for reading.

    ``checksum`` False: the caller checks a digest of the whole file itself (a
    fleet set, named by its SHA-256), so the body is not hashed twice.
    ``inside`` False: the caller checked these very bytes with ``check`` (a
    fleet set as it arrived, before its file was written), so not twice.
    """
    header, body = read_header(data)
    view = memoryview(data)
    problem = None
    if checksum and sha256(view[body:]) != header.checksum:
        problem = "checksum mismatch: the file is damaged"
    elif any(offset < body or length < 0 or offset + length > len(view)
             for offset, length in header.sections.values()):
        problem = "a section lies outside the file"
    elif inside:
        try:
            check(Image(header, view))
        except BookError as exc:
            # Kept as text: the exception's frames hold views of the mapping,
            # which could not be closed while they live.
            problem = str(exc)
    if problem is not None:
        view.release()  # so a mapping can be closed at once
        raise BookError(problem)
    return Image(header, view)


def check(image: Image) -> None:
    """Refuse a book whose sections do not hold what their readers trust; BookError
    saying in one line what is wrong.

    Lookups index into the sections unchecked (a call must not pay for checks),
    so here, once: every section there and of whole records, the counts agree,
    digests sorted and each there once, every policy, names, record and key
    index within its section, names and ids UTF-8, TOTP periods, digits and
    digests that make codes. Done in bulk (arrays, C-level maps), as a restart
    of 100,000 codes must still answer within two seconds on a Pi.

    An id's hash is not checked against its id: a wrong one makes ``has_id``
    miss that id, and breaks no read.
    """
    header = image.header
    for name in SECTIONS:
        if name not in header.sections:
            raise BookError(f"no {name} section")
    prefixes = _words(image.section("prefixes"), "Q", "prefixes section: {} bytes, not a "
                      "whole number of 8-byte digests")
    codes = len(prefixes)
    if header.codes != codes:
        raise BookError(f"the header counts {header.codes} codes, the prefixes section {codes}")
    records = image.section("records")
    if len(records) != codes * RECORD.size:
        raise BookError(f"records section: {len(records)} bytes, not {codes} records of "
                        f"{RECORD.size}")
    totp = image.section("totp")
    if len(totp) % TOTP_RECORD.size:
        raise BookError(f"totp section: {len(totp)} bytes, not whole TOTP records of "
                        f"{TOTP_RECORD.size}")
    try:
        policies = len(msgspec.msgpack.decode(image.section("policies"),
                                              type=list[msgspec.Raw]))
    except msgspec.DecodeError as exc:
        raise BookError(f"policies section cannot be read ({exc})") from None
    _check_digests(prefixes.tolist(), records)
    # A RECORD is words: the digest's tail, then the policy, then where the names are.
    step = RECORD.size // 4
    words = _words(records, "I", "")
    policy_of, names_of = words[step - 2::step], words[step - 1::step]
    if codes and max(policy_of) >= policies:
        at = next(at for at, policy in enumerate(policy_of) if policy >= policies)
        raise BookError(f"record {at} points to policy {policy_of[at]}, past the table of "
                        f"{policies}")
    totp_names = _check_totp(totp, policies, len(image.section("keys")))
    _check_names(image.section("names"), [*names_of, *totp_names])
    _check_ids(image.section("ids"), codes, len(totp_names))


def _words(view: memoryview, kind: str, problem: str) -> array.array[int]:
    """A section's little-endian words, copied (a copy holds no view of a mapping)."""
    words = array.array(kind)
    if len(view) % words.itemsize:
        raise BookError(problem.format(len(view)))
    words.frombytes(view)
    if sys.byteorder == "big":
        words.byteswap()
    return words


def _check_digests(prefixes: list[int], records: memoryview) -> None:
    """Sorted, each once: a lookup's binary search finds a code only then."""
    if all(map(operator.lt, prefixes, prefixes[1:])):
        return
    # Equal prefixes are a 1-in-2^64 chance for a pair: their tails decide.
    for at in range(1, len(prefixes)):
        if prefixes[at - 1] < prefixes[at]:
            continue
        if prefixes[at - 1] == prefixes[at]:
            before = bytes(records[(at - 1) * RECORD.size:(at - 1) * RECORD.size + 24])
            tail = bytes(records[at * RECORD.size:at * RECORD.size + 24])
            if before < tail:
                continue
            if before == tail:
                raise BookError(f"the same digest twice, at records {at - 1} and {at}")
        raise BookError(f"digests out of order at record {at}")


def _check_totp(totp: memoryview, policies: int, keys: int) -> list[int]:
    """Each TOTP user's record makes codes; where each one's names are."""
    names: list[int] = []
    period_before = 0
    for user, (key, policy, at, period, length, digits, digest) in enumerate(
            TOTP_RECORD.iter_unpack(totp)):
        if policy >= policies:
            raise BookError(f"TOTP user {user} points to policy {policy}, past the table of "
                            f"{policies}")
        if key + length > keys:
            raise BookError(f"TOTP user {user}: its key runs past the keys section")
        if not TOTP_PERIOD[0] <= period <= TOTP_PERIOD[1]:
            raise BookError(f"TOTP user {user}: a period of {period} s")
        if period < period_before:
            raise BookError(f"TOTP user {user}: not ordered by period")
        if not TOTP_DIGITS[0] <= digits <= TOTP_DIGITS[1]:
            raise BookError(f"TOTP user {user}: {digits} digits")
        if digest >= len(TOTP_DIGESTS):
            raise BookError(f"TOTP user {user}: digest {digest}, past the table of "
                            f"{len(TOTP_DIGESTS)}")
        period_before = period
        names.append(at)
    return names


def _check_names(section: memoryview, starts: list[int]) -> None:
    """The names of every record (codes, then TOTP users) one after another, as written,
    each name and id UTF-8."""
    names = bytearray(section)
    end = record = 0
    try:
        for record, start in enumerate(starts):
            if start != end:
                raise BookError(f"the names of record {record} are not where the record says")
            id_at = start + 2 + (names[start] | names[start + 1] << 8)
            end = id_at + 1 + names[id_at]
            # The lengths are no text: made ASCII, the whole section is UTF-8
            # exactly when each name and id is (one decode, not one a name).
            names[start] = names[start + 1] = names[id_at] = 0
    except IndexError:
        raise BookError(f"the names of record {record} run past the names section") from None
    if end > len(names):
        raise BookError(f"the names of record {record} run past the names section")
    if end < len(names):
        raise BookError(f"names section: {len(names) - end} bytes after the last names")
    try:
        names.decode()
    except UnicodeDecodeError as exc:
        raise BookError(f"a name or id is not UTF-8 (byte {exc.start} of the names "
                        "section)") from None


def _check_ids(section: memoryview, codes: int, users: int) -> None:
    """One id a code and TOTP user, sorted, each naming a record there is."""
    ids = _words(section, "Q", "ids section: {} bytes, not whole 8-byte ids").tolist()
    if len(ids) != codes + users:
        raise BookError(f"ids section: {len(ids)} ids for {codes} codes and {users} TOTP "
                        "users")
    if sorted(ids) != ids:  # sorting what is sorted is one pass, in C
        at = next(at for at in range(1, len(ids)) if ids[at - 1] > ids[at])
        raise BookError(f"ids out of order at {at}")
    records = codes + users
    # An id is its hash << 32 | its record: the record is the low word.
    if ids and max(_words(section, "I", "")[0::2]) >= records:
        at = next(at for at, value in enumerate(ids) if value & 0xFFFF_FFFF >= records)
        raise BookError(f"id {at} points to record {ids[at] & 0xFFFF_FFFF}, past the "
                        f"{records} records")


def peek(path: Path) -> Header | None:
    """The header of the book at ``path`` (no checksum yet), None if there is none."""
    try:
        with os.fdopen(files.open_state(path), "rb") as file:
            head = file.read(64 * 1024)
    except (OSError, files.FileError):  # none, nothing this user may read, a link: compile
        return None
    try:
        return read_header(head)[0]
    except BookError:
        return None


def map_file(path: Path, *, checksum: bool = True, inside: bool = True) -> Image:
    """Map a book read-only and check it whole (see ``image``; BookError for a symbolic
    link)."""
    try:
        fd = files.open_state(path)
    except files.FileError as exc:
        raise BookError(str(exc)) from None
    with os.fdopen(fd, "rb") as file:
        mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        return image(mapped, checksum=checksum, inside=inside)
    except BookError:
        mapped.close()
        raise


def write(path: Path, data: bytes) -> None:
    """Replace the book atomically, readable by the daemon's user only
    (it holds TOTP secrets and the code digests)."""
    files.replace(path, data)
