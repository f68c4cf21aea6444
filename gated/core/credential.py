"""What a credential is and what it allows: the data the rules decide with.

Made by the code book (``gated.book.codes``) for the code a call matched, and by the
compiler from the config; ``gated.core.decide`` reads them and nothing else of the book.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from gated.core.schedule import Schedule

# code and totp: the config file; visitor: `gated codes issue`; managed: the site's codes
# over the broker (one by one or a signed set); fleet: the fleet's codes; route: a route.
Kind = Literal["code", "totp", "visitor", "route", "managed", "fleet"]
CODE_RE = re.compile(r"[0-9]{4,16}")
# What a caller may type: digits only; longer input is refused unread.
TYPED_RE = re.compile(r"[0-9]{1,32}")


@dataclass(frozen=True, slots=True)
class Gate:
    name: str
    numbers: frozenset[str]
    callers: frozenset[str]


@dataclass(frozen=True, slots=True)
class Credential:
    id: str
    name: str
    kind: Kind
    gates: frozenset[str]
    valid_from: float | None = None  # epoch seconds
    valid_until: float | None = None
    schedule: Schedule | None = None
    max_uses: int | None = None
    callers: frozenset[str] = frozenset()
    callername: str = ""
    destination: str = ""

    @property
    def route_only(self) -> bool:
        """Answers the PBX with a route but opens nothing."""
        return not self.gates

    def named(self, credential_id: str, name: str) -> Credential:
        """This policy as the credential of one code (a policy has no id or name)."""
        return Credential(credential_id, name, self.kind, self.gates, self.valid_from,
                          self.valid_until, self.schedule, self.max_uses, self.callers,
                          self.callername, self.destination)
