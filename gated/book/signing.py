"""Who may publish a code set: an Ed25519 signing key that only staff hold.

A set's manifest names its bytes, chunks and deltas by SHA-256; signed, it
cannot be forged or changed by anyone who can merely write to the broker (its
operator, a Home Assistant user, a compromised site). Staff keep the private
key (``*-signing.key``, mode 0600); sites hold only the public keys they trust
(``*-signing.pub``, one per line, so a key can be rolled by trusting the new
one before it signs anything and dropping the old one after).

- the fleet's: ``fleet-signing.key`` / ``fleet-signing.pub`` beside the fleet key;
- a site's own: ``site-signing.key`` / ``site-signing.pub`` beside the site key,
  made by the first staff command that publishes a set (no set-up step).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from gated.book import files, sitekey
from gated.core.errors import ConfigError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )


def _ed25519() -> ModuleType:
    # Loaded with the first key: the command line imports this module for every
    # command, and a site without code sets (nor a staff page's argon2) runs
    # without cryptography in its memory (~6 MB with argon2).
    from cryptography.hazmat.primitives.asymmetric import ed25519

    return ed25519

SEED_BYTES = 32
PUBLIC_BYTES = 32


def private_path(hmac_key_path: Path) -> Path:
    """The signing key beside an HMAC key file (``fleet.key`` -> ``fleet-signing.key``)."""
    return hmac_key_path.with_name(f"{_stem(hmac_key_path)}-signing.key")


def public_path(hmac_key_path: Path) -> Path:
    return hmac_key_path.with_name(f"{_stem(hmac_key_path)}-signing.pub")


def _stem(path: Path) -> str:
    # fleet.key -> fleet, site.key -> site; a custom name keeps its own stem.
    return path.name.removesuffix(".key") or path.name


def fingerprint(public: bytes) -> str:
    """Names a public key in a manifest, so a site knows which of its keys to try."""
    return hashlib.sha256(b"gated signing key\0" + public).hexdigest()[:16]


@dataclass(frozen=True)
class Signer:
    """Staff's side: signs manifests."""

    key: Ed25519PrivateKey

    @property
    def public(self) -> bytes:
        return self.key.public_key().public_bytes_raw()

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public)

    def sign(self, data: bytes) -> str:
        return self.key.sign(data).hex()

    @classmethod
    def generate(cls) -> Signer:
        return cls(_ed25519().Ed25519PrivateKey.generate())


class Trust:
    """A site's side: the public keys it accepts, read again when their file changes
    (so the first staff command that makes a site's keys needs no restart)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._keys: dict[str, Ed25519PublicKey] = {}
        self._stamp: tuple[int, int, int] | None = None
        self.error: str | None = None

    @property
    def keys(self) -> dict[str, Ed25519PublicKey]:
        """Fingerprint -> key, as the file says now (empty when there is none)."""
        try:
            stat = self.path.stat()
        except OSError:
            self._keys, self._stamp, self.error = {}, None, None
            return self._keys
        stamp = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        if stamp != self._stamp:
            self._stamp = stamp
            try:
                self._keys, self.error = read_public(self.path), None
            except ConfigError as exc:
                self._keys, self.error = {}, str(exc)
        return self._keys

    def verify(self, signer: str, signature: str, data: bytes) -> bool:
        key = self.keys.get(signer)
        if key is None:
            return False
        from cryptography.exceptions import InvalidSignature

        try:
            key.verify(bytes.fromhex(signature), data)
        except (InvalidSignature, ValueError):
            return False
        return True


def read_public(path: Path) -> dict[str, Ed25519PublicKey]:
    """The public keys in ``path``: one hex key per line, ``#`` starts a comment."""
    text = _read(path)
    keys: dict[str, Ed25519PublicKey] = {}
    for number, line in enumerate(text.splitlines(), 1):
        word = line.split("#", 1)[0].strip()
        if not word:
            continue
        try:
            raw = bytes.fromhex(word)
            if len(raw) != PUBLIC_BYTES:
                raise ValueError
            keys[fingerprint(raw)] = _ed25519().Ed25519PublicKey.from_public_bytes(raw)
        except ValueError:
            raise ConfigError(f"{path}, line {number}: not a public signing key "
                              f"({PUBLIC_BYTES * 2} hex digits)") from None
    return keys


def _read(path: Path) -> str:
    """A state file's text, never through a symbolic link (see ``gated.book.files``)."""
    try:
        with os.fdopen(files.open_state(path), "rb") as file:
            return file.read(1024 * 1024).decode("ascii")
    except (files.FileError, OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the signing keys {path}: {exc}") from exc


def read_private(path: Path) -> Signer | None:
    """Staff's signing key in ``path``; None when there is no such file."""
    seed = sitekey.read_key(path, "signing key")
    return None if seed is None else Signer(
        _ed25519().Ed25519PrivateKey.from_private_bytes(seed))


def make_keys(hmac_key_path: Path) -> tuple[Signer, bool]:
    """The signing key beside ``hmac_key_path``, made with its public file when there is
    none (True); an existing public file gets the new key added, never replaced."""
    path = private_path(hmac_key_path)
    signer = read_private(path)
    if signer is not None:
        return signer, False
    seed = sitekey.ensure_key(path, "signing key")
    signer = Signer(_ed25519().Ed25519PrivateKey.from_private_bytes(seed))
    trust(public_path(hmac_key_path), signer.public)
    return signer, True


def trust(path: Path, public: bytes) -> None:
    """Add ``public`` to the keys in ``path`` (private like every file gated makes, and
    owned like its folder, so the daemon's user reads it)."""
    existing = _read(path) if path.exists() else ""
    if public.hex() in existing:
        return
    lines = existing if not existing or existing.endswith("\n") else existing + "\n"
    if not lines:
        lines = ("# Public keys whose signed code sets this site accepts, one per line.\n")
    try:
        files.make_dir(path.parent)
        files.replace(path, (lines + public.hex() + "\n").encode("ascii"))
    except (files.FileError, OSError) as exc:
        raise ConfigError(f"cannot write the signing keys {path}: {exc}") from exc
