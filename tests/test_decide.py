"""The pure decision, walked with a fake clock (no I/O, no event loop)."""

from __future__ import annotations

from pathlib import Path

import pyotp
import pytest

from gated.book import compiler
from gated.book.codes import CodeBook
from gated.core.decide import Changes, Decision, Ledger, Request, Status, decide, staleness
from gated.core.lockout import Policy

from .helpers import BARRIER, DOOR, RESIDENT, config_text, local

SECRET = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
EXTRA = """
[[codes]]
name = "Parcel"
code = "580214"
gates = ["barrier"]
valid_from = 2026-12-01T07:00:00
valid_until = 2026-12-24T18:00:00
schedule = ["mon-fri 07:00-18:00", "sat 09:00-12:00"]

[[codes]]
name = "Night shift"
code = "220022"
gates = ["barrier"]
schedule = ["fri 22:00-02:00"]

[[codes]]
name = "Early"
code = "250250"
gates = ["barrier"]
schedule = ["daily 02:00-03:00"]

[[codes]]
name = "Once"
code = "111111"
gates = ["barrier"]
max_uses = 1

[[codes]]
name = "Bound"
code = "737373"
gates = ["barrier"]
callers = ["0612345678"]

[[codes]]
name = "UTC window"
code = "424242"
gates = ["barrier"]
valid_from = 2026-06-01T10:00:00Z
valid_until = 2026-06-01T14:00:00+02:00

[[totp]]
name = "Flat 12"
secret = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
gates = ["barrier"]
"""


@pytest.fixture
def book(tmp_path: Path) -> CodeBook:
    _, compiled = compiler.parse(config_text(tmp_path, EXTRA))
    return compiled


def run(book: CodeBook, ledger: Ledger, now: float, code: str | None,
        did: str | None = BARRIER, caller: str | None = "+31687654321") -> Decision:
    request = Request(did=did, caller=caller, code=code)
    decision = decide(request, book, ledger, now)
    ledger.apply(request, decision, now)
    return decision


@pytest.fixture
def ledger() -> Ledger:
    return Ledger.fresh(Policy(caller_failures=1000, site_failures=1000))


def reason(book: CodeBook, ledger: Ledger, now: float, code: str | None, **kw: str) -> str:
    return run(book, ledger, now, code, **kw).reason


WEDNESDAY_NOON = local(2026, 12, 9, 12, 0)


def test_gate_by_number_and_unknown_number(book: CodeBook, ledger: Ledger) -> None:
    """The called number picks the gate; an unknown one is unknown_number."""
    assert run(book, ledger, WEDNESDAY_NOON, "471123", did=DOOR).gate == "door"
    assert reason(book, ledger, WEDNESDAY_NOON, "471123", did="+31200000000") == "unknown_number"
    assert reason(book, ledger, WEDNESDAY_NOON, "471123", did=None) == "unknown_number"


def test_caller_list_and_no_code(book: CodeBook, ledger: Ledger) -> None:
    """No code: a listed caller opens, anyone else is unknown_caller."""
    granted = run(book, ledger, WEDNESDAY_NOON, None, caller=RESIDENT)
    assert (granted.status, granted.reason, granted.opens) == (Status.ACK, "granted_caller", True)
    assert reason(book, ledger, WEDNESDAY_NOON, None) == "unknown_caller"
    assert reason(book, ledger, WEDNESDAY_NOON, None, caller=None) == "unknown_caller"
    assert reason(book, ledger, WEDNESDAY_NOON, None, did=DOOR, caller=RESIDENT) == (
        "unknown_caller")


def test_route_only_credential_opens_nothing(book: CodeBook, ledger: Ledger) -> None:
    """A code with a route but no gates answers ACK and opens nothing."""
    routed = run(book, ledger, WEDNESDAY_NOON, "9000")
    assert (routed.status, routed.reason, routed.opens) == (Status.ACK, "granted_route", False)
    assert (routed.callername, routed.destination) == ("Sales desk", "+31501234599")


def test_a_route_only_code_does_not_clear_a_guessers_strikes(book: CodeBook) -> None:
    """A sales line's code, known to many, typed between guesses keeps no guesser below
    the per-caller lock (5 by default): only an open clears a caller's strikes."""
    ledger = Ledger.fresh(Policy())
    guesser = "+31687654321"
    for n in range(4):
        assert reason(book, ledger, WEDNESDAY_NOON, f"00000{n}", caller=guesser) == "unknown_code"
        assert reason(book, ledger, WEDNESDAY_NOON, "9000", caller=guesser) == "granted_route"
    assert reason(book, ledger, WEDNESDAY_NOON, "000009", caller=guesser) == "unknown_code"
    assert reason(book, ledger, WEDNESDAY_NOON, "471123", caller=guesser) == "locked_out"


def test_wrong_gate(book: CodeBook, ledger: Ledger) -> None:
    """A code valid for another gate is wrong_gate."""
    assert reason(book, ledger, WEDNESDAY_NOON, "5555", did=DOOR) == "wrong_gate"


@pytest.mark.parametrize(
    ("moment", "expected"),
    [
        (local(2026, 12, 1, 6, 59, 59), "not_yet_valid"),
        (local(2026, 12, 1, 7, 0, 0), "granted_code"),
        (local(2026, 12, 24, 17, 59, 59), "granted_code"),
        (local(2026, 12, 24, 18, 0, 0), "expired"),
        (local(2026, 12, 5, 9, 0), "granted_code"),  # Saturday morning
        (local(2026, 12, 5, 12, 0), "outside_schedule"),  # Saturday at noon: window ended
        (local(2026, 12, 6, 10, 0), "outside_schedule"),  # Sunday
        (local(2026, 12, 8, 17, 59, 59), "granted_code"),
        (local(2026, 12, 8, 18, 0, 0), "outside_schedule"),
    ],
)
def test_validity_and_schedule_edges(book: CodeBook, ledger: Ledger, moment: float,
                                     expected: str) -> None:
    """One second before, at and after each edge, in site-local time."""
    assert reason(book, ledger, moment, "580214") == expected


def test_offsets_in_validity_are_honoured(book: CodeBook, ledger: Ledger) -> None:
    """Times with an offset mean that instant, whatever the site's zone."""
    # 10:00Z to 14:00+02:00 is 12:00 to 14:00 in Amsterdam's summer time.
    assert reason(book, ledger, local(2026, 6, 1, 11, 59, 59), "424242") == "not_yet_valid"
    assert reason(book, ledger, local(2026, 6, 1, 12, 0), "424242") == "granted_code"
    assert reason(book, ledger, local(2026, 6, 1, 13, 59, 59), "424242") == "granted_code"
    assert reason(book, ledger, local(2026, 6, 1, 14, 0), "424242") == "expired"


@pytest.mark.parametrize(
    ("moment", "expected"),
    [
        (local(2026, 12, 11, 21, 59), "outside_schedule"),  # Friday before
        (local(2026, 12, 11, 22, 0), "granted_code"),  # Friday evening
        (local(2026, 12, 11, 23, 59, 59), "granted_code"),
        (local(2026, 12, 12, 0, 0), "granted_code"),  # past midnight: Saturday
        (local(2026, 12, 12, 1, 59, 59), "granted_code"),
        (local(2026, 12, 12, 2, 0), "outside_schedule"),
        (local(2026, 12, 13, 1, 0), "outside_schedule"),  # Sunday night is not Friday's
        (local(2026, 12, 10, 23, 0), "outside_schedule"),  # Thursday
    ],
)
def test_overnight_window(book: CodeBook, ledger: Ledger, moment: float, expected: str) -> None:
    """"fri 22:00-02:00" runs into Saturday morning and no further."""
    assert reason(book, ledger, moment, "220022") == expected


def test_dst_spring_forward_night(book: CodeBook, ledger: Ledger) -> None:
    """On 2026-03-29 Amsterdam skips 02:00-03:00: a 02:00-03:00 window never opens that night."""
    before = local(2026, 3, 29, 1, 59, 59)  # CET
    jump = before + 1  # the next second is 03:00 CEST
    assert reason(book, ledger, before, "250250") == "outside_schedule"
    assert reason(book, ledger, jump, "250250") == "outside_schedule"
    assert reason(book, ledger, local(2026, 3, 30, 2, 30), "250250") == "granted_code"


def test_dst_fall_back_night(book: CodeBook, ledger: Ledger) -> None:
    """On 2026-10-25 02:00-03:00 happens twice: the window is open both times (two hours)."""
    first = local(2026, 10, 25, 2, 30)  # fold=0: CEST
    second = first + 3600  # the same wall time again, CET
    assert reason(book, ledger, first, "250250") == "granted_code"
    assert reason(book, ledger, second, "250250") == "granted_code"
    assert reason(book, ledger, first - 1800 - 1, "250250") == "outside_schedule"  # 01:59:59
    assert reason(book, ledger, second + 1800, "250250") == "outside_schedule"  # 03:00 CET


def test_weekday_window_follows_dst(book: CodeBook, ledger: Ledger) -> None:
    """07:00 local opens the window in winter and in summer alike."""
    for day in (local(2026, 3, 27, 7, 0), local(2026, 3, 30, 7, 0), local(2026, 10, 23, 7, 0),
                local(2026, 10, 26, 7, 0)):
        assert reason(book, ledger, day, "5555") == "granted_code"


def test_max_uses_counts_and_stops(book: CodeBook, ledger: Ledger) -> None:
    """A single-use code admits once, then used_up."""
    assert reason(book, ledger, WEDNESDAY_NOON, "111111") == "granted_code"
    assert reason(book, ledger, WEDNESDAY_NOON, "111111") == "used_up"
    assert ledger.uses == {"Once": 1}


def test_caller_binding(book: CodeBook, ledger: Ledger) -> None:
    """A code bound to callers refuses other callers (wrong_caller) in any number form."""
    assert reason(book, ledger, WEDNESDAY_NOON, "737373", caller=RESIDENT) == "granted_code"
    assert reason(book, ledger, WEDNESDAY_NOON, "737373") == "wrong_caller"
    assert reason(book, ledger, WEDNESDAY_NOON, "737373", caller=None) == "wrong_caller"


def test_totp_current_previous_outside_and_replay(book: CodeBook, ledger: Ledger) -> None:
    """TOTP: now and one step back admit; two steps back do not; a code admits once."""
    otp = pyotp.TOTP(SECRET)
    now = WEDNESDAY_NOON
    step = int(now) // 30
    previous = otp.generate_otp(step - 1)
    too_old = otp.generate_otp(step - 2)
    assert reason(book, ledger, now, too_old) in ("unknown_code",)
    assert reason(book, ledger, now, previous) == "granted_totp"
    assert reason(book, ledger, now, previous) == "replayed"
    assert reason(book, ledger, now, otp.generate_otp(step)) == "granted_totp"
    # Once a newer step is spent, an older code cannot be used either.
    fresh = Ledger.fresh(Policy())
    assert reason(book, fresh, now, otp.generate_otp(step + 1)) == "granted_totp"
    assert reason(book, fresh, now, otp.generate_otp(step)) == "replayed"


def test_codes_that_spend_are_refused_while_the_store_cannot_keep_the_spend(
        book: CodeBook, ledger: Ledger) -> None:
    """durable=False (the store failing): a use-limited code and a TOTP code are ERR
    store_failing and spend nothing; a code without a limit still opens."""
    now = WEDNESDAY_NOON
    totp = pyotp.TOTP(SECRET).generate_otp(int(now) // 30)
    for code in ("111111", totp):
        request = Request(did=BARRIER, caller="+31687654321", code=code)
        decision = decide(request, book, ledger, now, durable=False)
        assert (decision.status, decision.reason, decision.opens) == (
            Status.ERR, "store_failing", False)
        assert ledger.apply(request, decision, now) == Changes()
    unlimited = Request(did=BARRIER, caller="+31687654321", code="5555")
    assert decide(unlimited, book, ledger, now, durable=False).reason == "granted_code"
    # Nothing was spent: once the store is back, both open.
    assert reason(book, ledger, now, "111111") == "granted_code"
    assert reason(book, ledger, now, totp) == "granted_totp"


def test_static_code_takes_precedence_over_totp(book: CodeBook, ledger: Ledger) -> None:
    """Digits that are both a static code and someone's TOTP code open as the static code."""
    otp = pyotp.TOTP(SECRET)
    now = WEDNESDAY_NOON
    current = otp.generate_otp(int(now) // 30)
    digest = book.digest(current)
    # As a code managed over MQTT, the one kind of static code added at run time.
    static = book.code(book.digest("5555"))
    assert static is not None
    book.managed[digest] = static
    decision = run(book, ledger, now, current)
    assert (decision.reason, decision.who) == ("granted_code", "Barrier only")


def test_totp_lookup_is_per_step_table(book: CodeBook) -> None:
    """The TOTP table is built once per step, not once per request."""
    (table,) = book.totp.values()
    now = WEDNESDAY_NOON
    table.lookup("000000", now)
    built = dict(table.steps)
    table.lookup("000001", now + 1)
    assert table.steps == built
    assert len(built) == 3


@pytest.mark.parametrize(("sent", "expiry", "why"), [
    (1000.0, None, None), (998.5, None, None), (1002.0, None, None),
    (998.49, None, "too old"), (1002.01, None, "in the future"),
    (None, 2, None), (None, 1, None), (None, 3, "no time"), (None, 0, "no time"),
    (None, None, "no time"),
    (940.0, 1, "too old"),  # the time in the payload decides, however short the expiry
])
def test_a_remote_open_is_fresh_only_within_the_deadline(
        sent: float | None, expiry: int | None, why: str | None) -> None:
    """With a 1.5 s deadline at t=1000: a sent time from 998.5 to 1002 (2 s of clock
    skew), or else an MQTT 5 expiry of 1 or 2 s (1.5 rounded up) left on the message."""
    assert staleness(sent, expiry, 1000.0, 1.5) == why
