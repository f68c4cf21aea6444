"""The PBX answer format: ``status=ACK&callername=...&destination=...``.

Bodies are built with urllib.parse.urlencode, byte for byte what VoIPGRID
integrations expect, and parsed back the same way by ``gated call``.
"""

from __future__ import annotations

import functools
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
    tones: str = ""  # digits the call plays to open the gate (a call box), never typed ones
    # Nothing admits the call without a code and nothing was recorded: ask for one.
    wants_code: bool = False

    def body(self, nak_word: str = "NAK") -> str:
        return _body(self.status, self.callername, self.destination, nak_word)


# A site answers with a few distinct bodies (a word, and each credential's
# callername and destination from config, never anything a caller typed);
# urlencode was ~4% of the event loop's time under load.
@functools.lru_cache(maxsize=1024)
def _body(status: Status, callername: str, destination: str, nak_word: str) -> str:
    word = nak_word if status is Status.NAK else status.value
    fields = [("status", word)]
    if status is Status.ACK:
        if callername:
            fields.append(("callername", callername))
        if destination:
            fields.append(("destination", destination))
    return urllib.parse.urlencode(fields)


def parse_body(body: str) -> dict[str, str]:
    return dict(urllib.parse.parse_qsl(body, keep_blank_values=True))
