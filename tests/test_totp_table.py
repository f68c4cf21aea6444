"""The TOTP table computes codes itself; these pin it to pyotp's answers."""

from __future__ import annotations

import base64

import pyotp
from hypothesis import given, settings
from hypothesis import strategies as st

from gated.book.codes import TOTP_WINDOW, TotpTable, TotpUser
from gated.core.credential import Credential

secrets = st.binary(min_size=20, max_size=40).map(lambda b: base64.b32encode(b).decode())


def user(secret: str, digits: int = 6, period: int = 30, name: str = "u") -> TotpUser:
    credential = Credential(id=name, name=name, kind="totp", gates=frozenset({"barrier"}))
    otp = pyotp.TOTP(secret, digits=digits, interval=period)
    return TotpUser(credential, otp.byte_secret(), digits, otp.digest().name)


def pyotp_code(one: TotpUser, timecode: int) -> str:
    """What pyotp makes of the same secret: the reference the table must agree with."""
    secret = base64.b32encode(one.key).decode()
    return pyotp.TOTP(secret, digits=one.digits).generate_otp(timecode)


# No deadline: a shared machine under load is no measure of speed (the bench is).
@settings(deadline=None)
@given(secret=secrets, digits=st.integers(6, 8), timecode=st.integers(0, 2**40))
def test_a_users_code_is_pyotps(secret: str, digits: int, timecode: int) -> None:
    """A step's table holds the digits pyotp generates, for any secret, length and step."""
    one = user(secret, digits)
    table = TotpTable(users=[one])
    table.install(timecode, table.build(timecode))
    assert table.codes(timecode) == {pyotp_code(one, timecode): [one]}


@settings(max_examples=25, deadline=None)
@given(found=st.lists(secrets, min_size=1, max_size=8),
       start=st.integers(1, 2**31), moves=st.lists(st.integers(0, 3), max_size=6))
def test_the_table_holds_every_code_of_the_window_as_the_steps_move(
        found: list[str], start: int, moves: list[int]) -> None:
    """After any sequence of step changes, lookups match pyotp across the whole window."""
    users = [user(secret, name=f"u{i}") for i, secret in enumerate(found)]
    table = TotpTable(users=users, period=30)
    now = start * 30.0
    for move in [0, *moves]:
        now += move * 30
        step = int(now) // 30
        for one in users:
            for timecode in range(step - TOTP_WINDOW, step + TOTP_WINDOW + 1):
                matches = table.lookup(pyotp_code(one, timecode), now)
                assert (one.credential, timecode) in matches
        expected = {
            (pyotp_code(one, t), one.credential.id, t)
            for one in users for t in range(step - TOTP_WINDOW, step + TOTP_WINDOW + 1)
        }
        window = range(step - TOTP_WINDOW, step + TOTP_WINDOW + 1)
        assert {(code, u.credential.id, t) for t in window
                for code, found_ in table.codes(t).items() for u in found_} == expected


def test_a_step_holds_keyed_digests_not_codes() -> None:
    """A step's table is searched by the keyed digest of what was typed, as static codes
    are: where a guess lands in it says nothing of how close its digits were."""
    from gated.book import sitekey
    from gated.book.codes import digest_prefix

    users = [user(base64.b32encode(bytes([i]) * 20).decode(), name=f"u{i}") for i in range(50)]
    table = TotpTable(users=users, period=30)
    step = table.build(1_000)
    expected = sorted(digest_prefix(sitekey.digest(table.key, one.code(1_000))) for one in users)
    assert list(step.prefixes) == expected
    assert sorted(users[i].credential.id for i in step.users) == sorted(u.credential.id
                                                                        for u in users)
