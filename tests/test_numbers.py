from __future__ import annotations

import pytest

from gated.core.errors import NumberError
from gated.core.numbers import normalise


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("+31612345678", "+31612345678"),
        ("0031612345678", "+31612345678"),
        ("31612345678", "+31612345678"),
        ("0612345678", "+31612345678"),
        (" 31612345678", "+31612345678"),  # "+" sent unencoded, decoded as a space
        ("06-1234 5678", "+31612345678"),
        ("0501234567", "+31501234567"),
        ("+4915112345678", "+4915112345678"),
        ("004915112345678", "+4915112345678"),
        ("4915112345678", "+4915112345678"),
        ("+1 650 253 0000", "+16502530000"),
        ("201", "201"),  # an internal PBX extension
        ("", None),
        ("anonymous", None),
        ("Unknown", None),
        (None, None),
    ],
)
def test_every_form_the_pbx_sends_normalises_to_e164(raw: str | None,
                                                     expected: str | None) -> None:
    """All the shapes in DESIGN §1 compare equal after normalisation."""
    assert normalise(raw, "NL") == expected


@pytest.mark.parametrize("raw", ["hello", "+31abc", "12345678901234", "1" * 40, "++31612345678",
                                 "0612345678; DROP", "\x00612"])
def test_garbage_is_refused(raw: str) -> None:
    """Text that is not a phone number raises NumberError rather than passing through."""
    with pytest.raises(NumberError):
        normalise(raw, "NL")


def test_region_decides_national_numbers() -> None:
    """A national number takes the site's region."""
    assert normalise("030 1234567", "DE") == "+49301234567"
