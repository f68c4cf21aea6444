"""The code book: gates, caller lists and credentials, in the form lookups need.

Static codes are looked up by a keyed hash of the digits (HMAC-SHA256), never
by comparing digits: the lookup costs the same for 10 or 100,000 codes, and
its timing tells a guesser nothing about how close a guess was.

The file's static codes are held compactly (``StaticCodes``): a sorted array
of digests, one small record per code pointing into a table of the distinct
policies (gates, validity, schedule, limits, answers) that thousands of codes
share, and their names. A ``Credential`` is made for the one code a call
matched. The arrays live in the compiled book (``gated.book.bookfile``), mapped
from the state directory, so a large book costs tens of bytes a code and a
restart reads nothing it does not need.

TOTP codes live in one sorted array per time step of the keyed digests of
every user's current code, built once per step, so a request costs a binary
search by the digest it already has, not one HMAC per person.
"""

from __future__ import annotations

import array
import bisect
import hmac
import os
import struct
import sys
import zlib
import zoneinfo
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import overload

from gated.book import sitekey
from gated.book.routes import RouteTable
from gated.core.credential import Credential, Gate

# How many TOTP steps either side of now are accepted (clock drift, slow typing).
TOTP_WINDOW = 1


# One record per static code after the 8-byte prefix: the digest's other 24
# bytes, the policy's index and where its names start.
RECORD = struct.Struct("<24sII")
NAME_LENGTH = struct.Struct("<H")
# One record per TOTP user, ordered by period: where its key is in the keys
# section, its policy, where its names start, the period, the key's length,
# the digits, and the digest (an index into TOTP_DIGESTS).
TOTP_RECORD = struct.Struct("<IIIHHBB")
TOTP_DIGESTS = ("sha1", "sha256", "sha512")
NOTHING = memoryview(b"")


def id_hash(credential_id: str) -> int:
    """32 bits of an id, for the sorted id index (a match is checked against the name)."""
    return zlib.crc32(credential_id.encode())


def digest_prefix(digest: bytes) -> int:
    return int.from_bytes(digest[:8], "little")


def read_name(names: memoryview, at: int) -> tuple[str, str]:
    """(id, name) of the names section's entry at ``at``: a u16 length and the name,
    then a u8 length and the id (0: the id is the name)."""
    (length,) = NAME_LENGTH.unpack_from(names, at)
    at += NAME_LENGTH.size
    name = bytes(names[at:at + length]).decode()
    at += length
    id_length = names[at]
    credential_id = bytes(names[at + 1:at + 1 + id_length]).decode() if id_length else name
    return credential_id, name


def as_u64(view: memoryview) -> Sequence[int]:
    """An array of little-endian u64 read in place (copied only on a big-endian CPU)."""
    if sys.byteorder == "little":
        return view.cast("Q")
    copy = array.array("Q", bytes(view))
    copy.byteswap()
    return copy


class StaticCodes:
    """The file's static codes, read in place from a compiled book.

    ``prefixes``: the first 8 bytes of each digest as a little-endian u64,
    sorted; ``records``: a ``RECORD`` for each, in the same order; ``ids``:
    ``id_hash(id) << 32 | record``, sorted; ``names``: per code a u16 length
    and the name, then a u8 length and the id (0: the id is the name).
    Lookups are binary searches done in C (``bisect`` over the arrays).
    """

    __slots__ = ("_ids", "_keys", "_names", "_policies", "_prefixes", "_records", "_totp")

    def __init__(self, prefixes: Sequence[int], records: memoryview, ids: Sequence[int],
                 names: memoryview, policies: Sequence[Credential],
                 totp: memoryview = NOTHING, keys: memoryview = NOTHING) -> None:
        self._prefixes = prefixes
        self._records = records
        self._ids = ids
        self._names = names
        self._policies = policies
        self._totp = totp
        self._keys = keys

    @classmethod
    def empty(cls) -> StaticCodes:
        return cls((), NOTHING, (), NOTHING, ())

    def __len__(self) -> int:
        return len(self._prefixes)

    def index(self, digest: bytes) -> int:
        """The record of ``digest``, or -1."""
        prefixes = self._prefixes
        key = digest_prefix(digest)
        at = bisect.bisect_left(prefixes, key)
        tail = digest[8:]
        # Equal prefixes are a 1-in-2^64 chance per pair; the tail decides.
        while at < len(prefixes) and prefixes[at] == key:
            start = at * RECORD.size
            if self._records[start:start + 24] == tail:
                return at
            at += 1
        return -1

    def get(self, digest: bytes) -> Credential | None:
        at = self.index(digest)
        return None if at < 0 else self.credential(at)

    def __contains__(self, digest: bytes) -> bool:
        return self.index(digest) >= 0

    def policy_at(self, at: int) -> Credential:
        """The policy of record ``at`` (shared: no id or name)."""
        policy: int = RECORD.unpack_from(self._records, at * RECORD.size)[1]
        return self._policies[policy]

    def credential(self, at: int) -> Credential:
        policy: int
        names: int
        _, policy, names = RECORD.unpack_from(self._records, at * RECORD.size)
        credential_id, name = self._name(names)
        return self._policies[policy].named(credential_id, name)

    def _name(self, at: int) -> tuple[str, str]:
        return read_name(self._names, at)

    def has_id(self, credential_id: str) -> bool:
        """Whether a code or TOTP user of the book has this id (the index holds
        both: codes are records 0..n-1, TOTP users n and on)."""
        ids = self._ids
        key = id_hash(credential_id)
        at = bisect.bisect_left(ids, key << 32)
        codes = len(self._prefixes)
        while at < len(ids) and ids[at] >> 32 == key:
            record = ids[at] & 0xFFFF_FFFF
            if record < codes:
                names = RECORD.unpack_from(self._records, record * RECORD.size)[2]
            else:
                names = TOTP_RECORD.unpack_from(self._totp, (record - codes) * TOTP_RECORD.size)[2]
            if self._name(names)[0] == credential_id:
                return True
            at += 1
        return False

    def totp_tables(self, key: bytes) -> dict[int, TotpTable]:
        """The TOTP users, a table per period (the records are ordered by period)."""
        tables: dict[int, TotpTable] = {}
        count = len(self._totp) // TOTP_RECORD.size
        start = 0
        while start < count:
            period = TOTP_RECORD.unpack_from(self._totp, start * TOTP_RECORD.size)[3]
            end = start
            while end < count and TOTP_RECORD.unpack_from(
                    self._totp, end * TOTP_RECORD.size)[3] == period:
                end += 1
            tables[period] = TotpTable(users=CompiledUsers(self, start, end), period=period,
                                       key=key)
            start = end
        return tables

    def totp_user(self, at: int) -> TotpUser:
        key, length, digits, digest = self._totp_key(at)
        policy: int
        names: int
        _, policy, names, *_ = TOTP_RECORD.unpack_from(self._totp, at * TOTP_RECORD.size)
        credential_id, name = self._name(names)
        return TotpUser(self._policies[policy].named(credential_id, name),
                        bytes(self._keys[key:key + length]), digits, TOTP_DIGESTS[digest])

    def _totp_key(self, at: int) -> tuple[int, int, int, int]:
        key, _, _, _, length, digits, digest = TOTP_RECORD.unpack_from(
            self._totp, at * TOTP_RECORD.size)
        return key, length, digits, digest

    def totp_secrets(self, start: int, end: int) -> list[tuple[bytes, int, int]]:
        """What makes each user's codes (secret, digits, digest), in order."""
        size = TOTP_RECORD.size
        keys = self._keys
        return [(bytes(keys[key:key + length]), digits, digest)
                for key, _, _, _, length, digits, digest in TOTP_RECORD.iter_unpack(
                    self._totp[start * size:end * size])]

    def totp_codes(self, start: int, end: int, timecode: int) -> Iterator[str]:
        """Each user's code for a time step (no credential is made)."""
        counter = timecode.to_bytes(8, "big")
        keys = bytes(self._keys)  # slices of bytes hash faster than of a mapping
        size = TOTP_RECORD.size
        for key, _, _, _, length, digits, digest in TOTP_RECORD.iter_unpack(
                self._totp[start * size:end * size]):
            yield _code(hmac.digest(keys[key:key + length], counter, TOTP_DIGESTS[digest]),
                        digits)

    def __iter__(self) -> Iterator[Credential]:
        return (self.credential(at) for at in range(len(self)))


@dataclass(frozen=True, slots=True)
class TotpUser:
    credential: Credential
    # The decoded secret and the digest's name: a table build costs one
    # one-shot HMAC per user and time step.
    key: bytes = field(repr=False)
    digits: int = 6
    digest: str = "sha1"

    def code(self, timecode: int) -> str:
        """RFC 6238's code for a time step (RFC 4226 truncation), as pyotp makes it."""
        return _code(hmac.digest(self.key, timecode.to_bytes(8, "big"), self.digest),
                     self.digits)


def _code(mac: bytes, digits: int) -> str:
    offset = mac[-1] & 0x0F
    value = int.from_bytes(mac[offset:offset + 4], "big") & 0x7FFF_FFFF
    modulus: int = 10**digits
    return str(value % modulus).zfill(digits)


class CompiledUsers(Sequence[TotpUser]):
    """The TOTP users of one period in a compiled book, made one at a time on demand."""

    __slots__ = ("_book", "_end", "_start")

    def __init__(self, book: StaticCodes, start: int, end: int) -> None:
        self._book = book
        self._start = start
        self._end = end

    def __len__(self) -> int:
        return self._end - self._start

    @overload
    def __getitem__(self, index: int) -> TotpUser: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[TotpUser]: ...

    def __getitem__(self, index: int | slice) -> TotpUser | Sequence[TotpUser]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        return self._book.totp_user(self._start + index % len(self))

    def codes(self, timecode: int) -> Iterator[str]:
        return self._book.totp_codes(self._start, self._end, timecode)

    def same_codes(self, other: Sequence[TotpUser]) -> bool:
        """Whether ``other`` makes the same codes at the same places (names and gates
        may differ: a step holds only codes and places)."""
        return (isinstance(other, CompiledUsers) and len(other) == len(self)
                and self._book.totp_secrets(self._start, self._end)
                == other._book.totp_secrets(other._start, other._end))


@dataclass(frozen=True, slots=True)
class Step:
    """One time step's codes: their keyed digests' prefixes, sorted, and whose each is."""

    prefixes: array.array[int]
    users: array.array[int]


@dataclass(slots=True)
class TotpTable:
    """The codes every TOTP user may type, one table per time step.

    A step's table holds each user's code for that step as the first 8 bytes
    of its keyed digest (the book's key, as static codes), sorted, and the
    user's index beside it: 12 bytes a user, built once per step (two HMACs a
    user, off the loop). A lookup is a binary search by the typed code's
    digest, so where it lands says nothing of how close the digits were, and a
    hit is confirmed with a constant-time compare of the codes themselves.
    """

    users: Sequence[TotpUser]
    period: int = 30
    key: bytes = field(default_factory=lambda: os.urandom(32), repr=False)
    steps: dict[int, Step] = field(default_factory=dict)

    def lookup(self, code: str, now: float,
               digest: bytes | None = None) -> list[tuple[Credential, int]]:
        """``digest``: the code's keyed digest, when the caller has it already."""
        step = int(now) // self.period
        found: list[tuple[Credential, int]] = []
        key = digest_prefix(digest if digest is not None else sitekey.digest(self.key, code))
        for timecode in range(step - TOTP_WINDOW, step + TOTP_WINDOW + 1):
            table = self.steps.get(timecode)
            if table is None:
                table = self.install(timecode, self.build(timecode))
            prefixes = table.prefixes
            at = bisect.bisect_left(prefixes, key)
            while at < len(prefixes) and prefixes[at] == key:
                user = self.users[table.users[at]]
                if hmac.compare_digest(user.code(timecode), code):
                    found.append((user.credential, timecode))
                at += 1
        return found

    def build(self, timecode: int) -> Step:
        """The table for one step; touches no shared state, so it may run in a thread."""
        users = self.users
        codes = (users.codes(timecode) if isinstance(users, CompiledUsers)
                 else (user.code(timecode) for user in users))
        key = self.key
        # sitekey.digest and digest_prefix, inlined: this runs for every user.
        prefixes = [int.from_bytes(hmac.digest(key, code.encode(), "sha256")[:8], "little")
                    for code in codes]
        order = sorted(range(len(prefixes)), key=prefixes.__getitem__)
        return Step(array.array("Q", [prefixes[i] for i in order]), array.array("I", order))

    def codes(self, timecode: int) -> dict[str, list[TotpUser]]:
        """A step's codes and whose they are (for checks and tests, not for calls)."""
        found: dict[str, list[TotpUser]] = {}
        for user in self.users:
            found.setdefault(user.code(timecode), []).append(user)
        return found

    def adopt(self, old: TotpTable) -> bool:
        """Take over ``old``'s built steps when they hold exactly this table's codes
        (a reload that changed no TOTP secret); touches only this table."""
        if (old.key != self.key or old.period != self.period
                or not isinstance(self.users, CompiledUsers)
                or not self.users.same_codes(old.users)):
            return False
        self.steps.update(old.steps)
        return True

    def install(self, timecode: int, table: Step) -> Step:
        for old in [s for s in self.steps if abs(s - timecode) > 2 * TOTP_WINDOW + 1]:
            del self.steps[old]
        self.steps[timecode] = table
        return table

    def missing(self, now: float) -> list[int]:
        """Steps a lookup soon will need that are not built yet."""
        step = int(now) // self.period
        return [t for t in range(step - TOTP_WINDOW, step + TOTP_WINDOW + 2)
                if t not in self.steps]


# The policy of a fleet code meant for other sites' gates: never admits here.
ELSEWHERE = Credential(id="", name="", kind="fleet", gates=frozenset())


@dataclass(slots=True)
class FleetCodes:
    """The fleet's codes at this site, looked up by the fleet key's digest.

    ``static``: the set in force (``gated.book.codeset``), whose policies this
    site compiled (``ELSEWHERE`` for a code for other sites' gates);
    ``managed``: the deltas, by digest, as for a site's managed codes. A code
    of the set is out of force when a delta here has its id, or the manifest
    lists its id (``listed``: replaced or deleted since the set was made).
    """

    key: bytes = field(default_factory=lambda: os.urandom(32), repr=False)
    static: StaticCodes = field(default_factory=StaticCodes.empty)
    listed: frozenset[str] = frozenset()
    managed: dict[bytes, Credential] = field(default_factory=dict)
    managed_ids: dict[str, bytes] = field(default_factory=dict)

    def digest(self, code: str) -> bytes:
        return sitekey.digest(self.key, code)

    def get(self, digest: bytes) -> Credential | None:
        managed = self.managed.get(digest)
        if managed is not None:
            return managed
        at = self.static.index(digest)
        if at < 0 or self.static.policy_at(at) is ELSEWHERE:
            return None
        credential = self.static.credential(at)
        return None if self._replaced(credential.id) else credential

    def _replaced(self, credential_id: str) -> bool:
        return credential_id in self.listed or credential_id in self.managed_ids

    def __len__(self) -> int:
        return len(self.static) + len(self.managed)

    def credentials(self) -> Iterator[Credential]:
        static = self.static
        for at in range(len(static)):
            if static.policy_at(at) is not ELSEWHERE:
                credential = static.credential(at)
                if not self._replaced(credential.id):
                    yield credential
        yield from self.managed.values()


@dataclass(slots=True)
class CodeBook:
    """Everything decide() needs to know about gates and credentials."""

    gates: dict[str, Gate]
    by_number: dict[str, str]
    totp: dict[int, TotpTable]  # by period
    tz: zoneinfo.ZoneInfo
    region: str
    # The file's static codes, compiled (read only).
    static: StaticCodes = field(default_factory=StaticCodes.empty)
    # Without a site key the book uses a throw-away one: lookups work the
    # same, but no code_hash can be checked.
    key: bytes = field(default_factory=lambda: os.urandom(32))
    site_key: bool = False
    # Codes issued at run time (`gated codes issue`), by digest.
    visitors: dict[bytes, Credential] = field(default_factory=dict)
    # Codes managed over MQTT, by digest, and their digests by credential id,
    # so one can be replaced or removed at run time without rebuilding the book.
    managed: dict[bytes, Credential] = field(default_factory=dict)
    managed_ids: dict[str, bytes] = field(default_factory=dict)
    # Smart routing by caller: [[routes]] and routes over MQTT.
    routes: RouteTable = field(default_factory=RouteTable)
    # With [mqtt] fleet_prefix: the fleet's codes, under the fleet key.
    fleet: FleetCodes | None = None
    # With [mqtt]: the site's own code set (``gated codes import``), under the
    # site key; its deltas are the managed codes above (``managed_ids`` shared).
    siteset: FleetCodes | None = None

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

    def code(self, digest: bytes) -> Credential | None:
        """The static code (the file's, one managed over MQTT, or the site's set) with
        this digest."""
        managed = self.managed.get(digest)
        if managed is not None:
            return managed
        found = self.static.get(digest)
        if found is None and self.siteset is not None:
            found = self.siteset.get(digest)
        return found

    def taken(self, digest: bytes, by: str | None = None) -> bool:
        """Whether these digits are already some code's (static, managed, visitor, or
        the site set's, unless that one is ``by``'s own copy in the set)."""
        if digest in self.managed or digest in self.visitors or digest in self.static:
            return True
        in_set = self.siteset.get(digest) if self.siteset is not None else None
        return in_set is not None and in_set.id != by

    def match(self, code: str, now: float) -> list[tuple[Credential, int | None]]:
        """Credentials that ``code`` is: static, then visitor, then TOTP."""
        found: list[tuple[Credential, int | None]] = []
        digest = self.digest(code)
        static = self.code(digest)
        if static is not None:
            found.append((static, None))
        visitor = self.visitors.get(digest)
        if visitor is not None:
            found.append((visitor, None))
        fleet = self.fleet
        if fleet is not None:
            shared = fleet.get(fleet.digest(code))
            if shared is not None:
                found.append((shared, None))
        for table in self.totp.values():
            found.extend(table.lookup(code, now, digest))
        return found

    def has_id(self, credential_id: str) -> bool:
        if credential_id in self.managed_ids or self.static.has_id(credential_id):
            return True
        # TOTP users that are not in the compiled book (built by hand).
        return any(user.credential.id == credential_id
                   for table in self.totp.values() if not isinstance(table.users, CompiledUsers)
                   for user in table.users)

    def add_code(self, credential: Credential, digest: bytes) -> None:
        """Add one managed code; CodeClash if its id or its digits are taken.

        The clash message never names the other credential: whoever may add
        codes must not learn whose digits they guessed.
        """
        if self.has_id(credential.id):
            raise CodeClash(f"id {credential.id!r} is already used by another credential")
        if self.taken(digest, credential.id):
            raise CodeClash("these digits are already another credential's code")
        self.managed[digest] = credential
        self.managed_ids[credential.id] = digest

    def remove_code(self, credential_id: str) -> Credential | None:
        """Remove a managed code by credential id; the credential, or None if absent."""
        digest = self.managed_ids.pop(credential_id, None)
        return None if digest is None else self.managed.pop(digest, None)

    def add_fleet_code(self, credential: Credential, digest: bytes) -> None:
        """Add one fleet delta (its digest under the fleet key); CodeClash as add_code.

        It takes the place of the set's code of the same id. Its digits are
        checked against the fleet's other codes only: the site's own are
        digests under another key (the site's own code wins a call).
        """
        fleet = self.fleet
        assert fleet is not None
        if self.has_id(credential.id):
            raise CodeClash(f"id {credential.id!r} is already used by another credential")
        taken = fleet.get(digest)
        if taken is not None and taken.id != credential.id:
            raise CodeClash("these digits are already another credential's code")
        fleet.managed[digest] = credential
        fleet.managed_ids[credential.id] = digest

    def remove_fleet_code(self, credential_id: str) -> Credential | None:
        fleet = self.fleet
        assert fleet is not None
        digest = fleet.managed_ids.pop(credential_id, None)
        return None if digest is None else fleet.managed.pop(digest, None)

    @property
    def code_count(self) -> int:
        """Static codes: the file's, the managed ones, the site set's and the fleet's."""
        return (len(self.static) + len(self.managed) + (len(self.fleet) if self.fleet else 0)
                + (len(self.siteset) if self.siteset else 0))

    @property
    def totp_count(self) -> int:
        return sum(len(t.users) for t in self.totp.values())

    @property
    def credential_count(self) -> int:
        return self.code_count + self.totp_count

    def credentials(self) -> Iterator[Credential]:
        yield from self.static
        yield from self.managed.values()
        if self.siteset is not None:
            yield from self.siteset.credentials()
        if self.fleet is not None:
            yield from self.fleet.credentials()
        for table in self.totp.values():
            for user in table.users:
                yield user.credential


class CodeClash(ValueError):
    """A code's id or digits are already another credential's."""
