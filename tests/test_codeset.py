"""The fleet's set as it travels: built, cut in chunks, put together, checked."""

from __future__ import annotations

import os

import pytest

from gated.book import bookfile, codeset, sitekey
from gated.book.codeset import Assembly, Entry, Manifest, SetError, SetPolicy


def manifest_of(data: bytes, **fields: object) -> Manifest:
    return Manifest(serial=1, version=codeset.version_of(data), size=len(data),
                    chunks=codeset.chunk_count(len(data)), codes=0, key="k", **fields)  # type: ignore[arg-type]


def test_a_set_reads_back_as_it_was_built() -> None:
    """Every entry (digest, names, policy) comes back out of the compiled set."""
    key = os.urandom(32)
    policies = [SetPolicy(gates=("*",)), SetPolicy(gates=("barrier", "door"),
                                                   valid_until="2026-12-24T18:00",
                                                   schedule=("mon-fri 07:00-18:00",),
                                                   max_uses=3, callers=("+31612345678",),
                                                   callername="Hi", destination="201")]
    built = [Entry(sitekey.digest(key, f"{n:06d}"), policies[n % 2], f"Name é {n}",
                   f"id-{n}" if n % 3 else f"Name é {n}") for n in range(500)]
    image = bookfile.image(codeset.build(built))
    assert sorted(codeset.entries(image), key=lambda e: e.id) == sorted(built,
                                                                          key=lambda e: e.id)
    assert image.header.codes == 500


@pytest.mark.parametrize("size", [1, 256 * 1024, 256 * 1024 + 1, 3_300_000, 17_000_001])
def test_chunks_put_together_make_the_bytes_and_are_never_more_than_64(size: int) -> None:
    """Bytes of any size up to a set's largest are cut in at most 64 chunks, whole again
    in any order."""
    data = os.urandom(size)
    chunks = codeset.split(data)
    assert len(chunks) == codeset.chunk_count(size) <= codeset.MAX_CHUNKS
    parts = {}
    for chunk in reversed(chunks):  # any order
        prefix, index, part = codeset.read_chunk(chunk)
        assert prefix == codeset.version_of(data)[:32]
        parts[index] = part
    assert b"".join(parts[index] for index in range(len(chunks))) == data


@pytest.mark.parametrize("codes", [0, 4_000])
def test_chunks_put_together_make_the_set(codes: int) -> None:
    """A set's chunks, in any order, make the set again (the 4,000 codes take two)."""
    key = os.urandom(32)
    data = codeset.build([Entry(sitekey.digest(key, f"{n:06d}"), SetPolicy(gates=("*",)),
                                f"Code {n}", f"c{n}") for n in range(codes)])
    assembly = Assembly(manifest_of(data))
    for chunk in reversed(codeset.split(data)):
        prefix, index, part = codeset.read_chunk(chunk)
        assert prefix == assembly.prefix
        assembly.add(index, part)
    assert assembly.complete and assembly.data() == data


def test_bytes_that_make_the_named_set_but_no_sound_book_are_refused() -> None:
    """Chunks whose bytes are the very ones the manifest names, but no code book (or one
    that lies inside), are refused as a set: a site writes none of it."""
    data = os.urandom(600_000)
    assembly = Assembly(manifest_of(data))
    for chunk in codeset.split(data):
        _, index, part = codeset.read_chunk(chunk)
        assembly.add(index, part)
    with pytest.raises(SetError, match=r"^the set is not a sound code book: not a compiled "
                                       r"code book of this version$"):
        assembly.data()


def test_the_largest_set_is_still_64_chunks() -> None:
    assert codeset.chunk_count(codeset.MAX_SET_BYTES) == codeset.MAX_CHUNKS
    assert codeset.chunk_bytes(codeset.MAX_SET_BYTES) == codeset.MAX_CHUNK_BYTES
    # 1 manifest + every chunk + every delta before they are folded into a new set.
    assert 1 + codeset.MAX_CHUNKS + codeset.MAX_DELTAS <= 100


def test_chunks_that_do_not_make_the_named_set_are_refused() -> None:
    data = os.urandom(600_000)
    chunks = codeset.split(data)
    assembly = Assembly(manifest_of(data))
    for chunk in chunks:
        _, index, part = codeset.read_chunk(chunk)
        assembly.add(index, part if index else part[:-1] + bytes([part[-1] ^ 1]))
    with pytest.raises(SetError, match="do not make the set"):
        assembly.data()
    with pytest.raises(SetError):
        codeset.read_chunk(b"GSC0" + chunks[0][4:])


@pytest.mark.parametrize("payload", [
    b"", b"{", b"[]", b'{"serial": 1}',
    b'{"serial":1,"version":"ab","size":10,"chunks":1,"codes":0,"key":"k"}',
    b'{"serial":1,"version":"' + b"a" * 64 + b'","size":10,"chunks":2,"codes":0,"key":"k"}',
    b'{"serial":1,"version":"' + b"a" * 64 + b'","size":999999999999,"chunks":1,"codes":0,'
    b'"key":"k"}',
    b'{"serial":-1,"version":"' + b"a" * 64 + b'","size":10,"chunks":1,"codes":0,"key":"k"}',
])
def test_a_manifest_that_does_not_add_up_is_refused(payload: bytes) -> None:
    with pytest.raises(SetError):
        codeset.decode_manifest(payload)


def test_a_serial_always_grows() -> None:
    """Above every serial known, even one far in the future (a staff clock set wrong)."""
    data = codeset.build(())
    previous = manifest_of(data)
    future = codeset.new_serial() + 10**12
    assert codeset.new_serial(future) == future + 1
    for _ in range(100):
        serial = codeset.new_serial(previous.serial)
        assert serial > previous.serial
        previous = Manifest(serial=serial, version=previous.version, size=previous.size,
                            chunks=previous.chunks, codes=0, key="k")
