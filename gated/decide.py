"""The decision: (request, code book, ledger, time) -> Decision. No I/O here.

``decide`` only reads; ``Ledger.apply`` then records what the decision used up
(a use of a code, a TOTP step, a failure). The daemon calls both without an
``await`` between them, so two concurrent calls can never both spend the
last use of a single-use code.
"""

from __future__ import annotations

import datetime as dt
import enum
import math
from dataclasses import dataclass, field

from gated.codes import TYPED_RE, CodeBook, Credential
from gated.lockout import LockEvent, Lockout, Policy


class Status(enum.StrEnum):
    ACK = "ACK"
    NAK = "NAK"
    ERR = "ERR"


@dataclass(frozen=True, slots=True)
class Request:
    """One call, numbers already normalised; ``code`` is None when none was typed."""

    did: str | None
    caller: str | None
    callername: str = ""
    code: str | None = None
    source: str = "pbx"


@dataclass(frozen=True, slots=True)
class Decision:
    status: Status
    reason: str
    gate: str | None = None
    credential: Credential | None = None
    timecode: int | None = None  # the TOTP step accepted
    opens: bool = False
    callername: str = ""
    destination: str = ""

    @property
    def who(self) -> str:
        return self.credential.name if self.credential else ""


# Reasons a code-bearing call failed that count as a guess.
GUESS_REASONS = frozenset({
    "unknown_code", "malformed_code", "wrong_gate", "not_yet_valid", "expired",
    "outside_schedule", "used_up", "wrong_caller", "replayed",
})


# A grant that would spend ledger state (a use, a TOTP step) while the store
# cannot make it durable is refused: a restart (kill -9, power cut) would forget
# the spend and admit the code again. TOTP too: the code stays valid for the
# rest of its window, and "accepted once" must hold across restarts.
STORE_FAILING = "store_failing"
# A call without a code answered by a route (§11): ACK, opens nothing.
ROUTED = "routed_caller"
# A remote open that cannot show it was sent within the answer deadline (§9: a
# command never fires late). A bridge or a broker may have queued it for as
# long as a link was down, and the button was pressed for whoever stood there
# then, not whoever stands there now.
STALE = "stale"
# How far ahead of the site's clock a sender's time may be. NTP keeps two
# clocks within milliseconds; this only spares a sender with a rougher sync.
# Kept small because a sender's clock running ahead widens the window for late
# opens by as much: one more than 2 s ahead shows up at once as refused opens
# ("in the future"), rather than quietly letting old ones through.
CLOCK_SKEW = 2.0


def nak(reason: str, gate: str | None = None) -> Decision:
    return Decision(Status.NAK, reason, gate)


def decide(request: Request, book: CodeBook, ledger: Ledger, now: float,
           *, durable: bool = True) -> Decision:
    """``durable`` False: the store cannot keep what a grant would spend right now."""
    gate = book.gate_for(request.did)
    # A line: a number of no gate that routes answer on; only routes and
    # route-only codes apply there.
    if gate is None and not book.is_line(request.did):
        return nak("unknown_number")
    name = gate.name if gate is not None else None
    lockout = ledger.lockout
    if request.code is None:
        if gate is not None and request.caller is not None and request.caller in gate.callers:
            if lockout.caller_locked(request.caller, now):
                return nak("locked_out", name)
            return Decision(Status.ACK, "granted_caller", name, opens=True)
        # No code typed: nothing guessed, so lockout neither blocks nor counts this.
        row = book.routes.find(request.did, request.caller, now, book.tz)
        if row is not None:
            route, destination, callername = row
            return Decision(Status.ACK, ROUTED, name, route.credential,
                            callername=callername, destination=destination)
        if gate is None:
            return nak("no_route")
        return nak("unknown_caller", name)
    if lockout.caller_locked(request.caller, now) or lockout.site_locked(now):
        return nak("locked_out", name)
    if not TYPED_RE.fullmatch(request.code):
        return nak("malformed_code", name)
    matches = book.match(request.code, now)
    if not matches:
        return nak("unknown_code", name)
    # Several credentials may share the digits (a static code and someone's
    # TOTP code by chance): the first that admits this call wins, and if none
    # does, the first refusal is the one reported.
    refusal: Decision | None = None
    for credential, timecode in matches:
        reason = refuse(credential, timecode, name, request, book, ledger, now)
        if reason is None and not durable and (
                credential.max_uses is not None or timecode is not None):
            reason = STORE_FAILING
        if reason is None:
            granted = "granted_route" if credential.route_only else f"granted_{credential.kind}"
            return Decision(
                Status.ACK, granted, name, credential, timecode,
                opens=not credential.route_only,
                callername=credential.callername, destination=credential.destination,
            )
        if refusal is None:
            # ERR, not NAK: the code is right, so the dial plan's failure
            # branch (a person) is where this caller belongs.
            status = Status.ERR if reason == STORE_FAILING else Status.NAK
            refusal = Decision(status, reason, name, credential, timecode)
    assert refusal is not None
    return refusal


def staleness(sent: float | None, expiry: int | None, now: float,
              deadline: float) -> str | None:
    """Why a remote open cannot show it is not late, or None when it can.

    ``sent``: the time its sender put in it (epoch seconds); it decides when
    there is one, however short the expiry. ``expiry``: the MQTT 5 message
    expiry interval left on it, which the broker counted down while it waited;
    at most the deadline (in whole seconds, as MQTT has them) bounds its age.
    """
    if sent is not None:
        if sent < now - deadline:
            return "too old"
        if sent > now + CLOCK_SKEW:
            return "in the future"
        return None
    if expiry is not None and 0 < expiry <= math.ceil(deadline):
        return None  # 0 would be a broker's "no expiry"
    return "no time"


def refuse(credential: Credential, timecode: int | None, gate: str | None, request: Request,
           book: CodeBook, ledger: Ledger, now: float) -> str | None:
    """Why ``credential`` does not admit this call, or None when it does (``gate``
    None: a line, where only route-only credentials apply)."""
    elsewhere = not credential.route_only and (gate is None or gate not in credential.gates)
    if elsewhere and gate is not None:
        return "wrong_gate"
    if credential.valid_from is not None and now < credential.valid_from:
        return "not_yet_valid"
    if credential.valid_until is not None and now >= credential.valid_until:
        return "expired"
    if credential.schedule is not None:
        local = dt.datetime.fromtimestamp(now, book.tz)
        if not credential.schedule.contains(local):
            return "outside_schedule"
    if credential.callers and request.caller not in credential.callers:
        return "wrong_caller"
    if credential.max_uses is not None and ledger.uses.get(credential.id, 0) >= credential.max_uses:
        return "used_up"
    if timecode is not None:
        last = ledger.totp_last.get(credential.id)
        if last is not None and timecode <= last:
            return "replayed"
    if elsewhere:
        # A gate's code on a line, checked as its gate would check it first: only
        # one good there now is wrong_gate here, which is no guess (Ledger.apply).
        return "wrong_gate"
    return None


@dataclass(slots=True)
class Changes:
    """What one decision changed in the ledger, for the store to persist."""

    uses: dict[str, int] = field(default_factory=dict)
    totp: dict[str, int] = field(default_factory=dict)
    strikes: list[str] = field(default_factory=list)
    locks: list[LockEvent] = field(default_factory=list)


@dataclass(slots=True)
class Ledger:
    """Mutable state the decision reads: uses, TOTP steps spent, lockout."""

    lockout: Lockout
    uses: dict[str, int] = field(default_factory=dict)
    totp_last: dict[str, int] = field(default_factory=dict)

    @classmethod
    def fresh(cls, policy: Policy) -> Ledger:
        return cls(Lockout(policy))

    def apply(self, request: Request, decision: Decision, now: float) -> Changes:
        changes = Changes()
        credential = decision.credential
        if decision.reason == ROUTED:
            pass  # no code typed: a route is no success against the lockout either
        elif decision.status is Status.ACK and credential is not None:
            if credential.max_uses is not None:
                count = self.uses.get(credential.id, 0) + 1
                self.uses[credential.id] = changes.uses[credential.id] = count
            if decision.timecode is not None:
                self.totp_last[credential.id] = changes.totp[credential.id] = decision.timecode
            if decision.opens:
                # Only an open clears a caller's strikes: a route-only code (a
                # sales line's, known to many) typed between guesses must not
                # keep a guesser under the per-caller lock.
                changes.strikes = self.lockout.success(request.caller)
        elif decision.reason in GUESS_REASONS and not (
                decision.gate is None and decision.reason == "wrong_gate"):
            # On a line (no gate) wrong_gate is a real gate's code, dialled on the
            # wrong number: whoever typed it knows a code, and guesses nothing.
            changes.strikes, changes.locks = self.lockout.failure(request.caller, now)
        return changes
