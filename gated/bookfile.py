"""The compiled code book: one file in the state directory, mapped at start.

A site with 100,000 codes should not parse 14 MB of TOML and build a million
Python objects after every power cut. The book is compiled once (in a child
process, see ``gated.compiler``) into this file, keyed by a digest of
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
"""

from __future__ import annotations

import hashlib
import importlib.resources
import mmap
import os
import sys
import zoneinfo
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from gated import files

MAGIC = b"GATEDBK\x01"
HEADER_LENGTH = 4
ALIGN = 8
SECTIONS = ("prefixes", "records", "ids", "names", "policies", "totp", "keys", "config")
# The modules whose code decides what a compiled book holds: a change to any
# of them (an upgrade) compiles the book again.
COMPILER_MODULES = ("bookfile", "codes", "compiler", "config", "numbers", "schedule",
                    "sitekey", "routes")


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
        package = Path(__file__).parent
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


def read_header(data: bytes | memoryview | mmap.mmap) -> tuple[Header, int]:
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


def image(data: bytes | mmap.mmap, *, checksum: bool = True) -> Image:
    """Check a whole book (header and checksum) and return it for reading.

    ``checksum`` False: the caller checks a digest of the whole file itself (a
    fleet set, named by its SHA-256), so the body is not hashed twice.
    """
    header, body = read_header(data)
    view = memoryview(data)
    problem = None
    if checksum and sha256(view[body:]) != header.checksum:
        problem = "checksum mismatch: the file is damaged"
    elif any(offset < body or offset + length > len(view)
             for offset, length in header.sections.values()):
        problem = "a section lies outside the file"
    if problem is not None:
        view.release()  # so a mapping can be closed at once
        raise BookError(problem)
    return Image(header, view)


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


def map_file(path: Path, *, checksum: bool = True) -> Image:
    """Map a book read-only and check it whole (BookError for a symbolic link)."""
    try:
        fd = files.open_state(path)
    except files.FileError as exc:
        raise BookError(str(exc)) from None
    with os.fdopen(fd, "rb") as file:
        mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        return image(mapped, checksum=checksum)
    except BookError:
        mapped.close()
        raise


def write(path: Path, data: bytes) -> None:
    """Replace the book atomically, readable by the daemon's user only
    (it holds TOTP secrets and the code digests)."""
    files.replace(path, data)
