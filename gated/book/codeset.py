"""A whole set of fleet codes on the broker: a manifest, the compiled set in chunks, deltas.

One retained message per code does not scale through brokers: a new
subscriber's retained set is cut at the broker's per-client queue (1,000
messages by default in Mosquitto), a bridge drops what overflows its queue,
and a site cannot tell a cut list from a short one. So a fleet's codes travel
as:

- ``<fleet>/set``: the manifest (retained JSON): which set is in force (the
  SHA-256 of its bytes), in how many chunks, how many codes, the fingerprint
  of the fleet key its digests are made with, a serial that grows with every
  change, and the deltas laid over it: code id -> SHA-256 of that code's
  message, or null for a code deleted since the set was made. It is signed
  with staff's Ed25519 key (``gated.book.signing``) and names the prefix it is for,
  so whoever can write to the broker can neither forge nor move a set, nor
  change one chunk or delta of it; a site takes a serial only above the one
  in force (a replayed older set is refused).
- ``<fleet>/set/<n>``: chunk ``n`` of the set (retained): a compiled code
  book (``gated.book.bookfile``) holding keyed digests only, never digits.
- ``<fleet>/codes/<id>``: a delta, the retained message of one code as before.

A site knows from the manifest alone what it should have, so it never
mistakes a cut list for deletions, applies a new set only when every chunk is
in and its digest matches (all or nothing), and says so while it cannot. A
connect costs one message for the manifest, one per chunk (256 KiB, about
3,800 codes; larger past 64 chunks) and one per delta; ``gated codes`` folds
the deltas into a new set once there are more than ``MAX_DELTAS``: at most 97
messages for any set.
"""

from __future__ import annotations

import hashlib
import struct
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import msgspec

from gated.book import bookfile, signing
from gated.book.codes import NAME_LENGTH, RECORD, digest_prefix, id_hash, read_name

# A chunk is 256 KiB, or larger for a set that would need more than
# MAX_CHUNKS of them: a connect costs at most 1 + MAX_CHUNKS + MAX_DELTAS
# messages (97), whatever the number of codes.
CHUNK_BYTES = 256 * 1024
MAX_CHUNKS = 64
# About 70 bytes a code: this is some 900,000 codes, and what a Pi can hold
# twice (the set in force, the next one arriving).
MAX_SET_BYTES = 64 * 1024 * 1024
MAX_CHUNK_BYTES = MAX_SET_BYTES // MAX_CHUNKS
MAX_DELTAS = 32
CHUNK_MAGIC = b"GSC1"
# Magic, the set's version (its digest's first 16 bytes), the index.
CHUNK_HEAD = struct.Struct("<4s16sI")
MAX_MANIFEST = 1024 * 1024


class SetError(ValueError):
    """A manifest or chunk that cannot be used; the message says why."""


class SetPolicy(msgspec.Struct, array_like=True, frozen=True):
    """What a fleet code carries besides its digest and names, as staff wrote it.

    Times stay as written (site-local unless they carry an offset) and gates
    as named: each site compiles a policy with its own time zone and gates.
    """

    gates: tuple[str, ...] = ()
    valid_from: str | None = None
    valid_until: str | None = None
    schedule: tuple[str, ...] = ()
    max_uses: int | None = None
    callers: tuple[str, ...] = ()
    callername: str = ""
    destination: str = ""

    @classmethod
    def of(cls, fields: dict[str, Any]) -> SetPolicy:
        """The policy of a code message's fields (already checked)."""
        return cls(tuple(fields.get("gates", ())), fields.get("valid_from"),
                   fields.get("valid_until"), tuple(fields.get("schedule", ())),
                   fields.get("max_uses"), tuple(fields.get("callers", ())),
                   fields.get("callername", ""), fields.get("destination", ""))

    def fields(self) -> dict[str, Any]:
        """The fields of a code message (without name, id and code), as JSON has them."""
        every = {"gates": list(self.gates), "valid_from": self.valid_from,
                 "valid_until": self.valid_until, "schedule": list(self.schedule),
                 "max_uses": self.max_uses, "callers": list(self.callers),
                 "callername": self.callername, "destination": self.destination}
        return {key: value for key, value in every.items()
                if value not in (None, "", []) or key == "gates"}


class Manifest(msgspec.Struct, kw_only=True, frozen=True):
    serial: int
    version: str          # SHA-256 of the set's bytes, hex
    size: int
    chunks: int
    codes: int
    key: str              # fingerprint of the HMAC key its digests are made with
    deltas: dict[str, str | None] = {}
    time: str = ""
    prefix: str = ""      # the topic prefix it is for: a set cannot be moved to another
    signer: str = ""      # fingerprint of the public key that checks the signature
    signature: str = ""   # Ed25519 over signed_part(), hex

    def encode(self) -> bytes:
        return msgspec.json.encode(self)

    def signed_part(self) -> bytes:
        """What the signature covers: every field but the signature, in one order."""
        return msgspec.json.encode(msgspec.structs.replace(self, signature=""), order="sorted")

    def signed(self, signer: signing.Signer) -> Manifest:
        unsigned = msgspec.structs.replace(self, signer=signer.fingerprint, signature="")
        return msgspec.structs.replace(unsigned, signature=signer.sign(unsigned.signed_part()))

    def check(self, trust: signing.Trust, prefix: str) -> str | None:
        """Why this manifest is not one to take (None: signed by a trusted key, for
        ``prefix``)."""
        if not self.signature:
            return "unsigned"
        if self.prefix != prefix:
            return f"signed for another prefix ({self.prefix!r})"
        if not trust.keys:
            return (f"no public signing key at {trust.path}" +
                    (f" ({trust.error})" if trust.error else ""))
        if not trust.verify(self.signer, self.signature, self.signed_part()):
            return ("signed by a key this site does not trust" if self.signer not in trust.keys
                    else "its signature does not match")
        return None


def decode_manifest(payload: bytes) -> Manifest:
    if len(payload) > MAX_MANIFEST:
        raise SetError("manifest too large")
    try:
        manifest = msgspec.json.decode(payload, type=Manifest)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise SetError(f"not a manifest ({exc})") from None
    if (len(manifest.version) != 64 or manifest.size > MAX_SET_BYTES or manifest.size < 0
            or manifest.chunks != chunk_count(manifest.size) or manifest.serial < 0):
        raise SetError("a manifest whose version, size or chunks do not add up")
    return manifest


def fingerprint(key: bytes) -> str:
    """Names a fleet key without giving it away: sites and staff compare these."""
    return hashlib.sha256(b"gated fleet key\0" + key).hexdigest()[:16]


def body_digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def version_of(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def chunk_bytes(size: int) -> int:
    """How large the chunks of a set of ``size`` bytes are (the last may be shorter)."""
    spread = -(-size // MAX_CHUNKS)
    return max(CHUNK_BYTES, spread + (-spread % 4096))


def chunk_count(size: int) -> int:
    return -(-size // chunk_bytes(size))


@dataclass(frozen=True, slots=True)
class Entry:
    """One code of a set: its keyed digest, policy and names."""

    digest: bytes
    policy: SetPolicy
    name: str
    id: str


def build(entries: Iterable[Entry]) -> bytes:
    """A set's bytes: a compiled book of fleet codes (digests only)."""
    policies: dict[SetPolicy, int] = {}
    rows = sorted(((e.digest, policies.setdefault(e.policy, len(policies)), e.name, e.id)
                   for e in entries), key=lambda row: (digest_prefix(row[0]), row[0]))
    prefixes = bytearray()
    records = bytearray()
    names = bytearray()
    ids: list[int] = []
    for index, (digest, policy, name, code_id) in enumerate(rows):
        at = len(names)
        encoded = name.encode()
        own_id = b"" if code_id == name else code_id.encode()
        names += NAME_LENGTH.pack(len(encoded)) + encoded + bytes([len(own_id)]) + own_id
        ids.append(id_hash(code_id) << 32 | index)
        prefixes += digest[:8]
        records += RECORD.pack(digest[8:], policy, at)
    ids.sort()
    sections = {"prefixes": bytes(prefixes), "records": bytes(records),
                "ids": b"".join(i.to_bytes(8, "little") for i in ids), "names": bytes(names),
                "policies": msgspec.msgpack.encode(list(policies)), "totp": b"", "keys": b"",
                "config": b""}
    return bookfile.build(sections, codes=len(rows), sources={})


def policies(image: bookfile.Image) -> list[SetPolicy]:
    try:
        found: list[SetPolicy] = image.decode("policies", list[SetPolicy])
    except msgspec.DecodeError as exc:
        raise SetError(f"a set whose policies cannot be read ({exc})") from None
    return found


def entries(image: bookfile.Image) -> Iterator[Entry]:
    """The codes of a set, as built (to fold deltas into a new one)."""
    table = policies(image)
    prefixes = image.section("prefixes")
    records = image.section("records")
    names = image.section("names")
    for index in range(len(prefixes) // 8):
        tail, policy, at = RECORD.unpack_from(records, index * RECORD.size)
        code_id, name = read_name(names, at)
        yield Entry(bytes(prefixes[index * 8:index * 8 + 8]) + tail, table[policy], name,
                    code_id)


def split(data: bytes) -> list[bytes]:
    """The chunks of a set, each with the set's version and its index."""
    version = bytes.fromhex(version_of(data))[:16]
    step = chunk_bytes(len(data))
    return [CHUNK_HEAD.pack(CHUNK_MAGIC, version, index) + data[start:start + step]
            for index, start in enumerate(range(0, len(data), step))]


def read_chunk(payload: bytes) -> tuple[str, int, bytes]:
    """(the set's version prefix in hex, the index, the bytes) of a chunk."""
    if len(payload) < CHUNK_HEAD.size or payload[:4] != CHUNK_MAGIC:
        raise SetError("not a chunk of a code set")
    _, version, index = CHUNK_HEAD.unpack_from(payload)
    return version.hex(), index, payload[CHUNK_HEAD.size:]


class Assembly:
    """The chunks of one set as they arrive; whole once every one is in.

    Only a signed manifest starts one, so its size is staff's word, within
    ``MAX_SET_BYTES``; the joined set is built in place of the chunks (each let
    go as it is copied), so a set costs its size once, not twice.
    """

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self.prefix = manifest.version[:32]
        self._parts: dict[int, bytes] = {}

    def add(self, index: int, data: bytes) -> bool:
        """Keep a chunk of this set; True once all are in."""
        step = chunk_bytes(self.manifest.size)
        expected = min(step, self.manifest.size - index * step)
        if 0 <= index < self.manifest.chunks and len(data) == expected:
            self._parts[index] = data
        return self.complete

    @property
    def complete(self) -> bool:
        return len(self._parts) == self.manifest.chunks

    @property
    def missing(self) -> int:
        return self.manifest.chunks - len(self._parts)

    def data(self) -> bytearray:
        """The set's bytes, checked against the manifest and inside (``bookfile.check``);
        SetError saying why not.

        Checked here, before a site writes or keeps them: a set whose book lies
        is refused for good, as one whose chunks do not add up is, never
        written to the state directory nor tried again.
        """
        data = bytearray(self.manifest.size)
        at = 0
        for index in range(self.manifest.chunks):
            part = self._parts.pop(index)
            data[at:at + len(part)] = part
            at += len(part)
            del part
        if at != self.manifest.size or version_of(data) != self.manifest.version:
            raise SetError("the chunks do not make the set the manifest names")
        try:
            bookfile.image(data, checksum=False)
        except bookfile.BookError as exc:
            raise SetError(f"the set is not a sound code book: {exc}") from None
        return data


def new_serial(*known: int) -> int:
    """A serial above every one in ``known``: microseconds since 1970, so a staff
    machine that knows nothing of earlier sets (a forged manifest ignored, a
    broker restored from an old backup) still publishes one above what sites hold."""
    return max(time.time_ns() // 1000, max(known, default=0) + 1)

