"""What checking a signed code set costs a site: ./dev gated is not needed, run as

    .venv/bin/python tests/bench/setverify.py [--codes 50000]

At arrival a site checks the manifest's signature, then the SHA-256 of the set's bytes
against it, then the book's insides; at start it maps its local copy and checks the
file's SHA-256 and the book's insides (the signature was checked when the set arrived).
Run it on a quiet machine: other work on the cores shows up in these figures."""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from gated.book import bookfile, codeset, signing, sitekey
from gated.book.codeset import Entry, Manifest, SetPolicy


def best(runs: int, work: object) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        work()  # type: ignore[operator]
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--codes", type=int, default=50_000)
    args = parser.parse_args()
    key = bytes(32)
    data = codeset.build(Entry(sitekey.digest(key, f"{n:08d}"), SetPolicy(gates=("*",)),
                               f"Code {n}", f"c{n}") for n in range(args.codes))
    chunks = codeset.split(data)
    with tempfile.TemporaryDirectory() as tmp:
        hmac_path = Path(tmp) / "fleet.key"
        sitekey.ensure_key(hmac_path, "fleet key")
        signer, _ = signing.make_keys(hmac_path)
        trust = signing.Trust(signing.public_path(hmac_path))
        manifest = Manifest(serial=codeset.new_serial(), version=codeset.version_of(data),
                            size=len(data), chunks=len(chunks), codes=args.codes, key="k",
                            prefix="gated/fleet").signed(signer)
        payload = manifest.encode()

        def arrival() -> None:
            got = codeset.decode_manifest(payload)
            assert got.check(trust, "gated/fleet") is None
            assembly = codeset.Assembly(got)
            for chunk in chunks:
                _prefix, index, part = codeset.read_chunk(chunk)
                assembly.add(index, part)
            # data() checks the SHA-256 and the book's insides; the site then maps
            # the file it wrote without checking them again.
            assembly.data()

        def signature_only() -> None:
            assert codeset.decode_manifest(payload).check(trust, "gated/fleet") is None

        path = Path(tmp) / "set"
        path.write_bytes(data)

        def start() -> None:
            # The local copy's SHA-256 and the book's insides, as load_local checks them.
            image = bookfile.map_file(path, checksum=False)
            assert codeset.version_of(image.buffer) == manifest.version

        print(f"{args.codes:,} codes: a set of {len(data):,} bytes in {len(chunks)} chunks")
        print(f"signature of the manifest: {best(200, signature_only):.3f} ms")
        print(f"at arrival (signature, chunks joined, SHA-256, insides checked): "
              f"{best(20, arrival):.1f} ms")
        print(f"at start (local copy mapped, SHA-256, insides checked): {best(20, start):.1f} ms")


if __name__ == "__main__":
    main()
