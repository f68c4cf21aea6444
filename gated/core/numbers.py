"""Phone-number normalisation: every number becomes E.164 before any comparison.

The PBX sends numbers in whatever shape the carrier gave it: ``+31612345678``,
``0031612345678``, ``31612345678``, ``0612345678``, or `` 31612345678`` when a
``+`` in the URL was not percent-encoded and arrived as a space.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import TYPE_CHECKING

import phonenumbers

from gated.core.errors import NumberError

if TYPE_CHECKING:
    from gated.core.tomlpos import Key

# Turns a number as written at a config key into E.164, or raises the key's error.
NumberParser = Callable[[str, "Key"], str]

# What PBXes put in the caller-id field when the caller withholds their number.
_WITHHELD = frozenset({"anonymous", "unknown", "private", "restricted", "unavailable"})
_SHAPE = re.compile(r"\+?[0-9][0-9 ()./-]*")
# Internal PBX extensions ("201") are not phone numbers but are still callers.
_MAX_EXTENSION = 6
_MAX_LEN = 32


def normalise(raw: str | None, region: str) -> str | None:
    """Return ``raw`` as E.164 (or a short extension), None when withheld or empty.

    Raises NumberError when the text is not a phone number at all.
    """
    if raw is None:
        return None
    return _normalise(raw, region)


# Every call normalises two numbers, and phonenumbers takes ~15 us a number;
# a site hears the same few numbers again and again (its gates' numbers, its
# residents, its regular visitors). Bounded, so spoofed caller ids that never
# repeat only cost what they would without it. Failures raise and are not kept.
CACHE_SIZE = 4096


@functools.lru_cache(maxsize=CACHE_SIZE)
def _normalise(raw: str, region: str) -> str | None:
    text = raw
    if text[:1].isspace() and text.strip()[:1].isdigit():
        text = "+" + text.strip()  # an unencoded "+" decodes to a space
    text = text.strip()
    if not text or text.lower() in _WITHHELD:
        return None
    if len(text) > _MAX_LEN or not _SHAPE.fullmatch(text):
        raise NumberError("not a phone number")
    digits = re.sub(r"[^0-9]", "", text)
    if text.startswith("+") or digits.startswith("00") or digits.startswith("0"):
        candidates = [text]
    else:
        if len(digits) <= _MAX_EXTENSION:
            return digits
        # No prefix at all: a national number, or an international one whose
        # "+" was dropped. Prefer whichever is a valid number.
        candidates = [text, "+" + digits]
    parsed = []
    for candidate in candidates:
        try:
            number = phonenumbers.parse(candidate, region)
        except phonenumbers.NumberParseException:
            continue
        if phonenumbers.is_valid_number(number):
            return _e164(number)
        parsed.append(number)
    for number in parsed:
        if phonenumbers.is_possible_number(number):
            return _e164(number)
    if len(digits) <= _MAX_EXTENSION and not text.startswith("+"):
        return digits
    raise NumberError("not a valid phone number")


def _e164(number: phonenumbers.PhoneNumber) -> str:
    return str(phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164))


def normalise_uncached(raw: str, region: str) -> str | None:
    """``normalise`` without the cache: for bulk work (a CSV of 100,000 callers)
    that would only push the site's own numbers out of it."""
    return _normalise.__wrapped__(raw, region)
