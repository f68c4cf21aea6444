"""The PBX answer format: ``status=ACK&callername=...&destination=...``.

Bodies are built with urllib.parse.urlencode, byte for byte what VoIPGRID
integrations expect, and parsed back the same way by ``gated call``.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass

from gated.decide import Status

WHAT_THE_DIAL_PLAN_DOES = {
    "ACK": "access granted: the dial plan takes its 'success' branch",
    "NAK": "wrong input: in IVR mode the PBX plays its wrong-input message and asks again",
    "ERR": "gated could not do it: the dial plan takes its failure branch (usually a person)",
}


@dataclass(frozen=True, slots=True)
class Answer:
    status: Status
    reason: str
    callername: str = ""
    destination: str = ""

    def body(self, nak_word: str = "NAK") -> str:
        word = nak_word if self.status is Status.NAK else self.status.value
        fields = [("status", word)]
        if self.status is Status.ACK:
            if self.callername:
                fields.append(("callername", self.callername))
            if self.destination:
                fields.append(("destination", self.destination))
        return urllib.parse.urlencode(fields)


def parse_body(body: str) -> dict[str, str]:
    return dict(urllib.parse.parse_qsl(body, keep_blank_values=True))
