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
import zoneinfo
from dataclasses import dataclass, field
from typing import Protocol

from gated.core.credential import TYPED_RE, Credential, Gate
from gated.core.lockout import LockEvent, Lockout, Policy


# The ports decide() reads the code book through (``gated.book.codes.CodeBook`` is the one
# implementation): the rules know what a book answers, not how it is built or kept.
class RouteLike(Protocol):
    @property
    def credential(self) -> Credential: ...


class Routes(Protocol):
    def find(self, did: str | None, caller: str | None, now: float,
             tz: zoneinfo.ZoneInfo) -> tuple[RouteLike, str, str] | None: ...


class Book(Protocol):
    @property
    def tz(self) -> zoneinfo.ZoneInfo: ...
    @property
    def routes(self) -> Routes: ...

    def gate_for(self, did: str | None) -> Gate | None: ...
    def is_line(self, did: str | None) -> bool: ...
    def match(self, code: str, now: float) -> list[tuple[Credential, int | None]]: ...


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
    # A call answered over several requests that can be sent again (TwiML: a
    # signature holds no time): its id, how many decisions it may make (0: not
    # held to any), and whether this request follows an answer that asked it
    # for a code.
    call_id: str = ""
    attempts: int = 0
    follows: bool = False


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
# A request of a call that has decided all it may (its attempts, or an open):
# a copy of one already answered. Nothing is evaluated; no guess either.
REPLAYED_CALL = "replayed_call"
# How long a call is remembered. Twilio ends every call within a day (its
# longest time limit); digits for a call forgotten since are refused anyway,
# since that call was never asked for them here (Ledger.replayed).
KEEP_CALLS = 2 * 86400.0
# At most this many at once (~190 bytes each; two days of a busy call box are
# a few thousand); past it the oldest is forgotten first, as past KEEP_CALLS.
MAX_CALLS = 10_000
# How far ahead of the site's clock a sender's time may be. NTP keeps two
# clocks within milliseconds; this only spares a sender with a rougher sync.
# Kept small because a sender's clock running ahead widens the window for late
# opens by as much: one more than 2 s ahead shows up at once as refused opens
# ("in the future"), rather than quietly letting old ones through.
CLOCK_SKEW = 2.0


def nak(reason: str, gate: str | None = None) -> Decision:
    return Decision(Status.NAK, reason, gate)


def decide(request: Request, book: Book, ledger: Ledger, now: float,
           *, durable: bool = True) -> Decision:
    """``durable`` False: the store cannot keep what a grant would spend right now."""
    gate = book.gate_for(request.did)
    name = gate.name if gate is not None else None
    if request.attempts and ledger.replayed(request):
        return nak(REPLAYED_CALL, name)
    # A line: a number of no gate that routes answer on; only routes and
    # route-only codes apply there.
    if gate is None and not book.is_line(request.did):
        return nak("unknown_number")
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
           book: Book, ledger: Ledger, now: float) -> str | None:
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
    calls: dict[str, Call | None] = field(default_factory=dict)  # None: forgotten


@dataclass(frozen=True, slots=True)
class Call:
    """What one call held to its attempts has decided so far."""

    began: float  # when it was first answered
    decisions: int = 0
    opened: bool = False


@dataclass(slots=True)
class Ledger:
    """Mutable state the decision reads: uses, TOTP steps spent, lockout."""

    lockout: Lockout
    uses: dict[str, int] = field(default_factory=dict)
    totp_last: dict[str, int] = field(default_factory=dict)
    calls: dict[str, Call] = field(default_factory=dict)  # by id, oldest first

    @classmethod
    def fresh(cls, policy: Policy) -> Ledger:
        return cls(Lockout(policy))

    def replayed(self, request: Request) -> bool:
        """Whether this request of a call held to its attempts may decide nothing."""
        if not request.call_id:
            return True  # without its id a call cannot be held to anything
        call = self.calls.get(request.call_id)
        if call is None:
            # Digits for a call this site never asked (or has forgotten): no
            # real call gets here without the answer that asked it.
            return request.follows
        return call.opened or call.decisions >= request.attempts

    def asked(self, request: Request, now: float) -> Changes:
        """Note that a call held to its attempts was asked for a code: its digits may
        follow. It decided nothing yet."""
        changes = Changes()
        if request.attempts and request.call_id not in self.calls:
            self._call(request.call_id, Call(now), now, changes)
        return changes

    def _call(self, call_id: str, call: Call, now: float, changes: Changes) -> None:
        calls = self.calls
        if call_id not in calls:
            # Insertion order is the order calls began: the oldest go first.
            while calls:
                oldest, first = next(iter(calls.items()))
                if first.began >= now - KEEP_CALLS and len(calls) < MAX_CALLS:
                    break
                del calls[oldest]
                changes.calls[oldest] = None
        calls[call_id] = changes.calls[call_id] = call

    def apply(self, request: Request, decision: Decision, now: float) -> Changes:
        changes = Changes()
        credential = decision.credential
        if request.attempts and decision.reason != REPLAYED_CALL:
            # Counted here, with no await since decide(): a second copy of the
            # request, however close behind, sees this one's decision and open.
            call = self.calls.get(request.call_id) or Call(now)
            self._call(request.call_id, Call(call.began, call.decisions + 1,
                                             call.opened or decision.opens), now, changes)
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
