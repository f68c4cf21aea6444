"""The site key: the HMAC key that codes are looked up (and may be stored) by.

A plain or salted hash of a 6-digit code protects nothing: there are only a
million codes, and hashing all of them takes a laptop a second. A keyed hash
(HMAC-SHA256 with a secret 256-bit key kept in its own 0600 file) cannot be
reversed without the key, so a config file, a backup or an MQTT message that
carries ``code_hash`` instead of ``code`` gives a reader nothing to try.
"""

from __future__ import annotations

import hmac
import os
import re
import secrets
from pathlib import Path

from gated.book import files
from gated.core.errors import ConfigError

PREFIX = "hmac-sha256:"
_HASH = re.compile(r"hmac-sha256:([0-9a-f]{64})")
KEY_BYTES = 32


def digest(key: bytes, code: str) -> bytes:
    # One-shot: half the cost of an hmac object, on every call and every TOTP table.
    return hmac.digest(key, code.encode(), "sha256")


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
