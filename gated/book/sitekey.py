"""The site key: the HMAC key that codes are looked up (and may be stored) by.

A plain or salted hash of a 6-digit code protects nothing: there are only a
million codes, and hashing all of them takes a laptop a second. A keyed hash
(HMAC-SHA256 with a secret 256-bit key kept in its own 0600 file) cannot be
reversed without the key, so a config file, a backup or an MQTT message that
carries ``code_hash`` instead of ``code`` gives a reader nothing to try.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import secrets
from pathlib import Path
from typing import Any

from gated.book import files
from gated.core.errors import ConfigError

PREFIX = "hmac-sha256:"
_HASH = re.compile(r"hmac-sha256:([0-9a-f]{64})")
KEY_BYTES = 32
_BLOCK = 64  # SHA-256's block size
_IPAD = bytes(b ^ 0x36 for b in range(256))
_OPAD = bytes(b ^ 0x5C for b in range(256))


@functools.lru_cache(maxsize=16)
def _pads(key: bytes) -> tuple[Any, Any]:
    """HMAC-SHA256's inner and outer hashes with ``key`` already in them (RFC 2104)."""
    if len(key) > _BLOCK:
        key = hashlib.sha256(key).digest()
    key = key.ljust(_BLOCK, b"\0")
    return (hashlib.sha256(key.translate(_IPAD)), hashlib.sha256(key.translate(_OPAD)))


def digest(key: bytes, code: str) -> bytes:
    """HMAC-SHA256 of ``code`` under ``key``.

    From copies of the hashes with the key in them, as RFC 2104 allows: a
    third of ``hmac.digest``'s cost, and, unlike it, without letting go of the
    interpreter lock (OpenSSL's one-shot HMAC does), which on every call handed
    the lock to another thread and left the event loop waiting to get it back.
    """
    inner, outer = _pads(key)
    inner = inner.copy()
    inner.update(code.encode())
    outer = outer.copy()
    outer.update(inner.digest())
    result: bytes = outer.digest()
    return result


def code_hash(key: bytes, code: str) -> str:
    """The text form stored in config files and MQTT messages."""
    return PREFIX + digest(key, code).hex()


def parse_hash(text: str) -> bytes | None:
    match = _HASH.fullmatch(text.strip().lower())
    return bytes.fromhex(match.group(1)) if match else None


def read_key(path: Path, what: str = "site key") -> bytes | None:
    """The key in ``path``, None when there is no such file; refuses a readable-by-all
    file, and a symbolic link (a state file: see ``gated.book.files``)."""
    try:
        with os.fdopen(files.open_state(path), "rb") as file:
            mode = os.fstat(file.fileno()).st_mode
            text = file.read(4096).decode("ascii").strip()
    except FileNotFoundError:
        return None
    except files.FileError as exc:
        raise ConfigError(f"cannot read the {what}: {exc}") from None
    except PermissionError as exc:
        # Typically made by a staff command run as root before the daemon's
        # first start: say whose it is and how to hand it over.
        raise ConfigError(f"cannot read the {what} {path}: {exc.strerror}; "
                          f"{files.chown_fix(path)}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the {what} {path}: {exc}") from exc
    if mode & 0o077:
        raise ConfigError(f"the {what} {path} is readable by others; chmod 600 it")
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES:
        raise ConfigError(f"the {what} {path} is not {KEY_BYTES * 2} hex digits")
    return key


def ensure_key(path: Path, what: str = "site key") -> bytes:
    """Read the key, or create a new one (mode 0600) when there is none."""
    key = read_key(path, what)
    if key is not None:
        return key
    try:
        files.make_dir(path.parent)
        # Under the key's lock: if two processes create it at once, the second
        # waits, then reads the key the first one made.
        with files.replacing(path) as replacement:
            existing = read_key(path, what)
            if existing is not None:
                return existing
            key = secrets.token_bytes(KEY_BYTES)
            replacement.commit((key.hex() + "\n").encode("ascii"))
    except files.FileError as exc:
        raise ConfigError(f"cannot create the {what}: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"cannot create the {what} {path}: {exc.strerror} "
                          "(is the state directory writable?)") from exc
    return key
