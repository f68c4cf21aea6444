"""A compiled book's insides are checked once, when it is mapped or installed: a book
whose checksum is good but whose sections lie (a set forged or mis-built elsewhere, a
local file written by hand) is refused in one line, and one that passes never fails a
reader later."""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gated.book import bookfile, codeset, compiler, sitekey
from gated.book import config as config_mod
from gated.book.codes import RECORD, TOTP_RECORD, StaticCodes, as_u64
from gated.book.codeset import Entry, SetError, SetPolicy
from gated.core.credential import Credential
from tests.helpers import config_text

Sections = dict[str, bytearray]

FLEET_KEY = bytes(range(32))
SET_CODES = 40
POLICIES = [SetPolicy(gates=("*",)), SetPolicy(gates=("barrier",), max_uses=3),
            SetPolicy(gates=("door",), callername="Hi")]

TOTP_USERS = """
[[totp]]
name = "Flat 1"
secret = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
gates = ["barrier"]

[[totp]]
name = "Flat 2"
id = "flat-2"
secret = "KRSXG5DSNFXGOIDBKRSXG5DSNFXGOIDB"
period = 60
digits = 8
gates = ["door"]
"""


def fleet_set() -> bytes:
    """A real set of 40 fleet codes, three policies, names with and without own ids."""
    return codeset.build([Entry(sitekey.digest(FLEET_KEY, f"{n:08d}"), POLICIES[n % 3],
                                f"Code {n} é", f"c{n}" if n % 2 else f"Code {n} é")
                          for n in range(SET_CODES)])


def site_book() -> bytes:
    """A real site book: the test config's three codes, twenty more, two TOTP users."""
    codes = "".join(f'\n[[codes]]\nname = "Person {n}"\ncode = "{70000 + n}"\n'
                    f'gates = ["barrier"]\n' for n in range(20))
    config, fail = config_mod.parse(config_text(Path("/nonexistent"), codes + TOTP_USERS))
    data, _ = compiler.compile_image(config, fail, key=bytes(32), site_key=True, folder=None,
                                     sources={})
    return data


def sections_of(data: bytes) -> tuple[bookfile.Header, Sections]:
    image = bookfile.image(data)
    return image.header, {name: bytearray(image.section(name)) for name in bookfile.SECTIONS}


def rebuilt(header: bookfile.Header, sections: Sections, codes: int | None = None) -> bytes:
    """The sections made into a book again, with a good checksum: only the insides lie."""
    return bookfile.build({name: bytes(data) for name, data in sections.items()},
                          codes=header.codes if codes is None else codes,
                          sources=header.sources)


def reheadered(data: bytes, **changes: Any) -> bytes:
    """The same body under a header with ``changes`` (no longer than the old one), the
    checksum made good again."""
    header, body = bookfile.read_header(data)
    encoded = msgspec.msgpack.encode(msgspec.structs.replace(header, **changes))
    head = bookfile.MAGIC + len(encoded).to_bytes(bookfile.HEADER_LENGTH, "little") + encoded
    assert len(head) <= body
    # The body starts where the shorter header says: zeros up to where it was.
    start = len(head) + (-len(head) % bookfile.ALIGN)
    moved = head + b"\0" * (start - len(head)) + b"\0" * (body - start) + data[body:]
    header = msgspec.msgpack.decode(encoded, type=bookfile.Header)
    checksum = bookfile.sha256(moved[start:])
    encoded = msgspec.msgpack.encode(msgspec.structs.replace(header, checksum=checksum))
    assert len(encoded) == len(head) - len(bookfile.MAGIC) - bookfile.HEADER_LENGTH
    return bookfile.MAGIC + len(encoded).to_bytes(bookfile.HEADER_LENGTH, "little") + \
        encoded + moved[len(head):]


def set_record(sections: Sections, at: int, *, policy: int | None = None,
               names: int | None = None) -> None:
    tail, old_policy, old_names = RECORD.unpack_from(sections["records"], at * RECORD.size)
    RECORD.pack_into(sections["records"], at * RECORD.size, tail,
                     old_policy if policy is None else policy,
                     old_names if names is None else names)


def swap_rows(sections: Sections, first: int, second: int) -> None:
    for name, size in (("prefixes", 8), ("records", RECORD.size)):
        data = sections[name]
        a, b = data[first * size:(first + 1) * size], data[second * size:(second + 1) * size]
        data[first * size:(first + 1) * size], data[second * size:(second + 1) * size] = b, a


def copy_row(sections: Sections, source: int, target: int) -> None:
    """Give row ``target`` the digest of row ``source`` (its policy and names stay)."""
    sections["prefixes"][target * 8:target * 8 + 8] = sections["prefixes"][source * 8:
                                                                           source * 8 + 8]
    records = sections["records"]
    records[target * RECORD.size:target * RECORD.size + 24] = \
        records[source * RECORD.size:source * RECORD.size + 24]


def set_name_length(sections: Sections, at: int) -> None:
    """Make record ``at``'s name as long as a name can say."""
    names = RECORD.unpack_from(sections["records"], at * RECORD.size)[2]
    sections["names"][names:names + 2] = b"\xff\xff"


def negative_names(data: bytes) -> bytes:
    header, _ = bookfile.read_header(data)
    offset, _ = header.sections["names"]
    return reheadered(data, sections={**header.sections, "names": (offset, -1)})


def set_id(sections: Sections, at: int, value: int) -> None:
    struct.pack_into("<Q", sections["ids"], at * 8, value)


def set_totp(sections: Sections, at: int, **fields: int) -> None:
    names = ("key", "policy", "names", "period", "key_length", "digits", "digest")
    values = dict(zip(names, TOTP_RECORD.unpack_from(sections["totp"], at * TOTP_RECORD.size),
                      strict=True))
    values.update(fields)
    TOTP_RECORD.pack_into(sections["totp"], at * TOTP_RECORD.size, *values.values())


Corruption = Callable[[bookfile.Header, Sections], bytes]


def edit(change: Callable[[Sections], None]) -> Corruption:
    def corrupt(header: bookfile.Header, sections: Sections) -> bytes:
        change(sections)
        return rebuilt(header, sections)
    return corrupt


def cut(name: str, size: int) -> Corruption:
    def change(sections: Sections) -> None:
        del sections[name][len(sections[name]) - size:]
    return edit(change)


SET_CORRUPTIONS: dict[str, tuple[Corruption, str]] = {
    "truncated prefixes": (cut("prefixes", 3), r"^prefixes section: 317 bytes, not a whole "
                                               r"number of 8-byte digests$"),
    "a prefix short": (cut("prefixes", 8), r"^the header counts 40 codes, the prefixes "
                                           r"section 39$"),
    "truncated records": (cut("records", RECORD.size),
                          r"^records section: 1248 bytes, not 40 records of 32$"),
    "policy index past the table": (edit(lambda s: set_record(s, 5, policy=3)),
                                    r"^record 5 points to policy 3, past the table of 3$"),
    "name offset past the end": (edit(lambda s: set_record(s, 7, names=10_000)),
                                 r"^the names of record 7 are not where the record says$"),
    "a name longer than its section": (edit(lambda s: set_name_length(s, SET_CODES - 1)),
                                       r"^the names of record 39 run past the names section$"),
    "names left over": (edit(lambda s: s["names"].extend(b"\0\0\0")),
                        r"^names section: 3 bytes after the last names$"),
    "a name not UTF-8": (edit(lambda s: s["names"].__setitem__(2, 0xFF)),
                         r"^a name or id is not UTF-8 \(byte 2 of the names section\)$"),
    "digests out of order": (edit(lambda s: swap_rows(s, 3, 4)),
                             r"^digests out of order at record 4$"),
    "duplicate digests": (edit(lambda s: copy_row(s, 3, 4)),
                          r"^the same digest twice, at records 3 and 4$"),
    "wrong count in the header": (lambda h, s: rebuilt(h, s, codes=41),
                                  r"^the header counts 41 codes, the prefixes section 40$"),
    "an id short": (cut("ids", 8), r"^ids section: 39 ids for 40 codes and 0 TOTP users$"),
    "an id past the records": (edit(lambda s: set_id(s, SET_CODES - 1, (1 << 64) - 1)),
                               r"^id 39 points to record 4294967295, past the 40 records$"),
    "ids out of order": (edit(lambda s: s["ids"].__setitem__(slice(None), s["ids"][8:]
                                                             + s["ids"][:8])),
                         r"^ids out of order at 39$"),
    "policies unreadable": (edit(lambda s: s["policies"].__setitem__(slice(None), b"\xc1")),
                            r"^policies section cannot be read \(.*\)$"),
    "policies not a table": (edit(lambda s: s["policies"].__setitem__(slice(None), b"\x01")),
                             r"^policies section cannot be read \(.*\)$"),
    "a section missing": (lambda h, s: reheadered(
        rebuilt(h, s), sections={k: v for k, v in h.sections.items() if k != "names"}),
        r"^no names section$"),
    "a section of negative length": (lambda h, s: negative_names(rebuilt(h, s)),
                                     r"^a section lies outside the file$"),
}

SITE_CORRUPTIONS: dict[str, tuple[Corruption, str]] = {
    "truncated TOTP records": (cut("totp", 1),
                               r"^totp section: 35 bytes, not whole TOTP records of 18$"),
    "a TOTP user with no period": (edit(lambda s: set_totp(s, 0, period=0)),
                                   r"^TOTP user 0: a period of 0 s$"),
    "TOTP users out of period order": (edit(lambda s: set_totp(s, 0, period=90)),
                                       r"^TOTP user 1: not ordered by period$"),
    "a TOTP user of seventeen digits": (edit(lambda s: set_totp(s, 1, digits=17)),
                                        r"^TOTP user 1: 17 digits$"),
    "a TOTP digest past the table": (edit(lambda s: set_totp(s, 1, digest=3)),
                                     r"^TOTP user 1: digest 3, past the table of 3$"),
    "a TOTP key past its section": (edit(lambda s: set_totp(s, 1, key=len(s["keys"]))),
                                    r"^TOTP user 1: its key runs past the keys section$"),
    "a TOTP policy past the table": (edit(lambda s: set_totp(s, 0, policy=200)),
                                     r"^TOTP user 0 points to policy 200, past the table of "
                                     r"\d+$"),
    "a TOTP name past the end": (edit(lambda s: set_totp(s, 1, names=len(s["names"]))),
                                 r"^the names of record 24 are not where the record says$"),
    "an id past the TOTP users": (edit(lambda s: set_id(s, 0, 25)),
                                  r"^id 0 points to record 25, past the 25 records$"),
}


@pytest.mark.parametrize("corruption", SET_CORRUPTIONS)
def test_a_set_whose_insides_lie_is_refused_in_one_line(corruption: str) -> None:
    """A fleet set with a good checksum but a section that lies (cut short, an index
    past its table, digests out of order or twice, counts that differ) is refused with
    what is wrong, before anything reads it."""
    corrupt, message = SET_CORRUPTIONS[corruption]
    bad = corrupt(*sections_of(fleet_set()))
    with pytest.raises(bookfile.BookError, match=message):
        bookfile.image(bad)


@pytest.mark.parametrize("corruption", SITE_CORRUPTIONS)
def test_a_site_book_whose_totp_users_lie_is_refused_in_one_line(corruption: str) -> None:
    """A site book's TOTP records are checked as its codes are: period, digits, digest,
    key, policy and names each within what a reader may trust."""
    corrupt, message = SITE_CORRUPTIONS[corruption]
    bad = corrupt(*sections_of(site_book()))
    with pytest.raises(bookfile.BookError, match=message):
        bookfile.image(bad)


def test_real_books_pass_their_check() -> None:
    """What the compiler and staff build is never refused: the empty set, a set, a site book."""
    for data in (codeset.build(()), fleet_set(), site_book()):
        bookfile.image(data)


def test_a_mapped_book_that_is_refused_can_be_let_go(tmp_path: Path) -> None:
    """The mapping of a refused book is closed at once: nothing of the check holds on to it."""
    corrupt, _ = SET_CORRUPTIONS["policy index past the table"]
    path = tmp_path / "set"
    path.write_bytes(corrupt(*sections_of(fleet_set())))
    with pytest.raises(bookfile.BookError, match="past the table"):
        bookfile.map_file(path, checksum=False)


def read_everything(kind: str, data: bytes) -> None:
    """Every read a site or staff makes of a book: each code by its digest, with its
    policy and names; each id; each TOTP user and its codes; a set's entries."""
    image = bookfile.image(data)
    try:
        count = len(codeset.policies(image) if kind == "set"
                    else image.decode("policies", list[compiler.Policy]))
    except (SetError, msgspec.DecodeError):
        return  # policies of the wrong kind: their readers refuse the book (SetError, ValueError)
    static = StaticCodes(as_u64(image.section("prefixes")), image.section("records"),
                         as_u64(image.section("ids")), image.section("names"),
                         [Credential("", "", "code", frozenset())] * count,
                         image.section("totp"), image.section("keys"))
    prefixes = image.section("prefixes")
    records = image.section("records")
    for at in range(len(static)):
        credential = static.credential(at)
        digest = (bytes(prefixes[at * 8:at * 8 + 8])
                  + bytes(records[at * RECORD.size:at * RECORD.size + 24]))
        assert static.index(digest) == at
        static.has_id(credential.id)
    for table in static.totp_tables(bytes(32)).values():
        table.lookup("123456", 1_800_000_000.0)
        for user in table.users:
            static.has_id(user.credential.id)
    if kind == "set":
        list(codeset.entries(image))


_BOOKS = {"set": sections_of(fleet_set()), "site": sections_of(site_book())}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(_BOOKS)), st.sampled_from(bookfile.SECTIONS[:7]),
       st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1,
                max_size=4),
       st.integers(-3, 0))
def test_a_book_that_passes_its_check_never_fails_a_reader(
        kind: str, name: str, changes: list[tuple[int, int]], shorter: int) -> None:
    """Bytes changed anywhere in a section, or a section cut short (and the checksum made
    good again): the book is either refused whole, or every code, id and TOTP user in
    it reads without an error and each code is found by its own digest."""
    header, sections = _BOOKS[kind]
    sections = {key: bytearray(value) for key, value in sections.items()}
    section = sections[name]
    for at, value in changes:
        if section:
            section[at % len(section)] = value
    if shorter:
        del section[shorter:]
    data = rebuilt(header, sections)
    try:
        bookfile.image(data)
    except bookfile.BookError:
        return
    read_everything(kind, data)
