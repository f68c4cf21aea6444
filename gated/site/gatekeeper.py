"""One call, start to finish: parse, decide, open, record, answer.

The webhook, remote opens over MQTT and the command line all come through
``Gatekeeper.call``, so every path is decided, bounded and recorded the same
way.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from gated.book.codes import CodeBook
from gated.book.config import MAX_CALLERNAME
from gated.core.clock import Clock
from gated.core.deadline import Deadline
from gated.core.decide import (
    STALE,
    STORE_FAILING,
    Changes,
    Decision,
    Ledger,
    Request,
    Status,
    decide,
    nak,
    staleness,
)
from gated.core.errors import ActuatorError, NeedsCall, NumberError
from gated.core.lockout import LockEvent
from gated.core.numbers import normalise
from gated.core.printable import printable
from gated.site import alarms, logs
from gated.site.ports import Actuator
from gated.site.store import Entry, EntryLine, Store, entry_fields

log = structlog.get_logger("gated")

# No credential admits the call without a code: a channel that can still ask
# for one does so, and nothing is decided (or recorded) yet. On a line
# (no_route) that code can still be a route-only one.
ASK_FOR_A_CODE = frozenset({"unknown_caller", "no_route"})



@dataclass(frozen=True, slots=True)
class Answer:
    """What the gatekeeper answers a call, in no PBX's format."""

    status: Status
    reason: str
    callername: str = ""
    destination: str = ""
    tones: str = ""  # digits the call plays to open the gate (a call box), never typed ones
    # Nothing admits the call without a code and nothing was recorded: ask for one.
    wants_code: bool = False

@dataclass(frozen=True, slots=True)
class RawCall:
    """A call as it arrived, nothing parsed yet."""

    code: str | None = None
    did: str | None = None
    callerid: str | None = None
    callername: str | None = None
    source: str = "pbx"
    gate: str | None = None  # a remote open names its gate instead of a number
    # What the call's channel can carry (the PBX adapter knows; nothing below it
    # needs to): a tone played back into the call (a call box's "open"), and a
    # prompt for a code when none was typed yet.
    can_play_tones: bool = False
    can_ask_for_code: bool = False
    call_id: str = ""  # the platform's id of the call, for finding it in its logs
    # A channel whose requests can be sent again by whoever captured one (TwiML:
    # its signature holds no time) holds the call to this many decisions and one
    # open, by call_id; 0: not held. Its request that cannot ask for a code
    # follows one that did.
    attempts: int = 0
    # When it reached gated (the clock's monotonic time), if earlier than the call.
    received: float | None = None
    # A remote open's proof that it is not late (decide.staleness): the time its
    # sender says it sent it, and the MQTT 5 message expiry left on it.
    sent: float | None = None
    expiry: int | None = None
    # Who opened from the staff page: recorded as the entry's credential.
    user: str = ""


EntryListener = Callable[[Entry], None]
LockListener = Callable[[LockEvent], None]


class Gatekeeper:
    def __init__(self, book: CodeBook, ledger: Ledger, actuators: dict[str, Actuator],
                 store: Store, clock: Clock, *, deadline: float) -> None:
        self.book = book
        self.ledger = ledger
        self.actuators = actuators
        self.store = store
        self.clock = clock
        self.deadline = deadline
        self.listeners: list[EntryListener] = []
        self.lock_listeners: list[LockListener] = []

    def swap(self, book: CodeBook) -> None:
        """Replace the code book between two calls (a reload); run-time codes stay."""
        book.visitors = self.book.visitors
        self.book = book

    async def call(self, raw: RawCall) -> Answer:
        """Decide and act on one call; never raises, always answers within the deadline."""
        started = self.clock.monotonic() if raw.received is None else raw.received
        now = self.clock.now()
        request, decision = self._parse(raw, now)
        # The call's one deadline, read once: what the clock says is left of
        # it, as an instant of the loop's time (the timer's clock).
        left = started + self.deadline - self.clock.monotonic()
        when = asyncio.get_running_loop().time() + left
        changes: Changes | None = None
        if decision is None and left <= 0:
            # Its caller has given up: nothing is decided, spent or opened.
            gate = self.book.gate_for(request.did)
            decision = Decision(Status.ERR, "late", gate.name if gate else None)
        if decision is None:
            # decide() and apply() run with no await between them: the ledger
            # is never read by one call and written by another in between.
            decision = decide(request, self.book, self.ledger, now, durable=self.store.healthy)
            if raw.can_ask_for_code and decision.reason in ASK_FOR_A_CODE:
                asked = self.ledger.asked(request, now)
                if asked.calls:
                    # With the next batch; nothing waits for it. Lost in a crash
                    # within that moment, the call's digits are refused and it
                    # ends at the fallback: the price of never asking twice.
                    self.store.submit(None, asked, self.ledger)
                return Answer(decision.status, decision.reason, wants_code=True)
            changes = self.ledger.apply(request, decision, now)
        deadline = Deadline(when)
        try:
            if (decision.opens and changes is not None and (changes.uses or changes.totp)
                    and not await self._spent(changes, deadline)):
                self._refund(decision, changes)
                decision = dataclasses.replace(decision, status=Status.ERR,
                                               reason=STORE_FAILING, opens=False)
            status, result, tones = decision.status, "", ""
            if decision.opens and decision.gate is not None:
                status, result, tones = await self._open(decision.gate, deadline,
                                                         raw.can_play_tones)
                if status is Status.ERR and changes is not None:
                    self._refund(decision, changes)
            entry = Entry(
                time=now, gate=decision.gate, caller=request.caller, did=request.did,
                status=status.value, reason=decision.reason, callername=request.callername,
                credential=decision.who or raw.user, credential_id=decision.credential.id
                if decision.credential else "", kind=decision.credential.kind
                if decision.credential else "user" if raw.user else "", actuator=result,
                latency_ms=round((self.clock.monotonic() - started) * 1000, 3),
                source=raw.source, call_id=raw.call_id,
            )
            await self._record(entry, changes, deadline)
        except asyncio.CancelledError:
            if deadline.overran():
                # Only a wait outside the deadline's ``with`` gets here (a bug):
                # still an answer, ERR from the adapter, never a hung call.
                raise TimeoutError("a wait of the call outlived its deadline") from None
            raise
        finally:
            deadline.close()
        if changes is not None:
            for lock in changes.locks:
                alarms.alarm(log, lock.kind, key=lock.key, seconds=lock.seconds)
                for on_lock in self.lock_listeners:
                    try:
                        on_lock(lock)
                    except Exception:  # as for entry listeners: the answer comes first
                        log.exception("lock listener failed", listener=repr(on_lock))
        return Answer(status, decision.reason, decision.callername, decision.destination, tones)

    def _parse(self, raw: RawCall, now: float) -> tuple[Request, Decision | None]:
        """Normalise the numbers; a refusal when the input itself is bad."""
        callername = printable(raw.callername or "")[:MAX_CALLERNAME]
        code = (raw.code or "").strip().removesuffix("#") or None
        try:
            did = normalise(raw.did, self.book.region)
            caller = normalise(raw.callerid, self.book.region)
        except NumberError:
            return Request(None, None, callername, code, raw.source), nak("malformed_number")
        request = Request(did, caller, callername, code, raw.source, raw.call_id, raw.attempts,
                          follows=not raw.can_ask_for_code)
        if raw.gate is not None:
            # A remote open (button, Home Assistant) names the gate; the broker's
            # ACLs authorised it, so there is no code to check.
            if raw.gate not in self.book.gates:
                return request, nak("unknown_gate")
            why = staleness(raw.sent, raw.expiry, now, self.deadline)
            if why is not None:
                log.warning("remote open refused: it cannot show it is not late", gate=raw.gate,
                            why=why, age=None if raw.sent is None else round(now - raw.sent, 3),
                            expiry=raw.expiry, deadline=self.deadline)
                return request, nak(STALE, raw.gate)
            return request, Decision(Status.ACK, "granted_remote", raw.gate, opens=True)
        return request, None

    async def _open(self, gate: str, deadline: Deadline,
                    can_play_tones: bool) -> tuple[Status, str, str]:
        """(status, actuator result, tones the call must play for the open)."""
        actuator = self.actuators[gate]
        # A call box's gate opens by the tone the call plays; only a channel
        # that can play one may open it. (An attribute, not a Protocol isinstance:
        # that costs ~16 us on every open; a test's fake may lack it.)
        tones: str = getattr(actuator, "tones", "")
        try:
            if tones and not can_play_tones:
                raise NeedsCall(f"gate {gate!r} opens by a tone played into a call; "
                                "this request cannot carry one")
            # Past the deadline already, the actuator is not even asked.
            with deadline:
                return Status.ACK, await actuator.open(), tones
        except ActuatorError as exc:
            log.error("actuator failed", gate=gate, error=str(exc))
            return Status.ERR, exc.reason, ""
        except TimeoutError:
            log.error("actuator missed the answer deadline", gate=gate, deadline=self.deadline)
            return Status.ERR, "deadline", ""

    async def _spent(self, changes: Changes, deadline: Deadline) -> bool:
        """Make a use or TOTP step durable before the gate opens; False if the store can't.

        Written after the open, a spend the disk refused lives only in memory,
        and a power cut before the disk recovers would give a single-use code
        its use back: the one window ``decide(durable=...)`` cannot see, since
        the store is only known to fail once a write has failed.
        """
        durable = self.store.submit(None, changes, self.ledger)
        try:
            with deadline:
                return await durable
        except TimeoutError:
            return False

    def _refund(self, decision: Decision, changes: Changes) -> None:
        # The gate did not open: the use was not spent. (A TOTP step stays
        # spent; replay protection matters more than one retry.)
        credential = decision.credential
        if credential is not None and credential.id in changes.uses:
            self.ledger.uses[credential.id] -= 1
            changes.uses[credential.id] = self.ledger.uses[credential.id]

    async def note(self, entry: Entry) -> None:
        """Record an entry no call produced (a sensor alarm) the way calls are recorded."""
        deadline = Deadline(asyncio.get_running_loop().time() + self.deadline)
        try:
            await self._record(entry, None, deadline)
        finally:
            deadline.close()

    async def _record(self, entry: Entry, changes: Changes | None, deadline: Deadline) -> None:
        line = EntryLine()
        durable = self.store.submit(entry, changes, self.ledger, line=line)
        stored = False
        # While the store is failing, entries wait in its buffer and the
        # caller is answered at once rather than at the deadline.
        if self.store.healthy:
            try:
                with deadline:
                    # No shield: if the wait times out and cancels this future, the
                    # writer still commits the entry and just skips reporting it.
                    stored = await durable
            except TimeoutError:
                pass
        # A durable entry's line went out with its batch (the store's thread
        # wrote it); one not durable by now is this call's to write.
        if line.claim():
            logs.entry(entry_fields(entry, stored))
        for listener in self.listeners:
            try:
                listener(entry)
            except Exception:  # a broken listener must not cost the caller their answer
                log.exception("entry listener failed", listener=repr(listener))

    async def close(self) -> None:
        for actuator in self.actuators.values():
            await actuator.close()

