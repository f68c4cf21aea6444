"""Visitor codes: random codes issued at run time for one person and a short time.

The digits are shown once, to the person issuing them; the store keeps only
the keyed digest, so a copy of the state directory reveals no codes.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from gated.book.codes import CodeBook
from gated.core.credential import Credential
from gated.core.errors import GatedError
from gated.site.store import VisitorRow

# Tries to find digits that are no other code before giving up.
MAX_TRIES = 100


class VisitorError(GatedError):
    """A visitor code could not be issued."""


@dataclass(frozen=True, slots=True)
class Issued:
    code: str
    row: VisitorRow


def credential(row: VisitorRow) -> Credential:
    return Credential(
        id=f"visitor:{row.id}", name=row.name, kind="visitor", gates=frozenset(row.gates),
        valid_from=row.valid_from, valid_until=row.valid_until, max_uses=row.max_uses,
        callers=frozenset(row.callers), callername=row.callername, destination=row.destination,
    )


def install(book: CodeBook, rows: list[VisitorRow]) -> None:
    """Replace the book's visitor codes in one assignment (calls never see half)."""
    book.visitors = {row.digest: credential(row) for row in rows}


def random_digits(length: int) -> str:
    return f"{secrets.randbelow(10 ** length):0{length}d}"


def make(book: CodeBook, *, name: str, gates: list[str], valid_from: float | None,
         valid_until: float, max_uses: int | None, length: int, now: float,
         callername: str = "", destination: str = "",
         taken: frozenset[bytes] = frozenset()) -> Issued:
    """Draw random digits that are no other code, and the row to store for them."""
    unknown = [g for g in gates if g not in book.gates]
    if unknown:
        raise VisitorError(f"no gate named {unknown[0]!r}; gates: {', '.join(book.gates)}")
    if not gates and not (callername or destination):
        raise VisitorError("a visitor code needs --gates (or a route)")
    if valid_until <= now:
        raise VisitorError("the code would already have expired")
    for _ in range(MAX_TRIES):
        code = random_digits(length)
        digest = book.digest(code)
        if book.taken(digest) or digest in taken:
            continue
        if any(table.lookup(code, now) for table in book.totp.values()):
            continue
        row = VisitorRow(id=secrets.token_hex(4), digest=digest, name=name,
                         gates=tuple(gates), valid_from=valid_from, valid_until=valid_until,
                         max_uses=max_uses, callername=callername,
                         destination=destination, created=now)
        return Issued(code, row)
    raise VisitorError("could not find free digits; use a longer [visitors] length")
