"""Staff's keys for the code sets in tests: made as `gated codes fleet-key --new` makes them."""

from __future__ import annotations

from pathlib import Path

import msgspec

from gated.book import codeset, signing, sitekey
from gated.commands import sets as setstaff
from gated.commands.sets import SetKeys


def make_keys(hmac_path: Path, base: str, scope: setstaff.Scope = "fleet") -> SetKeys:
    """The HMAC key at ``hmac_path`` and the signing pair beside it (made where missing),
    as a staff command holds them for the set under ``base``."""
    key = sitekey.ensure_key(hmac_path, "fleet key")
    signer, _ = signing.make_keys(hmac_path)
    return SetKeys(scope, base, key, signer, signing.Trust(signing.public_path(hmac_path)),
                   signing.private_path(hmac_path).with_suffix(".serial"))


def signed(keys: SetKeys, manifest: codeset.Manifest) -> bytes:
    """``manifest`` as staff publish it: for ``keys``' prefix, signed with their key."""
    return msgspec.structs.replace(manifest, prefix=keys.base).signed(keys.signer).encode()
